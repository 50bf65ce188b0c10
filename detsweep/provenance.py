"""Provenance of a sweep's rows, known on the driver: detsweep version, git sha, torch and ray
versions (read from package metadata, without importing either), hostname."""
from __future__ import annotations

import functools
import importlib.metadata
import socket
import subprocess
from pathlib import Path

import detsweep


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


@functools.lru_cache(maxsize=1)
def _git_sha() -> str | None:
    """HEAD of the repo that holds the detsweep package, None if not a git checkout."""
    package_dir = Path(detsweep.__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "--show-toplevel", "HEAD"], cwd=package_dir,
                             capture_output=True, text=True, timeout=5, check=True).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return None
    # Only trust a repo whose top level holds this package, not some enclosing unrelated repo.
    if len(out) != 2 or Path(out[0]).resolve() != package_dir.parent:
        return None
    return out[1]


def provenance() -> dict[str, str | None]:
    """Provenance columns known on the driver; torch/ray versions without importing them."""
    return {
        "detsweep_version": detsweep.__version__,
        "git_sha": _git_sha(),
        "torch_version": _version("torch"),
        "ray_version": _version("ray"),
        "hostname": socket.gethostname(),
    }

"""COCO 2017 download: resumable HTTP fetches verified against a digest manifest, then unzip.

Layout produced under root: `images/{train2017,val2017}/`, `annotations/instances_*2017.json`,
and one `<archive>.complete` marker per archive, so a second run makes no request.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import shutil
import urllib.error
import urllib.request
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "http://images.cocodataset.org"
ANNOTATIONS_ARCHIVE = "annotations_trainval2017.zip"
SPLIT_ARCHIVES = {"train": "train2017.zip", "val": "val2017.zip"}
DIGEST_ALGOS = ("md5", "sha256")

# Per archive: its path under the base URL, the digest we verify ("algo"/"digest"), and the size
# in bytes. COCO itself publishes no sha256; these sha256 values and sizes are the ones
# tensorflow/datasets records for these URLs (tensorflow_datasets/url_checksums/coco.txt),
# matched by independent records (e.g. ParlAI's COCO-IMG downloads). The md5 values are the
# widely published ones (NVIDIA DeepLearningExamples, PaddleDetection) and are kept for
# reference: set "algo": "md5" and "digest": <md5> on an entry to verify by md5 instead.
DEFAULT_MANIFEST: dict[str, dict[str, Any]] = {
    "train2017.zip": {
        "path": "zips/train2017.zip",
        "algo": "sha256",
        "digest": "69a8bb58ea5f8f99d24875f21416de2e9ded3178e903f1f7603e283b9e06d929",
        "size": 19336861798,
        "md5": "cced6f7f71b7629ddf16f17bbcfab6b2",
    },
    "val2017.zip": {
        "path": "zips/val2017.zip",
        "algo": "sha256",
        "digest": "4f7e2ccb2866ec5041993c9cf2a952bbed69647b115d0f74da7ce8f4bef82f05",
        "size": 815585330,
        "md5": "442b8da7639aecaf257c1dceb8ba8c80",
    },
    ANNOTATIONS_ARCHIVE: {
        "path": "annotations/annotations_trainval2017.zip",
        "algo": "sha256",
        "digest": "113a836d90195ee1f884e704da6304dfaaecff1f023f49b6ca93c4aaae470268",
        "size": 252907541,
        "md5": "f4bbac642086de4f52a3fdda2de5fa2c",
    },
}


class ChecksumError(ValueError):
    """A downloaded file's digest differs from the manifest's."""


def file_digest(path: str | Path, algo: str, chunk: int = 1 << 20) -> str:
    """Hex digest of a file, read in chunks."""
    if algo not in DIGEST_ALGOS:
        raise ValueError(f"digest algorithm {algo!r} is not one of {list(DIGEST_ALGOS)}")
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def download_file(
    url: str, dest: str | Path, *, expected: tuple[str, str], chunk: int = 1 << 20, timeout: float = 60.0
) -> Path:
    """Download `url` to `dest`, resuming `dest.part` with an HTTP Range request, then verify.

    `expected` = (algo, hex digest) with algo in {"md5", "sha256"}. An existing `dest` whose
    digest matches is kept without any request. On a digest mismatch the partial file is
    deleted (resuming it could never succeed) and ChecksumError names the file and both digests.
    The final file appears only once verified (atomic rename).
    """
    algo, digest = expected
    if algo not in DIGEST_ALGOS:
        raise ValueError(f"digest algorithm {algo!r} is not one of {list(DIGEST_ALGOS)}")
    dest = Path(dest)
    if dest.is_file():
        if file_digest(dest, algo) == digest.lower():
            log.info("%s already present and verified", dest)
            return dest
        log.warning("%s exists but its %s differs from the manifest; downloading it again", dest, algo)
        dest.unlink()
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    _fetch_into(url, part, chunk=chunk, timeout=timeout)

    actual = file_digest(part, algo, chunk)
    if actual != digest.lower():
        part.unlink()
        raise ChecksumError(
            f"{dest.name}: {algo} mismatch: expected {digest.lower()}, got {actual} (from {url}); "
            f"the download was deleted, run again to retry"
        )
    os.replace(part, dest)
    return dest


def _fetch_into(url: str, part: Path, *, chunk: int, timeout: float) -> None:
    """Append the rest of `url` to `part`, or restart it when the server ignores Range."""
    offset = part.stat().st_size if part.is_file() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:  # nothing past our offset: the .part is already complete
            log.info("%s is already complete", part)
            return
        raise OSError(f"download of {url} failed: HTTP {e.code} {e.reason}") from None
    except urllib.error.URLError as e:
        raise OSError(f"download of {url} failed: {e.reason}") from None
    with response:
        resumed = offset > 0 and response.status == 206
        if offset and not resumed:
            log.info("server ignored the Range request for %s; restarting it", url)
            offset = 0
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length is not None else None
        with open(part, "ab" if resumed else "wb") as f, tqdm(
            total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024, desc=part.name[:-5],
            delay=1.0, leave=False,
        ) as bar:
            try:
                while block := response.read(chunk):
                    f.write(block)
                    bar.update(len(block))
            except (http.client.HTTPException, OSError) as e:  # dropped connection: keep .part to resume
                raise OSError(
                    f"download of {url} interrupted at {f.tell()} bytes ({type(e).__name__}); run again to resume"
                ) from None
    if total is not None and part.stat().st_size != total:
        raise OSError(
            f"download of {url} ended early: {part.stat().st_size} of {total} bytes; run again to resume"
        )


def fetch_coco2017(
    root: str | Path,
    *,
    splits: Sequence[str] = ("train", "val"),
    manifest: Mapping[str, Mapping[str, Any]] = DEFAULT_MANIFEST,
    base_url: str = DEFAULT_BASE_URL,
    keep_archives: bool = False,
) -> Path:
    """Download, verify and unzip COCO 2017 `splits` plus the annotations into `root`.

    Gives `root/images/{train2017,val2017}` and `root/annotations/`. Each archive finished
    leaves `root/<archive>.complete`; archives with a marker are skipped without a request.
    Returns `root`.
    """
    unknown = [s for s in splits if s not in SPLIT_ARCHIVES]
    if unknown:
        raise ValueError(f"unknown split {unknown[0]!r}; choose from {list(SPLIT_ARCHIVES)}")
    root = Path(root).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    for name in [ANNOTATIONS_ARCHIVE] + [SPLIT_ARCHIVES[s] for s in splits]:
        marker = root / f"{name}.complete"
        if marker.is_file():
            log.info("%s: already done", name)
            continue
        if name not in manifest:
            raise ValueError(f"archive {name!r} is not in the manifest (has {sorted(manifest)})")
        entry = manifest[name]
        archive = download_file(
            f"{base_url.rstrip('/')}/{entry['path']}", root / name, expected=(entry["algo"], entry["digest"])
        )
        _extract(archive, root)
        marker.write_text(f"{entry['algo']} {entry['digest']}\n")
        if not keep_archives:
            archive.unlink()
        log.info("%s: done", name)
    return root


def _extract(archive: Path, root: Path) -> None:
    """Unzip into a scratch folder, then move `annotations/*` to `root/annotations/` and every
    other top-level folder (train2017, val2017) to `root/images/`. zipfile drops absolute and
    `..` member paths, so nothing lands outside the scratch folder."""
    scratch = root / f".extract-{archive.stem}"
    shutil.rmtree(scratch, ignore_errors=True)  # leftovers of an interrupted run
    log.info("unzipping %s", archive.name)
    try:
        with zipfile.ZipFile(archive) as zf:
            members = zf.infolist()
            for member in tqdm(members, desc=f"unzip {archive.name}", unit="file", delay=1.0, leave=False):
                zf.extract(member, scratch)
        for top in sorted(scratch.iterdir()):
            if top.name == "annotations" and top.is_dir():
                (root / "annotations").mkdir(exist_ok=True)
                for f in top.iterdir():
                    os.replace(f, root / "annotations" / f.name)
            elif top.is_dir():
                dest = root / "images" / top.name
                dest.parent.mkdir(exist_ok=True)
                shutil.rmtree(dest, ignore_errors=True)  # a partial copy from an interrupted run
                os.replace(top, dest)
            else:
                os.replace(top, root / top.name)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

"""bench/gpu_check.py --smoke: every section runs its logic on the CPU with tiny models, so the GPU check
cannot rot between the rare runs on a lent GPU; and it imports nothing the GPU machine lacks."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "gpu_check.py"
SECTIONS = ["env", "resume", "amp", "regimes", "loader", "fraction", "ddp", "nccl", "knobs", "seed000"]
# The lent GPU machine has torch 2.11 but no Ray, no pycocotools, and nothing can be installed there.
ABSENT = ("ray", "pycocotools", "faster_coco_eval")
BLOCKER = f"""
import sys

class _AbsentOnTheGpuMachine:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {ABSENT!r}:
            raise ModuleNotFoundError(name + " is not on the GPU machine")
        return None

sys.meta_path.insert(0, _AbsentOnTheGpuMachine())
"""


def _env_without_absent_packages(tmp_path: Path) -> dict[str, str]:
    """A PYTHONPATH whose sitecustomize makes ABSENT unimportable, in the script and in its children."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCKER)
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))}


def test_smoke_runs_every_section_with_no_failure_and_no_ray(tmp_path):
    env = _env_without_absent_packages(tmp_path)
    blocked = subprocess.run([sys.executable, "-c", "import ray"], env=env, capture_output=True, text=True)
    assert blocked.returncode != 0 and "not on the GPU machine" in blocked.stderr  # the blocker itself works

    out = tmp_path / "out"
    p = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(out)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    log = p.stdout[-4000:] + p.stderr[-4000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert list(report["sections"]) == SECTIONS, log
    statuses = {name: sec["status"] for name, sec in report["sections"].items()}
    assert set(statuses.values()) <= {"PASS", "SKIP"}, (statuses, log)
    failed = [c for c in report["checks"] if c["status"] == "FAIL"]
    assert not failed, failed
    assert p.returncode == 0, log
    # One printed line per check; every section but env (no CUDA here) passes something on the CPU.
    assert sum(p.stdout.count(f"[{s}] ") for s in ("PASS", "FAIL", "SKIP")) == len(report["checks"])
    assert all(statuses[name] == "PASS" for name in SECTIONS if name != "env"), statuses
    assert report["summary"]["FAIL"] == 0 and report["meta"]["smoke"] is True


def test_help_lists_the_sections_and_a_wrong_name_lists_the_valid_ones():
    p = subprocess.run([sys.executable, str(SCRIPT), "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and all(name in p.stdout for name in SECTIONS), p.stdout
    p = subprocess.run([sys.executable, str(SCRIPT), "--only", "amp,nosuch"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 2 and "nosuch" in p.stderr and "seed000" in p.stderr, p.stderr

"""Helpers of the real-Ray tests that run `python -m detsweep.run` in a driver of its own (to kill it) and
read a sweep's results."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[2]


def rows_by_trial(root: Path) -> dict[str, dict]:
    return {r["trial_id"]: r for r in pq.read_table(root / "results.parquet").to_pylist()}


def start_driver(sweep_path: Path) -> subprocess.Popen:
    """`python -m detsweep.run` in its own process, attached to the test's Ray cluster; its output
    goes to a file beside the sweep (a pipe nobody reads would block it)."""
    import ray

    env = dict(os.environ, RAY_ADDRESS=ray.get_runtime_context().gcs_address, TUNE_GLOBAL_CHECKPOINT_S="0",
               PYTHONPATH=str(REPO))
    log = open(sweep_path.with_suffix(".log"), "w")
    proc = subprocess.Popen([sys.executable, "-m", "detsweep.run", str(sweep_path)], env=env,
                            stdout=log, stderr=subprocess.STDOUT, text=True, cwd=REPO)
    proc.log_path = log.name
    return proc


def driver_output(proc: subprocess.Popen) -> str:
    return Path(proc.log_path).read_text()[-5000:]


def experiment_state_saved(tune: Path) -> bool:
    """Tune's experiment state and its searcher's state are in `tune`, each whole: Ray copies them there one
    file at a time, in place, so a kill in the middle of a copy leaves one cut short (what Tune does then is
    tests/ray/test_bases.py's)."""
    from detsweep.sweep.resume import cut_short_tune_state

    kinds = ("experiment_state-*.json", "basic-variant-state-*.json")
    return all(list(tune.glob(k)) for k in kinds) and cut_short_tune_state(str(tune.parent)) is None

"""What a cluster day needs, on one machine with a real local Ray (fractional-GPU packing is proved
by the recipe test's trials): ASHA early stopping, a trial surviving the loss of a worker, resuming after the driver
dies or after fixing an errored trial, and a trial too big for the cluster refused before it starts."""
from __future__ import annotations

import signal
import time

import psutil
import pyarrow.parquet as pq
import pytest

from detsweep import run
from tests.ray.drivers import driver_output, experiment_state_saved, rows_by_trial, start_driver
from tests.ray.test_e2e import tiny_sweep, write_sweep


def test_asha_stops_weak_trials_and_frees_their_workers(ray_cluster, tmp_path, synthetic_root):
    sweep = tiny_sweep(tmp_path, synthetic_root, name="asha")
    sweep["data"]["train_images"] = 8
    sweep["train"].update(epochs=4, lr_schedule="constant")
    # Evaluated (and reported) every 2 epochs: ASHA's rung at epoch 2 sees exactly those results.
    sweep["eval"] = {"every": 2, "visuals": False}
    sweep["scheduler"] = {"kind": "asha", "metric": "loss", "mode": "min", "grace_period": 2, "reduction_factor": 2}
    # The same init and data order: the trial that barely learns loses at the first rung (ASHA keeps the top
    # 1/reduction_factor there: the better of the two).
    sweep["grid"] = {"model": ["detr_r50"], "regime": ["full"], "train.lr": [1.0e-3, 1.0e-12]}
    sweep["max_concurrent_trials"] = 1
    assert run.main([str(write_sweep(tmp_path, sweep))]) == 0  # returns at all: stopped trials freed their workers
    rows = rows_by_trial(tmp_path / "results" / "asha")
    assert rows["detr_r18-full-lr0.001"]["status"] == "ok"
    assert rows["detr_r18-full-lr0.001"]["epochs_completed"] == 4
    r = rows["detr_r18-full-lr1e-12"]
    assert r["status"] == "stopped", {k: (r["status"], r["epochs_completed"]) for k, r in rows.items()}
    assert r["epochs_completed"] == 2 and r["ap"] is not None and r["error"] == "stopped by the scheduler"
    # Every worker's CPU came back to the cluster (a leaked placement group would hold 2).
    deadline = time.time() + 60
    while ray_cluster.available_resources().get("CPU", 0) < 4 and time.time() < deadline:
        time.sleep(1)
    assert ray_cluster.available_resources().get("CPU", 0) == 4
    # SweepTorchTrainer: no Ray Data actor in any trial (the State API lists dead actors too).
    from ray.util.state import list_actors

    assert [a.class_name for a in list_actors(filters=[("class_name", "=", "DatasetManager")])] == []


def _train_workers() -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if "RayTrainWorker" in cmd:
            found.append(p)
    return found


def test_a_killed_worker_then_a_killed_driver_resume(ray_cluster, tmp_path, synthetic_root, capsys):
    """Two trials, one at a time, in a driver of their own. A Train worker of the first is killed after its
    first checkpoint: the trial restarts from that checkpoint (max_failures 1) and finishes. Then the driver is
    killed before the second trial is done: --resume runs that one, and leaves the finished one as it was.
    (One sweep for both kinds of death: real-Ray trials cost ~20 s each, and the suite has a time budget.)"""
    sweep = tiny_sweep(tmp_path, synthetic_root, name="resume")
    sweep["data"]["train_images"] = 16
    sweep["train"]["epochs"] = 4
    sweep["fault_tolerance"] = {"max_failures": 1, "keep": 2}
    sweep["grid"] = {"model": ["detr_r50"], "regime": ["full", "partial"]}
    sweep["max_concurrent_trials"] = 1
    path = write_sweep(tmp_path, sweep)
    root = tmp_path / "results" / "resume"

    driver = start_driver(path)
    deadline = time.time() + 300
    # Wait until epoch 0's report, and so its checkpoint, has reached the driver.
    while time.time() < deadline and not (root / "history.parquet").exists():
        assert driver.poll() is None, driver_output(driver)
        time.sleep(0.2)
    workers = _train_workers()
    assert workers, "no Ray Train worker process found"
    workers[-1].send_signal(signal.SIGKILL)

    while time.time() < deadline:
        if (root / "results.parquet").exists() and any(
                r["status"] == "ok" for r in rows_by_trial(root).values()):
            break
        assert driver.poll() is None, driver_output(driver)
        time.sleep(0.5)
    else:
        pytest.fail("the first trial did not finish in time")
    # Tune rewrites its state file in place at every step: a kill in the middle of that copy leaves it empty
    # (README, known limitations), so kill between two writes, when the file parses.
    while not experiment_state_saved(root / "tune"):
        time.sleep(0.05)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    before = rows_by_trial(root)
    (first,) = [t for t, r in before.items() if r["status"] == "ok"]
    assert first == "detr_r18-full" and before[first]["epochs_completed"] == 4, before[first]["error"]
    history = pq.read_table(root / "history.parquet").to_pylist()
    assert [h["epoch"] for h in history if h["trial_id"] == first] == [0, 1, 2, 3]  # each epoch once, none orphaned
    resumed = [h for h in history if h.get("resumed_from_epoch") is not None]
    assert resumed and resumed[0]["resumed_from_epoch"] >= 0  # restarted from a checkpoint, not scratch
    assert resumed[0]["epoch"] == resumed[0]["resumed_from_epoch"] + 1

    capsys.readouterr()
    assert run.main([str(path), "--resume"]) == 0  # in this process: only the killed driver needs one of its own
    assert "concurrency: Tune keeps 1 the run started with (Tuner.restore)" in capsys.readouterr().out
    after = pq.read_table(root / "results.parquet").to_pylist()
    assert sorted(r["trial_id"] for r in after) == ["detr_r18-full", "detr_r18-partial"]  # once each
    assert all(r["status"] == "ok" for r in after), [(r["trial_id"], r["error"]) for r in after]
    by_id = {r["trial_id"]: r for r in after}
    assert by_id[first]["finished_at"] == before[first]["finished_at"]  # not re-run
    history = pq.read_table(root / "history.parquet").to_pylist()
    assert sorted((h["trial_id"], h["epoch"]) for h in history) == [
        ("detr_r18-full", e) for e in range(4)] + [("detr_r18-partial", e) for e in range(4)]


def test_a_trial_bigger_than_the_cluster_stops_before_any_trial_starts(ray_cluster, tmp_path, synthetic_root, capsys):
    """4 CPUs in the test cluster, a trial of 2 workers x 3 CPUs: Train would wait forever."""
    sweep = tiny_sweep(tmp_path, synthetic_root, name="toobig")
    sweep["resources"].update(ddp_workers=2, cpus_per_worker=3)
    path = write_sweep(tmp_path, sweep)
    assert run.main([str(path)]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: trial 'detr_r18-full' needs CPU=6, GPU=0 but the cluster has CPU=4, GPU=1; lower resources in "
        f"{path}, or set max_concurrent_trials for a cluster that autoscales")
    assert not (tmp_path / "results" / "toobig" / "tune").exists()


def test_resume_after_fixing_an_errored_trial(ray_cluster, tmp_path, synthetic_root):
    """A trial failed on a bad weights file; the user fixes the file, sets on_resume_errored and
    resumes. `skip` leaves it as it was; `restart`, on the next resume, runs it again from scratch (now ok)."""
    import dataclasses

    import torch

    from detsweep.sweep import expand, parse_sweep
    from detsweep.models import build_model

    weights = tmp_path / "detr.pth"
    weights.write_bytes(b"not written yet")
    sweep = tiny_sweep(tmp_path, synthetic_root, name="errored")
    sweep["train"]["epochs"] = 1
    sweep["model"]["detr"]["weights"] = str(weights)
    path = write_sweep(tmp_path, sweep)
    root = tmp_path / "results" / "errored"
    assert run.main([str(path)]) == 1  # its only trial failed: a failed command
    assert rows_by_trial(root)["detr_r18-full"]["status"] == "error"

    (trial,) = expand(parse_sweep(sweep))
    model = build_model(trial.model, dataclasses.replace(trial.detector, weights="none"), num_classes=3)
    torch.save({"model": model.detr.state_dict()}, weights)  # the official checkpoint layout
    for mode, code, status in (("skip", 1, "error"), ("restart", 0, "ok")):
        sweep["fault_tolerance"] = {"on_resume_errored": mode}  # may change between runs
        write_sweep(tmp_path, sweep)
        assert run.main([str(path), "--resume"]) == code, mode
        (row,) = pq.read_table(root / "results.parquet").to_pylist()
        assert row["status"] == status, (mode, row["error"])
        assert (row["error"] is None) == (mode == "restart")

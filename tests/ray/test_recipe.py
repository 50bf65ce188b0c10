"""The training recipe in real trials on a real local Ray: evaluation every N epochs (reports, history and
checkpoints follow the evaluations), gradient accumulation, EMA weights evaluated and kept as the best
checkpoint, the validation loss, the official DETR augmentation, a profiler trace beside the TensorBoard
events, and train.patience
stopping a trial that no longer improves, recorded as `stopped` with its reason. The trials also prove
fractional-GPU packing on the test cluster's 1 logical GPU: 0.5 GPU each, Tune allowed 3 at once, and
exactly 2 ran at once (one run of Ray trials for both: they cost ~20 s each, and the suite has a time
budget)."""
from __future__ import annotations

import json

import pyarrow.parquet as pq

from detsweep import run
from tests.ray.test_e2e import tiny_sweep, write_sweep


def _max_overlap(windows: list[tuple[float, float]]) -> int:
    """The most intervals open at one instant."""
    events = sorted([(a, 1) for a, _ in windows] + [(b, -1) for _, b in windows])
    now = best = 0
    for _, delta in events:
        now += delta
        best = max(best, now)
    return best


def test_eval_every_ema_best_checkpoint_profiler_and_patience(ray_cluster, tmp_path, synthetic_root, capfd):
    sweep = tiny_sweep(tmp_path, synthetic_root, name="recipe")
    # DDP is not under test; 0.5 of a logical GPU each (the models stay on the CPU; gloo)
    sweep["resources"] = {"ddp_workers": 1, "cpus_per_worker": 1, "gpus_per_worker": 0.5, "backend": "gloo"}
    sweep["train"] = {"epochs": 5, "batch_size_per_worker": 2, "accumulate": 2, "lr": 1.0e-4,
                      "ema": {"decay": 0.9, "warmup_steps": 0}, "profile": {"wait": 0, "warmup": 1, "active": 1}}
    sweep["eval"] = {"every": 2, "visuals": False}
    sweep["data"]["augment"] = "detr"  # the official multi-scale + crop recipe, scaled to 64 px images
    # Two epochs of a tiny model on 8 images leave AP at 0: with patience 1 the second evaluation
    # (epoch 4 of 5) is no better, and the trial stops there; with patience 3 it never stops.
    sweep["grid"] = {"model": ["detr_r50"], "regime": ["full"], "train.patience": [None, 1, 3]}
    # Tune may start all 3 at once: only the GPU shares can hold the third back.
    assert run.main([str(write_sweep(tmp_path, sweep)), "--max-concurrent", "3", "-q"]) == 0
    # -q: one line per trial event with epoch, AP and ETA; none of Tune's boxes and tables.
    out = capfd.readouterr().out
    assert "Configuration for experiment" not in out and "Trial status" not in out
    assert "detr_r18-full-patienceNone: epoch 2/5, loss " in out and ", AP " in out and "ETA " in out
    assert "[3/3 done] detr_r18-full-patience" in out
    assert "concurrency: the cluster fits 2 at once" in out  # 1 GPU / 0.5 per trial

    root = tmp_path / "results" / "recipe"
    rows = {r["trial_id"]: r for r in pq.read_table(root / "results.parquet").to_pylist()}
    history = pq.read_table(root / "history.parquet").to_pylist()
    learner = rows["detr_r18-full-patienceNone"]
    assert learner["status"] == "ok" and learner["epochs_completed"] == 5 and learner["error"] is None
    epochs = sorted(h["epoch"] for h in history if h["trial_id"] == learner["trial_id"])
    assert epochs == [1, 3, 4]  # eval.every 2 and always the last: epochs 2, 4 and 5 (0-based 1, 3, 4)
    assert all(h["val_loss"] > 0 and h["val_loss_ce"] > 0 for h in history if h["trial_id"] == learner["trial_id"])
    assert learner["best_epoch"] in (1, 3, 4) and learner["best_ap"] == max(
        h["ap"] for h in history if h["trial_id"] == learner["trial_id"])
    best = root / f"train-{learner['trial_id']}" / "best"
    meta = json.loads((best / "meta.json").read_text())
    assert meta["epoch"] == learner["best_epoch"] and meta["best_metric"] == "ap" and (best / "model.pt").is_file()
    assert list((root / "tune" / learner["trial_id"] / "profile").glob("*.pt.trace.json*"))  # the profiler trace

    patient = rows["detr_r18-full-patience3"]
    assert patient["status"] == "ok" and patient["epochs_completed"] == 5, patient["error"]
    stuck = rows["detr_r18-full-patience1"]
    assert stuck["status"] == "stopped" and stuck["epochs_completed"] == 4 and stuck["ap"] == 0.0
    assert stuck["error"] == "patience: no better ap in 1 evaluations (best 0.0000 at epoch 1)"

    # Packing: each trial's training window as its workers saw it, from the worker group's start to its last
    # report. Tune's trial actors need no GPU, so only the workers prove it.
    assert all(r["gpus_per_worker"] == 0.5 for r in rows.values())
    windows = {}
    for h in history:
        start, end = windows.get(h["trial_id"], (h["worker_started_at"], h["reported_at"].timestamp()))
        windows[h["trial_id"]] = (min(start, h["worker_started_at"]), max(end, h["reported_at"].timestamp()))
    assert len(windows) == 3
    assert _max_overlap(list(windows.values())) == 2

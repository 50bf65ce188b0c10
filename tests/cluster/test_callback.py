"""The Tune side's pure helpers: the one-line reason of a failed trial, extra-axis columns."""
from __future__ import annotations

from detsweep.cluster.callback import error_line, extra_axis_columns
from detsweep.sweep import expand, parse_sweep

RAY_TRACEBACK = """Failure # 1 (occurred at 2026-11-23_04-12-28)
ray::ImplicitFunc.train() (pid=16192, ip=192.0.2.2, actor_id=4bb9, repr=run_trial)
  File "/work/main/detsweep/sweep.py", line 83, in run_trial
    trainer.fit()
ray.train.WorkerGroupError: Training failed due to worker errors:
[Rank 0,1 Error Snippet]:
  File "/work/main/detsweep/engine.py", line 77, in train_one_epoch
    raise NonFiniteLossError(f"non-finite loss ...")
detsweep.engine.NonFiniteLossError: non-finite loss nan at epoch 0 step 1 (loss_ce=nan)
"""


def test_error_line_is_the_innermost_exception_not_rays_wrappers():
    assert error_line(RAY_TRACEBACK) == "NonFiniteLossError: non-finite loss nan at epoch 0 step 1 (loss_ce=nan)"
    assert error_line("ray.train.WorkerGroupError: Training failed due to worker errors:\n"
                      "ValueError: could not load checkpoint file '/x.pth': bad zip") == \
        "ValueError: could not load checkpoint file '/x.pth': bad zip"
    assert error_line("something odd happened\nwith no exception line") == "with no exception line"
    assert error_line("") == "unknown error"


def test_only_axes_without_a_column_of_their_own_get_one():
    sweep = parse_sweep({"name": "s", "grid": {"regime": ["full", "lora_only"], "lora.rank": [4, 8],
                                                "train.seed": [0, 1], "train.weight_decay": [0.0, 1e-4],
                                                "data.image_size": [64, 128]}})
    columns = extra_axis_columns(expand(sweep))
    assert {k: str(v) for k, v in columns.items()} == {"train_weight_decay": "double", "data_image_size": "int64"}


def test_results_row_gpu_hours_hostname_and_checkpoint(tmp_path):
    """GPU-hours come from the workers' own time (`worker_s`, summed over attempts), not the driver's
    wall clock, which also counts a node booting and the downtime before a --resume."""
    import datetime as dt
    from types import SimpleNamespace

    from detsweep.cluster.callback import ResultsCallback

    sweep = parse_sweep({"name": "s", "storage": str(tmp_path), "grid": {"regime": ["lora_only"]},
                         "resources": {"ddp_workers": 1, "gpus_per_worker": 0.5}})
    (trial,) = expand(sweep)
    cb = ResultsCallback(trial.storage, "s", {trial.trial_id: trial.to_dict()}, {})
    ckpt = tmp_path / "s" / f"train-{trial.trial_id}" / "checkpoint_2026-11-23_05-54-57.790161"
    ckpt.mkdir(parents=True)
    (ckpt / "meta.json").write_text('{"epoch": 0, "saved_at": 1.0}')
    cb._started[trial.trial_id] = dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=2)
    tune_trial = SimpleNamespace(config={"trial_id": trial.trial_id},
                                 last_result={"ap": 0.5, "rank0_hostname": "gpu-node-7", "hostname": "head-node",
                                              "gpu_name": "NVIDIA A10G",
                                              "epochs_completed": 1, "checkpoint_path": "ignored",
                                              "worker_s": 1800.0})
    row = cb._row(tune_trial, "ok", None)
    assert abs(row["wall_s"] - 7200) < 60
    assert row["worker_s"] == 1800.0 and row["gpu_hours"] == 1800.0 * 0.5 / 3600  # 1 worker x 0.5 GPU
    assert row["hostname"] == "gpu-node-7" and row["gpu_name"] == "NVIDIA A10G"
    assert row["checkpoint_path"] == str(ckpt)
    running = cb._row(tune_trial, "running", None)
    assert running["wall_s"] is None and running.get("checkpoint_path") is None and running.get("gpu_hours") is None

"""The Tune side: connect to Ray, and run one Tune trial per trial config. Each trial is a function
trainable that builds and fits a Ray Train `TorchTrainer` (the Train V2 pattern); `ResultsCallback`
(callback.py) writes the rows of history.parquet and results.parquet on the driver."""
from __future__ import annotations

import os
from typing import Any

import ray
import ray.train
import ray.tune
from ray.tune.schedulers import ASHAScheduler

from detsweep.cluster.callback import ResultsCallback, extra_axis_columns
from detsweep.cluster.progress import ProgressCallback
from detsweep.cluster.worker import train_fn_per_worker
from detsweep.storage import TUNE_DIR, join, train_run_name
from detsweep.sweep.plan import placement_strategy, process_group_backend
from detsweep.sweep.spec import Sweep, TrialConfig


# The workers hold the trial's resources; the trial actor only waits on them. Zero CPU (so two
# 1-CPU workers fit on a 2-core laptop), and 1 MiB of Ray's "memory" resource because Tune
# refuses an all-zero request.
TRIAL_ACTOR_RESOURCES = {"CPU": 0, "memory": 2**20}


def connect(*, quiet: bool) -> tuple[dict[str, float], list[dict[str, float]]]:
    """Join the cluster Ray finds (RAY_ADDRESS, else a running one on this node) or start a local
    one; return its total CPU/GPU and each live node's resources."""
    # Save Tune's experiment state at every step (not every ~10 s): a driver killed right after a
    # trial ends must find that trial finished when it resumes.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "0")
    # The dashboard's Train tab shows each trial's run, workers and restarts (a local Ray started
    # here inherits it; cluster.yaml sets it on every node).
    os.environ.setdefault("RAY_TRAIN_ENABLE_STATE_TRACKING", "1")
    if not ray.is_initialized():
        ray.init(log_to_driver=not quiet)
    cluster = {k: float(ray.cluster_resources().get(k, 0.0)) for k in ("CPU", "GPU")}
    nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
    return cluster, nodes


def run_trial(config: dict[str, Any], trials: dict[str, dict[str, Any]]) -> None:
    """Tune function trainable: fit one trial's TorchTrainer. Tune's config holds only the trial
    id (a readable progress table and TensorBoard hparams); the full trial configs come through
    the object store (`tune.with_parameters`)."""
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    trial = trials[config["trial_id"]]
    res, ft = trial["resources"], trial["fault_tolerance"]
    gpus = res["gpus_per_worker"]
    per_worker = {"CPU": res["cpus_per_worker"], **({"GPU": gpus} if gpus > 0 else {})}
    nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
    trainer = TorchTrainer(
        train_fn_per_worker,
        train_loop_config={"trial": trial},
        torch_config=TorchConfig(backend=process_group_backend(trial)),
        scaling_config=ray.train.ScalingConfig(num_workers=res["ddp_workers"], use_gpu=gpus > 0,
                                               resources_per_worker=per_worker,
                                               placement_strategy=placement_strategy(trial, nodes)),
        run_config=ray.train.RunConfig(
            name=train_run_name(trial["trial_id"]), storage_path=trial["storage"],
            callbacks=[TuneReportCallback()],
            failure_config=ray.train.FailureConfig(max_failures=ft["max_failures"]),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=ft["keep"])),
    )
    trainer.fit()


def _trainable(trials: list[TrialConfig]) -> Any:
    by_id = {t.trial_id: t.to_dict() for t in trials}
    return ray.tune.with_resources(ray.tune.with_parameters(run_trial, trials=by_id), TRIAL_ACTOR_RESOURCES)


def _trial_name(trial: Any) -> str:
    return trial.config["trial_id"]


def build_tuner(sweep: Sweep, trials: list[TrialConfig], *, root: str, concurrency: int,
                quiet: bool = False) -> ray.tune.Tuner:
    """A fresh Tuner over `trials`: grid search over the expanded list, one Tune trial each."""
    scheduler = None
    if sweep.scheduler.kind == "asha":
        scheduler = ASHAScheduler(time_attr="epochs_completed", metric=sweep.scheduler.metric,
                                  mode=sweep.scheduler.mode,
                                  max_t=max(t.train.epochs for t in trials),
                                  grace_period=sweep.scheduler.grace_period,
                                  reduction_factor=sweep.scheduler.reduction_factor)
    return ray.tune.Tuner(
        _trainable(trials),
        param_space={"trial_id": ray.tune.grid_search([t.trial_id for t in trials])},
        tune_config=ray.tune.TuneConfig(
            max_concurrent_trials=concurrency, scheduler=scheduler,
            trial_name_creator=_trial_name, trial_dirname_creator=_trial_name),
        run_config=ray.tune.RunConfig(
            name=TUNE_DIR, storage_path=root,
            callbacks=callbacks(sweep, trials, root, quiet=quiet),
            failure_config=ray.tune.FailureConfig(max_failures=0),  # Train retries; Tune records
            # -q: our one-line-per-event progress instead of Tune's tables and result boxes.
            verbose=0 if quiet else 1),
    )


def callbacks(sweep: Sweep, trials: list[TrialConfig], root: str, *, quiet: bool) -> list[Any]:
    """The driver's callbacks: results rows always, the compact progress view with `quiet`."""
    by_id = {t.trial_id: t.to_dict() for t in trials}
    out: list[Any] = [ResultsCallback(root, sweep.name, by_id, extra_axis_columns(trials))]
    if quiet:
        out.append(ProgressCallback({t.trial_id: t.train.epochs for t in trials}))
    return out


def restore_tuner(sweep: Sweep, trials: list[TrialConfig], *, root: str) -> ray.tune.Tuner:
    """The interrupted sweep's Tuner: finished trials stay finished, unfinished ones continue
    from their Train checkpoints, errored ones as `fault_tolerance.on_resume_errored` says."""
    mode = sweep.fault_tolerance.on_resume_errored
    return ray.tune.Tuner.restore(
        join(root, TUNE_DIR), trainable=_trainable(trials),
        resume_unfinished=True, resume_errored=mode == "resume", restart_errored=mode == "restart")


def fit_sweep(sweep: Sweep, trials: list[TrialConfig], *, root: str, concurrency: int | None, resume: bool,
              quiet: bool) -> None:
    """Run the sweep to its end: a fresh Tuner, or on `resume` the interrupted one restored."""
    if resume:
        tuner = restore_tuner(sweep, trials, root=root)
    else:
        assert concurrency is not None
        tuner = build_tuner(sweep, trials, root=root, concurrency=concurrency, quiet=quiet)
    tuner.fit()

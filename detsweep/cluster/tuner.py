"""The Tune side: one Tune trial per trial config. Each trial is a function trainable that builds
and fits a Ray Train `TorchTrainer` (the Train V2 pattern); a driver-side callback turns every
reported epoch and every ended trial into rows of history.parquet and results.parquet."""
from __future__ import annotations

import datetime as dt
import logging
import os
import re
from typing import Any

import ray.tune
from ray.tune import Callback

from detsweep.config import Sweep, TrialConfig
from detsweep.provenance import provenance
from detsweep.results import RESULTS_SCHEMA, ResultsStore, gpu_hours, infer_extra_columns, latest_checkpoint
from detsweep.worker import train_fn_per_worker

log = logging.getLogger(__name__)

# The workers hold the trial's resources; the trial actor only waits on them. Zero CPU (so two
# 1-CPU workers fit on a 2-core laptop), and 1 MiB of Ray's "memory" resource because Tune
# refuses an all-zero request.
TRIAL_ACTOR_RESOURCES = {"CPU": 0, "memory": 2**20}
TUNE_DIR = "tune"  # Tune's experiment folder, under <storage>/<sweep>/
# Config columns of the results schema, from a trial config dict.
_CONFIG_COLUMNS = {
    "model": lambda t: t["model"], "regime": lambda t: t["regime"],
    "lora_rank": lambda t: t["lora"]["rank"] if t["lora"] else None,
    "lora_placement": lambda t: t["lora"]["placement"] if t["lora"] else None,
    "lora_alpha": lambda t: t["lora"]["alpha"] if t["lora"] else None,
    "backbone": lambda t: t[t["family"]]["backbone"],
    "num_queries": lambda t: t["detr"]["num_queries"] if t["family"] == "detr" else None,
    "dec_layers": lambda t: t["detr"]["dec_layers"] if t["family"] == "detr" else None,
    "epochs": lambda t: t["train"]["epochs"], "lr": lambda t: t["train"]["lr"],
    "seed": lambda t: t["train"]["seed"], "ddp_workers": lambda t: t["resources"]["ddp_workers"],
    "gpus_per_worker": lambda t: t["resources"]["gpus_per_worker"],
    "data": lambda t: f"{t['data']['kind']}:{t['data']['root']}",
}
# Grid axes that already have a config column of their own get no extra column.
_AXES_WITH_COLUMNS = {"lora.rank", "lora.placement", "lora.alpha", "train.lr", "train.seed", "train.epochs",
                      "model.detr.num_queries", "model.detr.dec_layers", "model.detr.backbone",
                      "model.faster_rcnn.backbone", "resources.ddp_workers", "resources.gpus_per_worker"}
# Reported keys that the driver fills in itself (`hostname` from the worker's `rank0_hostname`:
# on a cluster the driver runs on the head node, the trial on a GPU node).
_SKIP_REPORTED = {"sweep", "trial_id", "status", "error", "wall_s", "gpu_hours", "started_at", "finished_at",
                  "detsweep_version", "git_sha", "torch_version", "ray_version", "checkpoint_path"}


def extra_axis_columns(trials: list[TrialConfig]) -> dict[str, Any]:
    """Result columns for the grid axes that have none: dotted key with `.` -> `_`."""
    values: dict[str, list[Any]] = {}
    for t in trials:
        for k, v in t.axes.items():
            if k not in _AXES_WITH_COLUMNS:
                values.setdefault(k, []).append(v)
    return infer_extra_columns(values)


def run_trial(config: dict[str, Any], trials: dict[str, dict[str, Any]]) -> None:
    """Tune function trainable: fit one trial's TorchTrainer. Tune's config holds only the trial
    id (a readable progress table and TensorBoard hparams); the full trial configs come through
    the object store (`tune.with_parameters`)."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    trial = trials[config["trial_id"]]
    res, ft = trial["resources"], trial["fault_tolerance"]
    gpus = res["gpus_per_worker"]
    per_worker = {"CPU": res["cpus_per_worker"], **({"GPU": gpus} if gpus > 0 else {})}
    backend = res["backend"] if res["backend"] != "auto" else ("nccl" if gpus > 0 else "gloo")
    trainer = TorchTrainer(
        train_fn_per_worker,
        train_loop_config={"trial": trial},
        torch_config=TorchConfig(backend=backend),
        scaling_config=ray.train.ScalingConfig(num_workers=res["ddp_workers"], use_gpu=gpus > 0,
                                               resources_per_worker=per_worker),
        run_config=ray.train.RunConfig(
            # Named after the trial id, so a resumed trial finds its own checkpoints.
            name=f"train-{trial['trial_id']}", storage_path=trial["storage"],
            callbacks=[TuneReportCallback()],
            failure_config=ray.train.FailureConfig(max_failures=ft["max_failures"]),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=ft["checkpoints_to_keep"])),
    )
    trainer.fit()


def error_line(text: str) -> str:
    """The innermost `SomeError: message` line of a (possibly nested) Ray traceback."""
    wrappers = ("TrainingFailedError", "RayTaskError", "TuneError", "RayActorError", "WorkerGroupError",
                "ControllerError", "TrainingFailed")
    best = None
    for line in text.splitlines():
        m = re.match(r"^\s*(?:[\w.]+\.)?(\w*(?:Error|Exception|Interrupt))(?:\([^)]*\))?: (.+)$", line)
        if m and not any(w in m.group(1) for w in wrappers):
            best = f"{m.group(1)}: {m.group(2).strip()}"
    if best is None:
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        best = lines[-1] if lines else "unknown error"
    return best[:2000]


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class ResultsCallback(Callback):
    """Driver side: rows written as trials report and end, each write atomic."""

    def __init__(self, root: str, sweep_name: str, trials: dict[str, dict[str, Any]],
                 extra_columns: dict[str, Any]):
        self.root, self.sweep_name, self.trials, self.extra_columns = root, sweep_name, trials, extra_columns
        self._started: dict[str, dt.datetime] = {}
        self._prov: dict[str, Any] | None = None

    @property
    def store(self) -> ResultsStore:
        return ResultsStore(self.root)

    def _row(self, trial: Any, status: str, error: str | None) -> dict[str, Any]:
        tid = trial.config["trial_id"]
        cfg = self.trials[tid]
        started = self._started.get(tid) or _now()
        finished = _now()
        last = dict(trial.last_result or {})
        if self._prov is None:
            self._prov = provenance()
        row: dict[str, Any] = {"sweep": self.sweep_name, "trial_id": tid, "status": status, "error": error}
        row.update({col: fn(cfg) for col, fn in _CONFIG_COLUMNS.items()})
        row.update({k.replace(".", "_"): v for k, v in cfg["axes"].items()
                    if k.replace(".", "_") in self.extra_columns})
        row.update({k: v for k, v in last.items() if k in RESULTS_SCHEMA.names and k not in _SKIP_REPORTED})
        row["wall_s"] = (finished - started).total_seconds() if status != "running" else None
        res = cfg["resources"]
        if row["wall_s"] is not None:
            row["gpu_hours"] = gpu_hours(row["wall_s"], res["ddp_workers"] * res["gpus_per_worker"])
            row["checkpoint_path"] = latest_checkpoint(f"{cfg['storage']}/train-{tid}")
        row.update(self._prov)
        row["hostname"] = last.get("rank0_hostname") or self._prov["hostname"]
        row["gpu_name"] = last.get("gpu_name")
        row["started_at"] = started
        row["finished_at"] = finished if status != "running" else None
        return row

    def _write(self, row: dict[str, Any]) -> None:
        self.store.upsert_trial(row, self.extra_columns)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        tid = trial.config["trial_id"]
        if tid not in self._started:
            # A resumed sweep keeps the trial's first start: wall_s spans any interruption.
            earlier = self.store.read_results()
            rows = [] if earlier is None else [r for r in earlier.select(["trial_id", "started_at"]).to_pylist()
                                               if r["trial_id"] == tid and r["started_at"] is not None]
            self._started[tid] = rows[0]["started_at"] if rows else _now()
        self._write(self._row(trial, "running", None))

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        if "epoch" not in result:
            return
        keep = {k: v for k, v in result.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool)
                and not re.match(r"^(time_|timestamp|timesteps_total|training_iteration|iterations_since|pid|done)", k)}
        self.store.upsert_history([{"sweep": self.sweep_name, "trial_id": trial.config["trial_id"],
                                    "reported_at": _now(), **keep}])

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        cfg = self.trials[trial.config["trial_id"]]
        done = (trial.last_result or {}).get("epochs_completed", 0)
        status = "ok" if done >= cfg["train"]["epochs"] else "stopped"  # a scheduler stopped it early
        self._write(self._row(trial, status, None))

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        # Tune has just written the traceback to the trial's local error file; its copy in
        # storage (`trial.get_error()`) is only synced later.
        if trial.error_file and os.path.exists(trial.error_file):
            with open(trial.error_file) as f:
                text = f.read()
        else:
            text = str(trial.get_error() or "")
        self._write(self._row(trial, "error", error_line(text) if text else "unknown error"))


def build_tuner(sweep: Sweep, trials: list[TrialConfig], *, root: str, concurrency: int) -> "ray.tune.Tuner":
    """A fresh Tuner over `trials`: grid search over the expanded list, one Tune trial each."""
    from ray.tune.schedulers import ASHAScheduler

    scheduler = None
    if sweep.scheduler.kind == "asha":
        scheduler = ASHAScheduler(time_attr="epochs_completed", metric=sweep.scheduler.metric,
                                  mode=sweep.scheduler.mode,
                                  max_t=max(t.train.epochs for t in trials),
                                  grace_period=sweep.scheduler.grace_period,
                                  reduction_factor=sweep.scheduler.reduction_factor)
    by_id = {t.trial_id: t.to_dict() for t in trials}
    return ray.tune.Tuner(
        _trainable(by_id),
        param_space={"trial_id": ray.tune.grid_search(list(by_id))},
        tune_config=ray.tune.TuneConfig(
            max_concurrent_trials=concurrency, scheduler=scheduler,
            trial_name_creator=_trial_name, trial_dirname_creator=_trial_name),
        run_config=ray.tune.RunConfig(
            name=TUNE_DIR, storage_path=root,
            callbacks=[ResultsCallback(root, sweep.name, by_id, extra_axis_columns(trials))],
            failure_config=ray.tune.FailureConfig(max_failures=0),  # Train retries; Tune records
            verbose=1),
    )


def _trainable(by_id: dict[str, dict[str, Any]]) -> Any:
    return ray.tune.with_resources(ray.tune.with_parameters(run_trial, trials=by_id), TRIAL_ACTOR_RESOURCES)


def restore_tuner(sweep: Sweep, trials: list[TrialConfig], *, root: str) -> "ray.tune.Tuner":
    """The interrupted sweep's Tuner: finished trials stay finished, unfinished ones continue
    from their Train checkpoints, errored ones as `fault_tolerance.on_resume_errored` says."""
    mode = sweep.fault_tolerance.on_resume_errored
    return ray.tune.Tuner.restore(
        f"{root}/{TUNE_DIR}", trainable=_trainable({t.trial_id: t.to_dict() for t in trials}),
        resume_unfinished=True, resume_errored=mode == "resume", restart_errored=mode == "restart")


def _trial_name(trial: Any) -> str:
    return trial.config["trial_id"]

"""The driver side of a sweep: a Tune callback that turns every reported epoch into rows of
history.parquet and every started or ended trial into its row of results.parquet (atomic writes)."""
from __future__ import annotations

import datetime as dt
import os
import re
from typing import Any

from ray.tune import Callback

from detsweep.checkpoint import latest_checkpoint
from detsweep.provenance import provenance
from detsweep.results import (DRIVER_COLUMNS, KEYS_WITH_COLUMNS, RESULTS_SCHEMA, ResultsStore, column_name,
                              config_values, gpu_hours, infer_extra_columns)
from detsweep.storage import join, train_run_name
from detsweep.sweep.cost import Pricing, resources_of
from detsweep.sweep.search import Space, sampled_trial
from detsweep.sweep.spec import TrialConfig


def extra_axis_columns(trials: list[TrialConfig]) -> dict[str, Any]:
    """Result columns for the grid axes that have none: dotted key with `.` -> `_`."""
    values: dict[str, list[Any]] = {}
    for t in trials:
        for k, v in t.axes.items():
            if k not in KEYS_WITH_COLUMNS:
                values.setdefault(k, []).append(v)
    return infer_extra_columns(values)


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
                 extra_columns: dict[str, Any], space: Space | None = None, prices: Pricing | None = None):
        """`trials`: the grid's trial configs by id; with a search's `space`, a sampled trial's config is
        built from its Tune config (the point). `prices`: the sweep's, for `cost_usd` (None: no column)."""
        self.root, self.sweep_name, self.trials, self.extra_columns = root, sweep_name, trials, extra_columns
        self.space, self.prices = space, prices
        self._started: dict[str, dt.datetime] = {}
        self._prov: dict[str, Any] | None = None

    def _config(self, trial: Any) -> dict[str, Any]:
        """The trial's config dict (`TrialConfig.to_dict()`)."""
        tid = trial.config["trial_id"]
        if tid not in self.trials and self.space is not None:
            self.trials[tid] = sampled_trial(self.space, trial.config).to_dict()
        return self.trials[tid]

    @property
    def store(self) -> ResultsStore:
        return ResultsStore(self.root)

    def _row(self, trial: Any, status: str, error: str | None) -> dict[str, Any]:
        tid = trial.config["trial_id"]
        cfg = self._config(trial)
        started = self._started.get(tid) or _now()
        finished = _now()
        last = dict(trial.last_result or {})
        if self._prov is None:
            self._prov = provenance()
        row: dict[str, Any] = {"sweep": self.sweep_name, "trial_id": tid, "status": status, "error": error}
        config = config_values(cfg)
        row.update(config)
        row.update({column_name(k): v for k, v in cfg["axes"].items() if column_name(k) in self.extra_columns})
        # A report's `lr` is the schedule's rate at its epoch; the `lr` column is the trial's configured one.
        row.update({k: v for k, v in last.items()
                    if k in RESULTS_SCHEMA.names and k not in DRIVER_COLUMNS and k not in config})
        row["wall_s"] = (finished - started).total_seconds() if status != "running" else None
        res = cfg["resources"]
        if row["wall_s"] is not None:
            # GPU time is the workers' own: summed over attempts from each worker group's start to its
            # last report, so a node booting or the downtime before a --resume costs nothing.
            held = last.get("worker_s")
            row["gpu_hours"] = None if held is None else gpu_hours(held, res["ddp_workers"] * res["gpus_per_worker"])
            row["cost_usd"] = None if held is None or self.prices is None else self.prices.trial_usd(resources_of(cfg),
                                                                                                     held)
            row["checkpoint_path"] = latest_checkpoint(join(cfg["storage"], train_run_name(tid)))
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
        cfg = self._config(trial)
        done = (trial.last_result or {}).get("epochs_completed", 0)
        status = "ok" if done >= cfg["train"]["epochs"] else "stopped"  # a scheduler or train.patience
        reason = (trial.last_result or {}).get("stop_reason")
        if status == "stopped" and reason is None:
            reason = "stopped by the scheduler"
        self._write(self._row(trial, status, reason))

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        # Tune has just written the traceback to the trial's local error file; its copy in
        # storage (`trial.get_error()`) is only synced later.
        if trial.error_file and os.path.exists(trial.error_file):
            with open(trial.error_file) as f:
                text = f.read()
        else:
            text = str(trial.get_error() or "")
        self._write(self._row(trial, "error", error_line(text) if text else "unknown error"))

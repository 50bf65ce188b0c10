"""The results schema (one row per trial) and the per-epoch history: the one place where a results
column is defined, with the trial-config value it shows; `ResultsStore` reads and writes both files.

Used by the sweep driver and the frontier; nothing here imports ray or torch.
"""
from __future__ import annotations

import datetime as dt
import json
import math
import numbers
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from detsweep.storage import HISTORY_FILE, RESULTS_FILE, is_local, join, read_parquet, write_parquet_atomic


STATUSES = ("ok", "error", "stopped", "running")
TIMESTAMP = pa.timestamp("us", tz="UTC")

_F64, _I32, _I64, _STR = pa.float64(), pa.int32(), pa.int64(), pa.string()
_QUALITY = ["ap", "ap50", "ap75", "ap_small", "ap_medium", "ap_large",
            "ar1", "ar10", "ar100", "ar_small", "ar_medium", "ar_large"]

def _lora(key: str) -> Callable[[dict[str, Any]], Any]:
    return lambda t: t["lora"][key] if t["lora"] else None


def _regime_detail(t: dict[str, Any]) -> str:
    if t["regime"] != "two_stage" or not t.get("two_stage"):
        return t["regime"]
    s1, s2 = t["two_stage"]["stage1"], t["two_stage"]["stage2"]
    return f"heads {s1['epochs']} ep lr {s1['lr']:g} -> {s2['regime']} lr {s2['lr']:g}"


def _detr(key: str) -> Callable[[dict[str, Any]], Any]:
    return lambda t: t["detector"][key] if t["family"] == "detr" else None


def _data_label(d: dict[str, Any]) -> str:
    """`kind:root` (synthetic: `:domain` when not the source), or `coco:<format>:<train annotations>`
    for explicit splits, whose root is unused."""
    if d.get("train"):
        return f"{d['kind']}:{d.get('format', 'auto')}:{d['train']['annotations']}"
    domain = d.get("domain", "source")
    return f"{d['kind']}:{d['root']}" + (f":{domain}" if d["kind"] == "synthetic" and domain != "source" else "")


@dataclass(frozen=True)
class ConfigColumn:
    """A results column that shows a trial's configuration.

    `get` reads it from a trial config dict (`TrialConfig.to_dict()`); `keys` are the dotted sweep
    keys it shows, so a grid axis on one of them gets no extra column; `replicate`: seed replicates
    share its value (all but the seed); `own_line`: report.md's Sweep section names it on a line."""

    name: str
    dtype: pa.DataType
    get: Callable[[dict[str, Any]], Any]
    keys: tuple[str, ...] = ()
    replicate: bool = True
    own_line: bool = False


# The one list of config columns (lora_* null where the trial has no LoRA, DETR's null for Faster R-CNN).
CONFIG_COLUMNS: tuple[ConfigColumn, ...] = (
    ConfigColumn("model", _STR, lambda t: t["model"], ("model",), own_line=True),
    ConfigColumn("regime", _STR, lambda t: t["regime"], ("regime",), own_line=True),
    # the regime, and a two_stage trial's stages: "heads 3 ep lr 0.001 -> full lr 1e-05"
    ConfigColumn("regime_detail", _STR, lambda t: _regime_detail(t)),
    ConfigColumn("lora_rank", _I32, _lora("rank"), ("lora.rank",)),
    ConfigColumn("lora_placement", _STR, _lora("placement"), ("lora.placement",)),
    ConfigColumn("lora_alpha", _F64, _lora("alpha"), ("lora.alpha",)),
    # JSON list of the module-name patterns when `lora.targets` replaces the placement, else null
    ConfigColumn("lora_targets", _STR, _lora("targets"), ("lora.targets",)),
    ConfigColumn("backbone", _STR, lambda t: t["detector"]["backbone"],
                 ("model.detr.backbone", "model.faster_rcnn.backbone"), own_line=True),
    ConfigColumn("num_queries", _I32, _detr("num_queries"), ("model.detr.num_queries",)),
    ConfigColumn("dec_layers", _I32, _detr("dec_layers"), ("model.detr.dec_layers",)),
    ConfigColumn("epochs", _I32, lambda t: t["train"]["epochs"], ("train.epochs",), own_line=True),
    ConfigColumn("lr", _F64, lambda t: t["train"]["lr"], ("train.lr",)),
    ConfigColumn("seed", _I64, lambda t: t["train"]["seed"], ("train.seed",), replicate=False),
    ConfigColumn("ddp_workers", _I32, lambda t: t["resources"]["ddp_workers"], ("resources.ddp_workers",)),
    ConfigColumn("gpus_per_worker", _F64, lambda t: t["resources"]["gpus_per_worker"],
                 ("resources.gpus_per_worker",)),
    ConfigColumn("data", _STR, lambda t: _data_label(t["data"]), own_line=True),
)
# Dotted sweep keys that already have a config column.
KEYS_WITH_COLUMNS = frozenset(k for c in CONFIG_COLUMNS for k in c.keys)
# Columns that replicates (the same config, other seeds) share, and those report.md names on a line.
REPLICATE_COLUMNS = ("sweep",) + tuple(c.name for c in CONFIG_COLUMNS if c.replicate)
OWN_LINE_COLUMNS = ("sweep",) + tuple(c.name for c in CONFIG_COLUMNS if c.own_line)
# Columns the driver fills in itself, never from a worker's report.
DRIVER_COLUMNS = frozenset({"sweep", "trial_id", "status", "error", "wall_s", "gpu_hours", "cost_usd",
                            "started_at", "finished_at", "detsweep_version", "git_sha", "torch_version", "ray_version",
                            "checkpoint_path", "hostname", "gpu_name"})


def config_values(trial: dict[str, Any]) -> dict[str, Any]:
    """The config columns of one trial config dict."""
    return {c.name: c.get(trial) for c in CONFIG_COLUMNS}


RESULTS_SCHEMA: pa.Schema = pa.schema(
    # identity
    [("sweep", _STR), ("trial_id", _STR), ("status", _STR), ("error", _STR)]
    # config
    + [(c.name, c.dtype) for c in CONFIG_COLUMNS]
    # quality: COCOeval's 12 bbox stats
    + [(name, _F64) for name in _QUALITY]
    # the best evaluation by eval.best_metric (the columns above are the final epoch's)
    + [("best_epoch", _I32)] + [(f"best_{name}", _F64) for name in _QUALITY + ["ece", "val_loss"]]
    + [("val_loss", _F64)]
    # calibration
    + [("ece", _F64), ("nll", _F64), ("brier", _F64), ("n_detections", _I64)]
    + [("dece", _F64)]  # D-ECE (Küppers et al. 2020): detections scoring >= eval.calibration.score_threshold
    # detection error breakdown (counts)
    + [(f"err_{kind}", _I64) for kind in ("cls", "loc", "dup", "bkg", "missed")]
    # cost (peak_vram_* null without CUDA)
    + [("total_params", _I64), ("trainable_params", _I64), ("trainable_frac", _F64), ("lora_params", _I64)]
    # two_stage: each stage's trainable params (trainable_params is stage 2's, what the frontier reads)
    + [("trainable_params_stage1", _I64), ("trainable_params_stage2", _I64)]
    + [(name, _F64) for name in ("peak_vram_train_mb", "peak_vram_eval_mb", "peak_vram_reserved_mb", "peak_rss_mb",
                                 "train_images_per_s", "eval_images_per_s", "train_s", "eval_s",
                                 "wall_s", "worker_s", "gpu_hours", "cost_usd")]
    + [("device", _STR), ("amp_dtype", _STR)]
    # run (per_class_ap and reliability are JSON text)
    + [("epochs_completed", _I32), ("checkpoint_path", _STR), ("per_class_ap", _STR), ("reliability", _STR)]
    + [("n_skipped_images", _I64), ("n_skipped_boxes", _I64)]  # dropped by data.on_invalid: skip
    # provenance
    + [(name, _STR) for name in ("detsweep_version", "git_sha", "torch_version", "ray_version",
                                 "hostname", "gpu_name", "gpu_uuid")]
    + [("started_at", TIMESTAMP), ("finished_at", TIMESTAMP)]
)
_HISTORY_KEYS = ("sweep", "trial_id", "epoch", "reported_at")


def column_name(dotted_key: str) -> str:
    """Column for a dotted sweep-grid key: ``train.weight_decay`` -> ``train_weight_decay``."""
    return dotted_key.replace(".", "_")


def infer_extra_columns(axes: Mapping[str, Iterable[Any]]) -> dict[str, pa.DataType]:
    """Columns for extra grid axes (dotted key -> values) that are not already in the schema.

    Type from the values: all bool -> bool, all int -> int64, all numeric -> float64, else string.
    """
    extra: dict[str, pa.DataType] = {}
    for key, values in axes.items():
        name = column_name(key)
        if name in RESULTS_SCHEMA.names:
            continue
        present = [v for v in values if v is not None]
        if present and all(isinstance(v, bool) for v in present):
            extra[name] = pa.bool_()
        elif present and all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in present):
            extra[name] = pa.int64()
        elif present and all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in present):
            extra[name] = pa.float64()
        else:
            extra[name] = pa.string()
    return extra


def results_schema(extra_columns: Mapping[str, pa.DataType] | None = None) -> pa.Schema:
    """RESULTS_SCHEMA followed by the extra sweep-axis columns, in the given order."""
    schema = RESULTS_SCHEMA
    for name, dtype in (extra_columns or {}).items():
        if name in schema.names:
            raise ValueError(f"extra column {name!r} clashes with a results column")
        schema = schema.append(pa.field(name, dtype))
    return schema


def _coerce(column: str, value: Any, dtype: pa.DataType) -> Any:
    """One python/numpy value -> a python value pyarrow accepts for ``dtype`` (None stays None)."""
    if value is None:
        return None
    kind = f"{value!r} ({type(value).__name__})"
    if pa.types.is_string(dtype):
        if isinstance(value, (dict, list, tuple)):
            return json.dumps(value, sort_keys=True)
        return str(value)
    if pa.types.is_boolean(dtype):
        if isinstance(value, bool) or type(value).__name__ == "bool_":
            return bool(value)
        raise ValueError(f"column {column!r}: cannot convert {kind} to bool")
    if pa.types.is_integer(dtype):
        if isinstance(value, numbers.Integral) and not isinstance(value, bool):
            return int(value)
        if isinstance(value, numbers.Real) and math.isnan(float(value)):
            return None  # pandas turns a null int into NaN; keep it a typed null
        if isinstance(value, numbers.Real) and math.isfinite(float(value)) and float(value).is_integer():
            return int(value)
        raise ValueError(f"column {column!r}: cannot convert {kind} to {dtype}")
    if pa.types.is_floating(dtype):
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            return float(value)
        raise ValueError(f"column {column!r}: cannot convert {kind} to {dtype}")
    if pa.types.is_timestamp(dtype):
        if isinstance(value, str):
            try:
                value = dt.datetime.fromisoformat(value)
            except ValueError:
                raise ValueError(f"column {column!r}: {value!r} is not an ISO-8601 timestamp") from None
        if isinstance(value, dt.datetime):
            # Naive datetimes are taken as UTC: the driver stamps with datetime.now(timezone.utc).
            return value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)
        raise ValueError(f"column {column!r}: cannot convert {kind} to a timestamp (datetime or ISO string)")
    raise AssertionError(f"unhandled type {dtype} for column {column!r}")


def rows_to_table(rows: list[dict], extra_columns: Mapping[str, pa.DataType] | None = None) -> pa.Table:
    """Build a table with ``results_schema(extra_columns)``; missing keys are null.

    Unknown keys raise ValueError naming them; ``status`` must be one of STATUSES.
    """
    schema = results_schema(extra_columns)
    known = set(schema.names)
    unknown = sorted({key for row in rows for key in row} - known)
    if unknown:
        raise ValueError(f"unknown result keys {unknown}; add them as extra_columns or drop them")
    for row in rows:
        status = row.get("status")
        if status is not None and status not in STATUSES:
            raise ValueError(f"trial {row.get('trial_id')!r}: status {status!r} is not one of {list(STATUSES)}")
    columns = [
        pa.array([_coerce(field.name, row.get(field.name), field.type) for row in rows], type=field.type)
        for field in schema
    ]
    return pa.Table.from_arrays(columns, schema=schema)


def gpu_hours(wall_s: float, gpus_held: float) -> float:
    """GPU-hours of a trial: wall seconds times GPUs held (fractional allowed), over 3600."""
    if wall_s < 0 or gpus_held < 0:
        raise ValueError(f"wall_s and gpus_held must be >= 0, got wall_s={wall_s}, gpus_held={gpus_held}")
    return wall_s * gpus_held / 3600.0


def _extra_columns_of(schema: pa.Schema) -> dict[str, pa.DataType]:
    return {f.name: f.type for f in schema if f.name not in RESULTS_SCHEMA.names}


class ResultsStore:
    """``results.parquet`` and ``history.parquet`` under one sweep folder (``<storage>/<sweep name>``).

    Every write rewrites the whole file atomically; only the driver writes, so there is no locking.
    """

    def __init__(self, root_uri: str) -> None:
        self.root_uri = str(root_uri).rstrip("/")
        if is_local(self.root_uri):
            self.root_uri = os.path.expanduser(self.root_uri)

    @property
    def results_uri(self) -> str:
        return join(self.root_uri, RESULTS_FILE)

    @property
    def history_uri(self) -> str:
        return join(self.root_uri, HISTORY_FILE)

    def read_results(self) -> pa.Table | None:
        """The current results table, or None before the first trial is written."""
        return read_parquet(self.results_uri)

    def read_history(self) -> pa.Table | None:
        """The current per-epoch history, or None before the first report."""
        return read_parquet(self.history_uri)

    def upsert_trial(self, row: dict, extra_columns: Mapping[str, pa.DataType] | None = None) -> None:
        """Replace the row with the same ``trial_id`` in place (first-seen order), else append."""
        if not row.get("trial_id"):
            raise ValueError(f"a results row needs a non-empty 'trial_id', got {row.get('trial_id')!r}")
        current = self.read_results()
        extra = _extra_columns_of(current.schema) if current is not None else {}
        for name, dtype in (extra_columns or {}).items():
            if name in extra and extra[name] != dtype:
                raise ValueError(f"extra column {name!r} is {extra[name]} in {self.results_uri}, got {dtype}")
            extra[name] = dtype
        rows = current.to_pylist() if current is not None else []
        index = {r["trial_id"]: i for i, r in enumerate(rows)}
        if row["trial_id"] in index:
            rows[index[row["trial_id"]]] = dict(row)
        else:
            rows.append(dict(row))
        write_parquet_atomic(rows_to_table(rows, extra), self.results_uri)

    def upsert_history(self, rows: list[dict]) -> None:
        """Merge per-epoch reports; one row per (trial_id, epoch), the latest upsert wins.

        A trial reports its epochs in order, so when epoch e arrives, that trial's rows for later
        epochs are orphans of an attempt that crashed before its checkpoint was saved (the
        restarted attempt resumed from an earlier one): they are dropped. Pass one trial's rows in
        the order they were reported.

        Each row needs ``trial_id`` and ``epoch``; ``sweep`` and ``reported_at`` (default: now, UTC)
        are kept; every other numeric value becomes a float64 column, non-numeric values are dropped.
        """
        current = self.read_history()
        merged: dict[tuple[str, int], dict] = {}
        for r in (current.to_pylist() if current is not None else []):
            merged[(r["trial_id"], r["epoch"])] = r
        now = dt.datetime.now(dt.timezone.utc)
        for r in rows:
            if r.get("trial_id") is None or r.get("epoch") is None:
                raise ValueError(f"a history row needs 'trial_id' and 'epoch', got keys {sorted(r)}")
            clean = {k: r.get(k) for k in _HISTORY_KEYS}
            clean["epoch"] = _coerce("epoch", r["epoch"], pa.int32())
            clean["reported_at"] = _coerce("reported_at", r.get("reported_at") or now, TIMESTAMP)
            clean.update({k: float(v) for k, v in r.items()
                          if k not in _HISTORY_KEYS and isinstance(v, numbers.Real)})
            key = (clean["trial_id"], clean["epoch"])
            for stale in [k for k in merged if k[0] == key[0] and k[1] >= key[1]]:
                merged.pop(stale)  # orphaned later epochs, and this epoch's older report
            merged[key] = clean
        trial_order = {t: i for i, t in enumerate(dict.fromkeys(k[0] for k in merged))}
        ordered = sorted(merged.values(), key=lambda r: (trial_order[r["trial_id"]], r["epoch"]))
        metrics = list(dict.fromkeys(k for r in ordered for k in r if k not in _HISTORY_KEYS))
        schema = pa.schema([("sweep", _STR), ("trial_id", _STR), ("epoch", _I32), ("reported_at", TIMESTAMP)]
                           + [(m, _F64) for m in metrics])
        table = pa.Table.from_pylist([{k: r.get(k) for k in schema.names} for r in ordered], schema=schema)
        write_parquet_atomic(table, self.history_uri)

    def trial_ids(self, status: str | None = None) -> set[str]:
        """Trial ids in results.parquet, optionally only those with this status."""
        if status is not None and status not in STATUSES:
            raise ValueError(f"status {status!r} is not one of {list(STATUSES)}")
        table = self.read_results()
        if table is None:
            return set()
        ids = table.column("trial_id").to_pylist()
        if status is None:
            return set(ids)
        return {t for t, s in zip(ids, table.column("status").to_pylist()) if s == status}

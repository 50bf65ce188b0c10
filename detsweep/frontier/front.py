"""The front of one results table: reading results.parquet, ranking its trials, the `Frontier` that
plots.py and report.py render and cli.py writes. Above pareto.py (the algorithms); no plots, no writes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from detsweep.frontier.pareto import (ADDED_COLUMNS, REFERENCE_POINT, Normalisation, Objective, aggregate_replicates,
                                      column_list, fit_normalisation, front_dominators, hypervolume, normalise,
                                      pareto_ranks)
from detsweep.storage import read_parquet

# Why a trial without an error message was excluded, by status.
_STATUS_REASONS = {"stopped": "stopped early by the scheduler", "running": "unfinished (running)",
                   "error": "no error message"}


class FrontierError(ValueError):
    """A user error (bad objective, unusable file); the CLI prints it on one line and exits 2."""


@dataclass
class Frontier:
    """The front of one results table. values: [n, k] raw objective values (NaN where missing)."""

    sweep: str
    objectives: list[Objective]
    table: pa.Table  # every input row + pareto_rank (null when excluded) + dominated_by
    values: np.ndarray
    valid: np.ndarray  # [n] bool: status ok and every objective finite
    norms: list[Normalisation]
    hypervolume: float
    excluded: list[dict]
    notes: list[str] = field(default_factory=list)
    replicates: pa.Table | None = None  # one row per seed-group, ranked on the means
    replicates_hypervolume: float | None = None

    @property
    def reference(self) -> list[float]:
        return [REFERENCE_POINT] * len(self.objectives)

    @property
    def ranks(self) -> list[int | None]:
        return self.table.column("pareto_rank").to_pylist()


def read_results(uri: str) -> pa.Table:
    """The results table at a local path or a URI (through pyarrow.fs); FrontierError when it is
    missing or not Parquet."""
    try:
        table = read_parquet(uri)
    except (pa.ArrowInvalid, OSError) as e:
        raise FrontierError(f"cannot read {uri} as Parquet: {e}") from None
    if table is None:
        raise FrontierError(f"results file not found: {uri}")
    return table


def with_epoch(table: pa.Table, use: str) -> pa.Table:
    """The results as of each trial's best evaluation (`use="best"`: every `best_<metric>` column that is
    filled in replaces `<metric>`, row by row) or as of its final epoch (`use="final"`: unchanged)."""
    if use == "final":
        return table
    for name in table.column_names:
        base = name.removeprefix("best_")
        if name.startswith("best_") and base in table.column_names and name != "best_epoch":
            best, final = table.column(name).to_pylist(), table.column(base).to_pylist()
            merged = [b if b is not None else f for b, f in zip(best, final)]
            table = table.set_column(table.column_names.index(base), base,
                                     pa.array(merged, type=table.schema.field(base).type))
    return table


def resolve_objectives(table: pa.Table, objectives: list[Objective]) -> tuple[list[Objective], list[str]]:
    """Check objective columns exist and are numeric; swap in peak_rss_mb for an all-null VRAM column.

    Nulls are counted over finished (status ok) rows only: failed, stopped and running trials have
    no metrics. With no finished row there is nothing to check, and the objectives stay as given.
    """
    numeric = [f.name for f in table.schema
               if (pa.types.is_integer(f.type) or pa.types.is_floating(f.type)) and f.name not in ADDED_COLUMNS]
    finished = table.filter(pc.equal(table.column("status"), "ok")) if "status" in table.column_names \
        else table.slice(0, 0)

    def all_null(column: str) -> bool:
        return finished.num_rows > 0 and finished.column(column).null_count == finished.num_rows

    resolved, notes = [], []
    for obj in objectives:
        if obj.column not in numeric:
            raise FrontierError(f"objective column {obj.column!r} is not a numeric column of the results; "
                                f"numeric columns: {numeric}")
        if all_null(obj.column):
            stand_in = "peak_rss_mb"
            if obj.column.startswith("peak_vram") and stand_in in numeric and not all_null(stand_in) \
                    and stand_in not in [o.column for o in objectives]:
                notes.append(f"{obj.column} is null in every finished trial (no CUDA): {stand_in} stands in for it")
                obj = Objective(stand_in, obj.direction)
            else:
                raise FrontierError(f"objective column {obj.column!r} is null in every finished trial (status ok)")
        resolved.append(obj)
    return resolved, notes


def _column_values(table: pa.Table, column: str) -> np.ndarray:
    return np.array([math.nan if v is None else v for v in table.column(column).to_pylist()], dtype=np.float64)


def compute_frontier(table: pa.Table, objectives: list[Objective], sweep: str | None = None) -> Frontier:
    """Rank the valid rows (status ok, every objective finite); the others get a null rank.

    The returned table is ``table`` plus ``pareto_rank`` (int32; 1 = front) and ``dominated_by``
    (list of the front trial_ids dominating the row; empty on the front, null when excluded).
    """
    table = table.drop_columns([c for c in ADDED_COLUMNS if c in table.column_names])
    objectives, notes = resolve_objectives(table, objectives)
    values = np.column_stack([_column_values(table, o.column) for o in objectives])
    status = column_list(table, "status")
    trial_ids = [str(t) for t in column_list(table, "trial_id")]
    valid = np.array([s == "ok" for s in status]) & np.isfinite(values).all(axis=1)
    maximise = [o.maximise for o in objectives]

    idx = np.flatnonzero(valid)
    ranks_valid = pareto_ranks(values[idx], maximise)
    dominators = front_dominators(values[idx], maximise, ranks_valid)
    ranks: list[int | None] = [None] * len(table)
    dominated_by: list[list[str] | None] = [None] * len(table)
    for i, rank, doms in zip(idx, ranks_valid, dominators):
        ranks[i] = int(rank)
        dominated_by[i] = [trial_ids[idx[j]] for j in doms]
    out = table.append_column("pareto_rank", pa.array(ranks, pa.int32()))
    out = out.append_column("dominated_by", pa.array(dominated_by, pa.list_(pa.string())))

    norms = fit_normalisation(values[idx], objectives)
    front = values[idx][ranks_valid == 1]
    hv = hypervolume(normalise(front, norms), REFERENCE_POINT)
    errors = column_list(table, "error")
    excluded = []
    for i in np.flatnonzero(~valid):
        missing = [o.column for j, o in enumerate(objectives) if not np.isfinite(values[i, j])]
        excluded.append({"trial_id": trial_ids[i], "status": status[i],
                         "reason": _exclusion_reason(status[i], errors[i], missing)})
    if sweep is None:
        names = sorted({s for s in column_list(table, "sweep") if s})
        sweep = ", ".join(names) or "unnamed sweep"
    result = Frontier(sweep, objectives, out, values, valid, norms, hv, excluded, notes)
    replicates = aggregate_replicates(out, values, valid, objectives, norms)
    if replicates is not None:
        result.replicates, result.replicates_hypervolume = replicates
    return result


def _exclusion_reason(status: str | None, error: str | None, missing: list[str]) -> str:
    """Why a row is not ranked: its error message, else what its status or its missing values say."""
    if error:
        return error
    if status == "ok":
        return f"missing {', '.join(missing)}"
    return _STATUS_REASONS.get(status, f"status {status!r}")


def headline_index(fr: Frontier) -> int:
    """The objective plotted on y and used for 'best per regime': the first max objective."""
    return next((j for j, o in enumerate(fr.objectives) if o.maximise), 0)

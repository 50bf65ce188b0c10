"""Pareto front of a sweep's results.parquet: frontier.parquet, replicates.parquet, PNG plots, report.md.

``python -m detsweep.frontier RESULTS.parquet [--objectives ap:max,...] [--out DIR] [--no-plots]``
Outputs go to a local folder or, for a URI (``s3://``, ``gs://``, ``file://``), through pyarrow.fs.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from detsweep import pareto
from detsweep.pareto import Normalisation, Objective
from detsweep.results import exists, filesystem, read_parquet, write_bytes_atomic, write_parquet_atomic

DEFAULT_OBJECTIVES = "ap:max,trainable_params:min,peak_vram_train_mb:min,ece:min"
METADATA_KEY = b"detsweep.frontier"
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
        return [pareto.REFERENCE_POINT] * len(self.objectives)

    @property
    def ranks(self) -> list[int | None]:
        return self.table.column("pareto_rank").to_pylist()


def resolve_objectives(table: pa.Table, objectives: list[Objective]) -> tuple[list[Objective], list[str]]:
    """Check objective columns exist and are numeric; swap in peak_rss_mb for an all-null VRAM column.

    Nulls are counted over finished (status ok) rows only: failed, stopped and running trials have
    no metrics. With no finished row there is nothing to check, and the objectives stay as given.
    """
    numeric = [f.name for f in table.schema
               if (pa.types.is_integer(f.type) or pa.types.is_floating(f.type)) and f.name not in pareto.ADDED_COLUMNS]
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


def column_list(table: pa.Table, name: str) -> list:
    """A column's values as a list; all None when the table lacks it (older or partial results)."""
    return table.column(name).to_pylist() if name in table.column_names else [None] * len(table)


def _column_values(table: pa.Table, column: str) -> np.ndarray:
    return np.array([math.nan if v is None else v for v in table.column(column).to_pylist()], dtype=np.float64)


def compute_frontier(table: pa.Table, objectives: list[Objective], sweep: str | None = None) -> Frontier:
    """Rank the valid rows (status ok, every objective finite); the others get a null rank.

    The returned table is ``table`` plus ``pareto_rank`` (int32; 1 = front) and ``dominated_by``
    (list of the front trial_ids dominating the row; empty on the front, null when excluded).
    """
    table = table.drop_columns([c for c in pareto.ADDED_COLUMNS if c in table.column_names])
    objectives, notes = resolve_objectives(table, objectives)
    values = np.column_stack([_column_values(table, o.column) for o in objectives])
    status = column_list(table, "status")
    trial_ids = [str(t) for t in column_list(table, "trial_id")]
    valid = np.array([s == "ok" for s in status]) & np.isfinite(values).all(axis=1)
    maximise = [o.maximise for o in objectives]

    idx = np.flatnonzero(valid)
    ranks_valid = pareto.pareto_ranks(values[idx], maximise)
    dominators = pareto.front_dominators(values[idx], maximise, ranks_valid)
    ranks: list[int | None] = [None] * len(table)
    dominated_by: list[list[str] | None] = [None] * len(table)
    for i, rank, doms in zip(idx, ranks_valid, dominators):
        ranks[i] = int(rank)
        dominated_by[i] = [trial_ids[idx[j]] for j in doms]
    out = table.append_column("pareto_rank", pa.array(ranks, pa.int32()))
    out = out.append_column("dominated_by", pa.array(dominated_by, pa.list_(pa.string())))

    norms = pareto.fit_normalisation(values[idx], objectives)
    front = values[idx][ranks_valid == 1]
    hv = pareto.hypervolume(pareto.normalise(front, norms), pareto.REFERENCE_POINT)
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
    replicates = pareto.aggregate_replicates(out, values, valid, objectives, norms)
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


def _metadata(fr: Frontier, hypervolume: float | None) -> dict[bytes, bytes]:
    info = {"objectives": [str(o) for o in fr.objectives], "reference_point": fr.reference,
            "normalisation": [n.describe() for n in fr.norms], "hypervolume": hypervolume, "notes": fr.notes}
    return {METADATA_KEY: json.dumps(info).encode()}


def _join(folder: str, name: str) -> str:
    """``folder/name`` for a local folder or a URI."""
    return f"{folder.rstrip('/')}/{name}" if "://" in folder else str(Path(folder).expanduser() / name)


def write_outputs(fr: Frontier, out: str | Path, plots: bool = True) -> list[str]:
    """Write frontier.parquet (+ replicates.parquet, PNGs) and report.md into ``out``, a local
    folder or a URI (through pyarrow.fs); return what was written. No plots when nothing is ranked."""
    out = str(out)
    fs, folder = filesystem(out)
    fs.create_dir(folder, recursive=True)
    written = [_join(out, "frontier.parquet")]
    write_parquet_atomic(fr.table.replace_schema_metadata(_metadata(fr, fr.hypervolume)), written[0])
    replicates = _join(out, "replicates.parquet")
    if fr.replicates is not None:
        meta = _metadata(fr, fr.replicates_hypervolume)
        write_parquet_atomic(fr.replicates.replace_schema_metadata(meta), replicates)
        written.append(replicates)
    elif exists(replicates):  # left by an earlier run that had seed replicates
        fs.delete_file(f"{folder.rstrip('/')}/replicates.parquet")
    images: dict[str, bytes] = {}
    if plots and fr.valid.any():
        from detsweep.frontier_plots import plot_frontier  # matplotlib only when plots are wanted

        images = plot_frontier(fr)
    for name, png in images.items():
        write_bytes_atomic(png, _join(out, name))
        written.append(_join(out, name))
    from detsweep.frontier_report import render_markdown  # it imports this module's Frontier

    written.append(_join(out, "report.md"))
    write_bytes_atomic(render_markdown(fr, list(images)).encode(), written[-1])
    return written


def headline_index(fr: Frontier) -> int:
    """The objective plotted on y and used for 'best per regime': the first max objective."""
    return next((j for j, o in enumerate(fr.objectives) if o.maximise), 0)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m detsweep.frontier",
        description="Pareto front of a sweep's results.parquet: writes frontier.parquet (pareto_rank, "
                    "dominated_by), replicates.parquet when seeds repeat, PNG plots and report.md.")
    p.add_argument("results", help="path or URI (s3://, gs://) of results.parquet")
    p.add_argument("--objectives", default=DEFAULT_OBJECTIVES,
                   help="comma-separated COLUMN:DIRECTION with DIRECTION in {max,min} (default: %(default)s)")
    p.add_argument("--out", default=None,
                   help="output folder, local or a URI written through pyarrow.fs (default: the results file's folder)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    return p


def main(argv: list[str] | None = None) -> int:
    """CLI entry; returns the exit code (2 for user errors, one line on stderr)."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(levelname)s: %(message)s")
    remote = "://" in args.results  # s3://, gs://, file://: read through pyarrow.fs
    path = args.results if remote else Path(args.results).expanduser()
    try:
        objectives = pareto.parse_objectives(args.objectives)
        try:
            table = read_parquet(str(path))  # local or through pyarrow.fs
        except (pa.ArrowInvalid, OSError) as e:
            raise FrontierError(f"cannot read {path} as Parquet: {e}") from None
        if table is None:
            raise FrontierError(f"results file not found: {path}")
        fr = compute_frontier(table, objectives)
    except ValueError as e:
        print(f"detsweep.frontier: error: {e}", file=sys.stderr)
        return 2
    out = args.out or (path.rstrip("/").rsplit("/", 1)[0] if remote else str(path.parent))
    written = write_outputs(fr, out, plots=not args.no_plots)
    from detsweep.frontier_report import render_stdout

    sys.stdout.write(render_stdout(fr, written))
    return 0


if __name__ == "__main__":
    sys.exit(main())

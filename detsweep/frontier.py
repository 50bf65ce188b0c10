"""Pareto front of a sweep's results.parquet: frontier.parquet, replicates.parquet, PNG plots, report.md.

``python -m detsweep.frontier RESULTS.parquet [--objectives ap:max,...] [--out DIR] [--no-plots]``
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from detsweep import pareto
from detsweep.pareto import Normalisation, Objective
from detsweep.results import read_parquet, write_parquet_atomic

DEFAULT_OBJECTIVES = "ap:max,trainable_params:min,peak_vram_train_mb:min,ece:min"
METADATA_KEY = b"detsweep.frontier"
# Label every point up to this many; beyond it only the connected trade-off, to stay readable.


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
    """Check objective columns exist and are numeric; swap in peak_rss_mb for an all-null VRAM column."""
    numeric = [f.name for f in table.schema
               if (pa.types.is_integer(f.type) or pa.types.is_floating(f.type)) and f.name not in pareto.ADDED_COLUMNS]
    resolved, notes = [], []
    for obj in objectives:
        if obj.column not in numeric:
            raise FrontierError(f"objective column {obj.column!r} is not a numeric column of the results; "
                                f"numeric columns: {numeric}")
        if table.column(obj.column).null_count == len(table):
            stand_in = "peak_rss_mb"
            if obj.column.startswith("peak_vram") and stand_in in numeric and \
                    table.column(stand_in).null_count < len(table) and stand_in not in [o.column for o in objectives]:
                notes.append(f"{obj.column} is null in every row (no CUDA): {stand_in} stands in for it")
                obj = Objective(stand_in, obj.direction)
            else:
                raise FrontierError(f"objective column {obj.column!r} is null in every row")
        resolved.append(obj)
    return resolved, notes


def _column(table: pa.Table, name: str) -> list:
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
    status = _column(table, "status")
    trial_ids = [str(t) for t in _column(table, "trial_id")]
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
    errors = _column(table, "error")
    excluded = []
    for i in np.flatnonzero(~valid):
        missing = [o.column for j, o in enumerate(objectives) if not np.isfinite(values[i, j])]
        reason = errors[i] or (f"missing {', '.join(missing)}" if status[i] == "ok" else "no error message")
        excluded.append({"trial_id": trial_ids[i], "status": status[i], "reason": reason})
    if sweep is None:
        names = sorted({s for s in _column(table, "sweep") if s})
        sweep = ", ".join(names) or "unnamed sweep"
    result = Frontier(sweep, objectives, out, values, valid, norms, hv, excluded, notes)
    replicates = pareto.aggregate_replicates(out, values, valid, objectives, norms)
    if replicates is not None:
        result.replicates, result.replicates_hypervolume = replicates
    return result


def _metadata(fr: Frontier, hypervolume: float | None) -> dict[bytes, bytes]:
    info = {"objectives": [str(o) for o in fr.objectives], "reference_point": fr.reference,
            "normalisation": [n.describe() for n in fr.norms], "hypervolume": hypervolume, "notes": fr.notes}
    return {METADATA_KEY: json.dumps(info).encode()}


def write_outputs(fr: Frontier, out_dir: Path, plots: bool = True) -> list[Path]:
    """Write frontier.parquet (+ replicates.parquet, PNGs) and report.md into out_dir; return the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / "frontier.parquet"]
    write_parquet_atomic(fr.table.replace_schema_metadata(_metadata(fr, fr.hypervolume)), str(written[0]))
    if fr.replicates is not None:
        written.append(out_dir / "replicates.parquet")
        meta = _metadata(fr, fr.replicates_hypervolume)
        write_parquet_atomic(fr.replicates.replace_schema_metadata(meta), str(written[-1]))
    stale = out_dir / "replicates.parquet"
    if fr.replicates is None and stale.exists():  # left by an earlier run that had seed replicates
        stale.unlink()
    if plots:
        from detsweep.frontier_plots import plot_frontier  # matplotlib only when plots are wanted

        images = plot_frontier(fr, out_dir)
    else:
        images = []
    report_path = out_dir / "report.md"
    report_path.write_text(render_markdown(fr, [p.name for p in images]))
    return written + images + [report_path]


def headline_index(fr: Frontier) -> int:
    """The objective plotted on y and used for 'best per regime': the first max objective."""
    return next((j for j, o in enumerate(fr.objectives) if o.maximise), 0)


def _fmt(value: object) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _table(headers: list[str], rows: list[list[object]], markdown: bool) -> str:
    cells = [[_fmt(v) for v in row] for row in rows]
    if markdown:
        lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in cells]) + "\n"
    widths = [max([len(h)] + [len(r[j]) for r in cells]) for j, h in enumerate(headers)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()
                     for r in [headers] + cells) + "\n"


def _front_rows(fr: Frontier) -> tuple[list[str], list[list[object]]]:
    """Trial-level front, best first on the headline objective."""
    y = headline_index(fr)
    ranks = fr.ranks
    front = [i for i in range(len(ranks)) if ranks[i] == 1]
    front.sort(key=lambda i: -fr.values[i, y] if fr.objectives[y].maximise else fr.values[i, y])
    extra = [c for c in ("regime",) if c in fr.table.column_names]
    cols = ["trial_id"] + extra + [o.column for o in fr.objectives]
    table = fr.table.select(["trial_id"] + extra + [o.column for o in fr.objectives]).to_pylist()
    return cols, [[table[i][c] for c in cols] for i in front]


def _replicate_rows(fr: Frontier) -> tuple[list[str], list[list[object]]]:
    """Config-level table (seed means +- CI half-width), front first."""
    rep = fr.replicates.to_pylist()
    rep.sort(key=lambda r: r["pareto_rank"])
    headers = ["config_id", "n", "rank"] + [o.column for o in fr.objectives] + ["note"]
    rows = []
    for r in rep:
        cells = []
        for o in fr.objectives:
            mean, low, high = r[f"{o.column}_mean"], r[f"{o.column}_ci_low"], r[f"{o.column}_ci_high"]
            cells.append(_fmt(mean) + ("" if low is None else f" ± {_fmt((high - low) / 2)}"))
        note = r["not_separable"]
        if note:
            note += " from " + ", ".join(r["not_separable_from"])
        rows.append([r["config_id"], r["n"], r["pareto_rank"]] + cells + [note or ""])
    return headers, rows


def _best_per_regime(fr: Frontier) -> tuple[list[str], list[list[object]]]:
    y = headline_index(fr)
    obj = fr.objectives[y]
    regimes = fr.table.column("regime").to_pylist() if "regime" in fr.table.column_names else ["-"] * len(fr.table)
    trial_ids, ranks = fr.table.column("trial_id").to_pylist(), fr.ranks
    best: dict[str, int] = {}
    sign = -1.0 if obj.maximise else 1.0
    for i in np.flatnonzero(fr.valid):
        key = str(regimes[i])
        if key not in best or sign * fr.values[i, y] < sign * fr.values[best[key], y]:
            best[key] = int(i)
    rows = [[reg, trial_ids[i], float(fr.values[i, y]), ranks[i]] for reg, i in sorted(best.items())]
    return ["regime", "trial_id", obj.column, "pareto_rank"], rows


def _hypervolume_line(fr: Frontier) -> str:
    k = len(fr.objectives)
    line = (f"hypervolume of the front: {fr.hypervolume:.6g} (max {pareto.REFERENCE_POINT ** k:.6g}; "
            f"reference point {pareto.REFERENCE_POINT} on every normalised axis)")
    if fr.replicates_hypervolume is not None:
        line += f"; of the seed-mean front: {fr.replicates_hypervolume:.6g}"
    return line


def render_markdown(fr: Frontier, images: list[str]) -> str:
    """report.md: objectives, front, replicates, plots, hypervolume, best per regime, excluded trials."""
    n_valid = int(fr.valid.sum())
    parts = [f"# Pareto front: {fr.sweep}\n",
             f"{len(fr.table)} trials: {n_valid} ranked, {len(fr.excluded)} excluded.\n",
             "Objectives: " + ", ".join(f"`{o.column}` ({o.direction})" for o in fr.objectives) + ".\n"]
    parts += [f"> **Note:** {note}.\n" for note in fr.notes]
    headers, rows = _front_rows(fr)
    parts += [f"## Front ({len(rows)} of {n_valid} ranked trials)\n", _table(headers, rows, markdown=True)]
    if fr.replicates is not None:
        headers, rows = _replicate_rows(fr)
        parts += ["## Seed replicates\n",
                  "Trials that differ only in `seed` are one config: mean ± 95 % Student-t CI half-width; "
                  "the front is computed on the means. A front config is *not separable* when its CI "
                  "overlaps a dominated config's CI on every objective (one seed: no CI, overlaps all).\n",
                  _table(headers, rows, markdown=True)]
    if images:
        parts.append("## Plots\n")
        parts += [f"![{name}]({name})\n" for name in images]
    parts += ["## Hypervolume\n", _hypervolume_line(fr) + ".\n",
              "Each objective is mapped to a minimised value in [0, 1] before the volume is taken:\n",
              _table(["objective", "normalised as", "reference"],
                     [[str(o), n.describe(), pareto.REFERENCE_POINT] for o, n in zip(fr.objectives, fr.norms)],
                     markdown=True)]
    headers, rows = _best_per_regime(fr)
    parts += [f"## Best trial per regime (by {headers[2]})\n", _table(headers, rows, markdown=True)]
    parts.append("## Excluded trials\n")
    if fr.excluded:
        rows = [[e["trial_id"], e["status"], str(e["reason"]).replace("|", "\\|").replace("\n", " ")]
                for e in fr.excluded]
        parts.append(_table(["trial_id", "status", "error"], rows, markdown=True))
    else:
        parts.append("None.\n")
    return "\n".join(parts)


def render_stdout(fr: Frontier, written: list[Path]) -> str:
    """The compact terminal summary printed by the CLI."""
    lines = [f"sweep {fr.sweep}: {len(fr.table)} trials, {int(fr.valid.sum())} ranked, "
             f"{len(fr.excluded)} excluded",
             "objectives: " + ", ".join(str(o) for o in fr.objectives)]
    lines += [f"note: {note}" for note in fr.notes]
    headers, rows = _front_rows(fr)
    lines += [f"Pareto front ({len(rows)} trials):", _table(headers, rows, markdown=False).rstrip()]
    if fr.replicates is not None:
        headers, rows = _replicate_rows(fr)
        lines += ["seed replicates (mean ± 95% CI; front on the means):",
                  _table(headers, rows, markdown=False).rstrip()]
    lines.append(_hypervolume_line(fr))
    lines += [f"excluded {e['trial_id']} ({e['status']}): {e['reason']}" for e in fr.excluded]
    lines += [f"wrote {p}" for p in written]
    return "\n".join(lines) + "\n"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m detsweep.frontier",
        description="Pareto front of a sweep's results.parquet: writes frontier.parquet (pareto_rank, "
                    "dominated_by), replicates.parquet when seeds repeat, PNG plots and report.md.")
    p.add_argument("results", help="path or URI (s3://, gs://) of results.parquet")
    p.add_argument("--objectives", default=DEFAULT_OBJECTIVES,
                   help="comma-separated COLUMN:DIRECTION with DIRECTION in {max,min} (default: %(default)s)")
    p.add_argument("--out", type=Path, default=None,
                   help="output folder (default: the results file's folder; for a URI, ./frontier-<sweep>)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    return p


def main(argv: list[str] | None = None) -> int:
    """CLI entry; returns the exit code (2 for user errors, one line on stderr)."""
    args = _parser().parse_args(argv)
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
    out = args.out or (Path(f"frontier-{path.rstrip('/').split('/')[-2]}") if remote else path.parent)
    written = write_outputs(fr, out, plots=not args.no_plots)
    sys.stdout.write(render_stdout(fr, written))
    return 0


if __name__ == "__main__":
    sys.exit(main())

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
_LABEL_ALL_MAX = 30


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
    images = plot_frontier(fr, out_dir) if plots else []
    report_path = out_dir / "report.md"
    report_path.write_text(render_markdown(fr, [p.name for p in images]))
    return written + images + [report_path]


def _headline_index(fr: Frontier) -> int:
    """The objective plotted on y and used for 'best per regime': the first max objective."""
    return next((j for j, o in enumerate(fr.objectives) if o.maximise), 0)


def _plot_points(fr: Frontier) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """(labels [m], values [m, k], CI half-widths [m, k] (0 without replicates), ranks [m])."""
    if fr.replicates is not None:
        rep = fr.replicates
        cols = [o.column for o in fr.objectives]
        means = np.column_stack([rep.column(f"{c}_mean").to_numpy(zero_copy_only=False) for c in cols])
        low = np.column_stack([rep.column(f"{c}_ci_low").to_numpy(zero_copy_only=False) for c in cols])
        high = np.column_stack([rep.column(f"{c}_ci_high").to_numpy(zero_copy_only=False) for c in cols])
        half = np.nan_to_num((high - low) / 2.0)
        return rep.column("config_id").to_pylist(), means, half, rep.column("pareto_rank").to_numpy()
    idx = np.flatnonzero(fr.valid)
    labels = [str(t) for t in fr.table.column("trial_id").take(idx).to_pylist()]
    ranks = np.array(fr.ranks, dtype=object)[idx].astype(np.int64)
    return labels, fr.values[idx], np.zeros((len(idx), len(fr.objectives))), ranks


def _label_places(xy: np.ndarray, *, log_x: bool) -> list[tuple[int, bool]]:
    """Per point: how many label rows to lift its label by, so that labels of nearby points (in
    axis-normalised units) stack instead of overprinting, and whether to set it to the left of
    the point (near the right edge, where it would run out of the axes)."""
    pts = np.array(xy, dtype=float)
    if log_x:
        pts[:, 0] = np.log10(np.clip(pts[:, 0], 1e-12, None))
    span = np.nanmax(pts, axis=0) - np.nanmin(pts, axis=0) if len(pts) else np.ones(2)
    pts = (pts - np.nanmin(pts, axis=0)) / np.where(span > 0, span, 1.0)
    lifts: list[int] = []
    for i, p in enumerate(pts):
        near = [lifts[j] for j in range(i) if abs(pts[j, 0] - p[0]) < 0.25 and abs(pts[j, 1] - p[1]) < 0.06]
        lifts.append(next(k for k in range(len(near) + 1) if k not in near))
    return [(lift, bool(p[0] > 0.75)) for lift, p in zip(lifts, pts)]


def plot_frontier(fr: Frontier, out_dir: Path) -> list[Path]:
    """One PNG per cost objective: headline objective (y) vs that objective (x), front highlighted.

    Every point is labelled up to _LABEL_ALL_MAX points; beyond that only the connected 2-D trade-off.
    """
    from matplotlib.figure import Figure  # the Figure API renders with Agg and never opens a display

    labels, values, half, ranks = _plot_points(fr)
    y = _headline_index(fr)
    front = np.flatnonzero(ranks == 1)
    paths = []
    for x, obj in enumerate(fr.objectives):
        if x == y:
            continue
        fig = Figure(figsize=(7, 5))
        ax = fig.add_subplot()
        rest = np.flatnonzero(ranks != 1)
        if fr.replicates is not None:  # the single seeds behind their means
            ax.scatter(fr.values[fr.valid, x], fr.values[fr.valid, y], s=8, color="0.75", label="single seeds")
        for sel, style in ((rest, dict(color="0.6", label="dominated")),
                           (front, dict(color="C3", label="Pareto front (all objectives)"))):
            if fr.replicates is not None:
                ax.errorbar(values[sel, x], values[sel, y], xerr=half[sel, x], yerr=half[sel, y], fmt="o",
                            markersize=5, capsize=2, **style)
            else:  # plain markers: zero-length error bars cost seconds for 10k points
                ax.plot(values[sel, x], values[sel, y], "o", markersize=5, **style)
        # The full front is a k-D set; the line joins the members that are also the 2-D trade-off in this view.
        pair = [fr.objectives[y].maximise, obj.maximise]
        in_view = front[pareto.pareto_ranks(values[front][:, [y, x]], pair) == 1] if len(front) else front
        order = in_view[np.argsort(values[in_view, x])]
        ax.plot(values[order, x], values[order, y], "-", color="C3", alpha=0.6, label="trade-off in this view")
        shown = list(range(len(labels)) if len(labels) <= _LABEL_ALL_MAX else order)
        for i, (lift, right) in zip(shown, _label_places(values[shown][:, [x, y]],
                                                         log_x=obj.column.endswith("_params"))):
            ax.annotate(labels[i], (values[i, x], values[i, y]), fontsize=7, textcoords="offset points",
                        xytext=(-4 if right else 4, 3 + 9 * lift), ha="right" if right else "left")
        if obj.column.endswith("_params"):
            ax.set_xscale("log")
        ax.set_xlabel(f"{obj.column} ({obj.direction})")
        ax.set_ylabel(f"{fr.objectives[y].column} ({fr.objectives[y].direction})")
        suffix = " (seed means, 95 % CI)" if fr.replicates is not None else ""
        ax.set_title(f"{fr.sweep}: {fr.objectives[y].column} vs {obj.column}{suffix}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: never hides points
        path = out_dir / f"frontier_{fr.objectives[y].column}_vs_{obj.column}.png"
        fig.savefig(path, dpi=110, bbox_inches="tight")
        paths.append(path)
    return paths


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
    y = _headline_index(fr)
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
    y = _headline_index(fr)
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

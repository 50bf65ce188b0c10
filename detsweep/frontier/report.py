"""The frontier's words: report.md (Markdown) and the summary printed to the terminal, rendered
from a computed `Frontier`. Pure formatting; front.py computes, cli.py writes."""
from __future__ import annotations

import math

import numpy as np
import pyarrow as pa

from detsweep.frontier.front import Frontier, headline_index
from detsweep.frontier.pareto import REFERENCE_POINT, column_list, config_label, extra_columns
from detsweep.results import OWN_LINE_COLUMNS, REPLICATE_COLUMNS, STATUSES


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


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _distinct(table: pa.Table, column: str) -> list:
    """Sorted distinct non-null (and non-NaN) values of a column; [] when the column is absent."""
    return sorted({v for v in column_list(table, column) if v is not None and v == v})


def _values(table: pa.Table, column: str) -> str:
    return ", ".join(_fmt(v) for v in _distinct(table, column)) or "-"


def _sweep_lines(table: pa.Table) -> list[str]:
    """The Sweep section of report.md: what ran, where, with what code, for how long, at what cost."""
    status = column_list(table, "status")
    counts = ", ".join(f"{status.count(s)} {s}" for s in STATUSES if s in status)
    # The config columns not named on a line of their own, then the seed and the extra sweep axes.
    axes = [c for c in REPLICATE_COLUMNS if c not in OWN_LINE_COLUMNS] + ["seed"] + extra_columns(table)
    varying = [f"`{c}` ({_values(table, c)})" for c in axes if len(_distinct(table, c)) >= 2]
    started, finished = _distinct(table, "started_at"), _distinct(table, "finished_at")
    span = f"{f'{started[0]:%Y-%m-%d %H:%M:%S}' if started else '-'} .. " \
           f"{f'{finished[-1]:%Y-%m-%d %H:%M:%S}' if finished else '-'} UTC"
    wall = sum(v for v in column_list(table, "wall_s") if v is not None and v == v)
    gpu_hours = [v for v in column_list(table, "gpu_hours") if v is not None and v == v]
    return [f"- trials: {len(table)} ({counts or 'no status'})",
            f"- models: {_values(table, 'model')}; backbones: {_values(table, 'backbone')}",
            f"- regimes: {_values(table, 'regime')}",
            f"- grid axes that vary: {', '.join(varying) or 'none'}",
            f"- data: {_values(table, 'data')}",
            f"- epochs: {_values(table, 'epochs')}",
            f"- device: {_values(table, 'device')}; GPU: {_values(table, 'gpu_name')}",
            f"- git sha: {_values(table, 'git_sha')}",
            f"- versions: detsweep {_values(table, 'detsweep_version')}; torch {_values(table, 'torch_version')}; "
            f"ray {_values(table, 'ray_version')}",
            f"- time: {span}",
            f"- total wall time: {wall:,.0f} s ({wall / 3600:.2f} h); "
            f"GPU-hours: {f'{sum(gpu_hours):.2f}' if gpu_hours else '-'}"] + [
        line for line in [_cost_line(table)] if line]


def _usd(value: float) -> str:
    """Dollars in cents, or to two significant digits below a cent."""
    return f"${value:,.2f}" if value >= 0.005 or value == 0 else f"${value:.2g}"


def _cost_line(table: pa.Table) -> str | None:
    """The sweep's cost in dollars (`cost_usd`: the workers' time at the sweep file's prices), or None
    when it gave no prices."""
    costs = [v for v in column_list(table, "cost_usd") if v is not None and v == v]
    if not costs:
        return None
    return (f"- cost: {_usd(sum(costs))} in total, {_usd(sum(costs) / len(costs))} per trial on average "
            f"(min {_usd(min(costs))}, max {_usd(max(costs))}; {_plural(len(costs), 'priced trial')} of "
            f"{len(table)}; the workers' time at the sweep file's prices)")


def _cost_rows(table: pa.Table) -> tuple[list[str], list[list[object]]]:
    """Each priced trial's cost, dearest first."""
    cols = [c for c in ("trial_id", "regime", "status", "worker_s", "gpu_hours", "cost_usd") if c in table.column_names]
    rows = [r for r in table.select(cols).to_pylist() if r.get("cost_usd") is not None]
    rows.sort(key=lambda r: -r["cost_usd"])
    return cols, [[_usd(r[c]) if c == "cost_usd" else r[c] for c in cols] for r in rows]


def _nothing_ranked(fr: Frontier) -> str:
    """Why the front is empty, or '' when something was ranked."""
    if fr.valid.any():
        return ""
    if "ok" not in column_list(fr.table, "status"):
        return "No trial finished (status ok): nothing to rank."
    return "No finished trial has a value for every objective: nothing to rank."


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
    """Config-level table (seed means +- CI half-width), front first; each config by its seed-free label, as
    the plots name it (replicates.parquet keeps `config_id`, the first trial's id)."""
    rep = fr.replicates.to_pylist()
    rep.sort(key=lambda r: r["pareto_rank"])
    label = {r["config_id"]: config_label(r["trial_ids"]) for r in rep}
    headers = ["config", "n", "rank"] + [o.column for o in fr.objectives] + ["note"]
    rows = []
    for r in rep:
        cells = []
        for o in fr.objectives:
            mean, low, high = r[f"{o.column}_mean"], r[f"{o.column}_ci_low"], r[f"{o.column}_ci_high"]
            cells.append(_fmt(mean) + ("" if low is None else f" ± {_fmt((high - low) / 2)}"))
        note = r["not_separable"]
        if note:
            note += " from " + ", ".join(label.get(c, c) for c in r["not_separable_from"])
        rows.append([label[r["config_id"]], r["n"], r["pareto_rank"]] + cells + [note or ""])
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
    line = (f"hypervolume of the front: {fr.hypervolume:.6g} (max {REFERENCE_POINT ** k:.6g}; "
            f"reference point {REFERENCE_POINT} on every normalised axis)")
    if fr.replicates_hypervolume is not None:
        line += f"; of the seed-mean front: {fr.replicates_hypervolume:.6g}"
    return line


def render_markdown(fr: Frontier, images: list[str]) -> str:
    """report.md: sweep, objectives, front, replicates, plots, hypervolume, best per regime, excluded trials."""
    n_valid = int(fr.valid.sum())
    parts = [f"# Pareto front: {fr.sweep}\n",
             f"{_plural(len(fr.table), 'trial')}: {n_valid} ranked, {len(fr.excluded)} excluded.\n",
             "Objectives: " + ", ".join(f"`{o.column}` ({o.direction})" for o in fr.objectives) + ".\n"]
    parts += [f"> **Note:** {note}.\n" for note in fr.notes]
    parts += ["## Sweep\n", "\n".join(_sweep_lines(fr.table)) + "\n"]
    if not n_valid:
        parts += ["## Front\n", _nothing_ranked(fr) + "\n"]
    else:
        headers, rows = _front_rows(fr)
        parts += [f"## Front ({len(rows)} of {_plural(n_valid, 'ranked trial')})\n",
                  _table(headers, rows, markdown=True)]
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
    if n_valid:
        parts += ["## Hypervolume\n", _hypervolume_line(fr) + ".\n",
                  "Each objective is mapped to a minimised value in [0, 1] before the volume is taken:\n",
                  _table(["objective", "normalised as", "reference"],
                         [[str(o), n.describe(), REFERENCE_POINT] for o, n in zip(fr.objectives, fr.norms)],
                         markdown=True)]
        headers, rows = _best_per_regime(fr)
        parts += [f"## Best trial per regime (by {headers[2]})\n", _table(headers, rows, markdown=True)]
    if _cost_line(fr.table):
        headers, rows = _cost_rows(fr.table)
        parts += ["## Cost per trial\n", "Total " + _cost_line(fr.table).removeprefix("- cost: ") + ".\n",
                  _table(headers, rows, markdown=True)]
    parts.append("## Excluded trials\n")
    if fr.excluded:
        rows = [[e["trial_id"], e["status"], str(e["reason"]).replace("|", "\\|").replace("\n", " ")]
                for e in fr.excluded]
        parts.append(_table(["trial_id", "status", "reason"], rows, markdown=True))
    else:
        parts.append("None.\n")
    return "\n".join(parts)


def render_stdout(fr: Frontier, written: list[str]) -> str:
    """The compact terminal summary printed by the CLI."""
    lines = [f"sweep {fr.sweep}: {_plural(len(fr.table), 'trial')}, {int(fr.valid.sum())} ranked, "
             f"{len(fr.excluded)} excluded",
             "objectives: " + ", ".join(str(o) for o in fr.objectives)]
    lines += [f"note: {note}" for note in fr.notes]
    if fr.valid.any():
        headers, rows = _front_rows(fr)
        lines += [f"Pareto front ({_plural(len(rows), 'trial')}):", _table(headers, rows, markdown=False).rstrip()]
    else:
        lines.append(_nothing_ranked(fr))
    if fr.replicates is not None:
        headers, rows = _replicate_rows(fr)
        lines += ["seed replicates (mean ± 95% CI; front on the means):",
                  _table(headers, rows, markdown=False).rstrip()]
    if fr.valid.any():
        lines.append(_hypervolume_line(fr))
    lines += [f"excluded {e['trial_id']} ({e['status']}): {e['reason']}" for e in fr.excluded]
    lines += [f"wrote {p}" for p in written]
    return "\n".join(lines) + "\n"

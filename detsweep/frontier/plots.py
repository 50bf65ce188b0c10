"""The frontier's PNG scatter plots: the headline objective against each cost objective, front
highlighted, points labelled by trial id (or config, with seed replicates and their 95% CIs).
Renders a computed `Frontier` to PNG bytes; cli.py writes them."""
from __future__ import annotations

import io
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from detsweep.frontier.front import Frontier, headline_index
from detsweep.frontier.pareto import Normalisation, pareto_ranks

if TYPE_CHECKING:
    from matplotlib.figure import Figure

LABEL_ALL_MAX = 30  # above this many points only the front (rank 1) is labelled, to stay readable


def ci_error_bars(means: np.ndarray, low: np.ndarray, high: np.ndarray,
                  norms: Sequence[Normalisation]) -> tuple[np.ndarray, np.ndarray]:
    """(below, above): [m, k] distances from each mean to its CI bounds, the bounds first clipped to
    the objective's value range (AP in [0, 1], counts and memory >= 0); 0 where there is no CI."""
    bounds = np.array([norm.value_range() for norm in norms], dtype=np.float64).reshape(-1, 2)
    below = np.nan_to_num(means - np.maximum(low, bounds[:, 0]))
    above = np.nan_to_num(np.minimum(high, bounds[:, 1]) - means)
    return below, above


def _plot_points(fr: Frontier) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(labels [m], values [m, k], error bars below [m, k] and above [m, k] (0 without replicates), ranks [m])."""
    if fr.replicates is not None:
        rep = fr.replicates

        def stat(name: str) -> np.ndarray:
            return np.column_stack([rep.column(f"{o.column}_{name}").to_numpy(zero_copy_only=False)
                                    for o in fr.objectives]).astype(np.float64)

        means = stat("mean")
        below, above = ci_error_bars(means, stat("ci_low"), stat("ci_high"), fr.norms)
        return rep.column("config_id").to_pylist(), means, below, above, rep.column("pareto_rank").to_numpy()
    idx = np.flatnonzero(fr.valid)
    labels = [str(t) for t in fr.table.column("trial_id").take(idx).to_pylist()]
    ranks = np.array(fr.ranks, dtype=object)[idx].astype(np.int64)
    zeros = np.zeros((len(idx), len(fr.objectives)))
    return labels, fr.values[idx], zeros, zeros, ranks


def _label_places(xy: np.ndarray, *, log_x: bool) -> list[tuple[int, bool]]:
    """Per point: how many label rows to lift its label by, so that labels of nearby points (in
    axis-normalised units) stack instead of overprinting, and whether to set it to the left of
    the point (near the right edge, where it would run out of the axes)."""
    pts = np.array(xy, dtype=float)
    if log_x:
        pts[:, 0] = np.log10(np.clip(pts[:, 0], 1e-12, None))
    span = np.nanmax(pts, axis=0) - np.nanmin(pts, axis=0) if len(pts) else np.ones(2)
    pts = (pts - np.nanmin(pts, axis=0)) / np.where(span > 0, span, 1.0) if len(pts) else pts
    lifts: list[int] = []
    for i, p in enumerate(pts):
        near = [lifts[j] for j in range(i) if abs(pts[j, 0] - p[0]) < 0.25 and abs(pts[j, 1] - p[1]) < 0.06]
        lifts.append(next(k for k in range(len(near) + 1) if k not in near))
    return [(lift, bool(p[0] > 0.75)) for lift, p in zip(lifts, pts)]


def scatter_figure(fr: Frontier, x: int) -> Figure:
    """Headline objective (y) against objective ``x``, front highlighted.

    Every point is labelled up to LABEL_ALL_MAX points; beyond that every front (rank-1) point.
    """
    from matplotlib.figure import Figure  # lazy: matplotlib only when plots are wanted; Agg, never a display

    labels, values, below, above, ranks = _plot_points(fr)
    y, obj = headline_index(fr), fr.objectives[x]
    front, rest = np.flatnonzero(ranks == 1), np.flatnonzero(ranks != 1)
    fig = Figure(figsize=(7, 5))
    ax = fig.add_subplot()
    if fr.replicates is not None:  # the single seeds behind their means
        ax.scatter(fr.values[fr.valid, x], fr.values[fr.valid, y], s=8, color="0.75", label="single seeds")
    for sel, style in ((rest, dict(color="0.6", label="dominated")),
                       (front, dict(color="C3", label="Pareto front (all objectives)"))):
        if fr.replicates is not None:
            ax.errorbar(values[sel, x], values[sel, y], xerr=[below[sel, x], above[sel, x]],
                        yerr=[below[sel, y], above[sel, y]], fmt="o", markersize=5, capsize=2, **style)
        else:  # plain markers: zero-length error bars cost seconds for 10k points
            ax.plot(values[sel, x], values[sel, y], "o", markersize=5, **style)
    # The full front is a k-D set; the line joins the members that are also the 2-D trade-off in this view.
    pair = [fr.objectives[y].maximise, obj.maximise]
    in_view = front[pareto_ranks(values[front][:, [y, x]], pair) == 1] if len(front) else front
    order = in_view[np.argsort(values[in_view, x])]
    ax.plot(values[order, x], values[order, y], "-", color="C3", alpha=0.6, label="trade-off in this view")
    shown = np.arange(len(labels)) if len(labels) <= LABEL_ALL_MAX else front
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
    return fig


def plot_frontier(fr: Frontier) -> dict[str, bytes]:
    """One PNG per cost objective, as {file name: PNG bytes}; the caller writes them (local or pyarrow.fs)."""
    y = headline_index(fr)
    images: dict[str, bytes] = {}
    for x, obj in enumerate(fr.objectives):
        if x == y:
            continue
        buffer = io.BytesIO()
        scatter_figure(fr, x).savefig(buffer, format="png", dpi=110, bbox_inches="tight")
        images[f"frontier_{fr.objectives[y].column}_vs_{obj.column}.png"] = buffer.getvalue()
    return images

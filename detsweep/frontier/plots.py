"""The frontier's PNG scatter plots: the headline objective against each cost objective, front
highlighted, points labelled by trial id (or config, with seed replicates and their 95% CIs).
Renders a computed `Frontier` to PNG bytes; cli.py writes them."""
from __future__ import annotations

import io
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from detsweep.frontier.front import Frontier, headline_index
from detsweep.frontier.pareto import Normalisation, config_label, pareto_ranks

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
        labels = [config_label(ids) for ids in rep.column("trial_ids").to_pylist()]
        return labels, means, below, above, rep.column("pareto_rank").to_numpy()
    idx = np.flatnonzero(fr.valid)
    labels = [str(t) for t in fr.table.column("trial_id").take(idx).to_pylist()]
    ranks = np.array(fr.ranks, dtype=object)[idx].astype(np.int64)
    zeros = np.zeros((len(idx), len(fr.objectives)))
    return labels, fr.values[idx], zeros, zeros, ranks


LABEL_GAP_PT = 3.0  # between a point and its label, and between stacked labels
LABEL_SLOTS = 17  # its own height, then up to 8 label rows below and 8 above; if all are taken, its own


def place_labels(ax, texts: Sequence, anchors: np.ndarray) -> None:
    """Move each annotation (offset in points from its anchor) to the first free slot, so that no label
    overprints another or covers a labelled point: right of the point (left near the axes' right edge), at
    its height, then alternately below and above by whole label heights. Highest points are placed first.
    Measured in display space with the figure's renderer, after the axes' scales and limits are final."""
    fig = ax.figure
    ax.autoscale_view()  # the limits the draw will use (matplotlib defers autoscaling until then)
    renderer = fig.canvas.get_renderer()
    to_pt = 72.0 / fig.dpi
    xy = ax.transData.transform(anchors) * to_pt
    right_edge = ax.get_window_extent(renderer).x1 * to_pt
    r = LABEL_GAP_PT  # the markers' half-size (markersize 5), so a label also keeps off other points
    taken = np.column_stack([xy - r, xy + r])  # [x0, y0, x1, y1] rows: markers, then each placed label
    rows = np.array([(s + 1) // 2 * (-1 if s % 2 else 1) for s in range(LABEL_SLOTS)])  # 0, -1, +1, -2, ...
    for i in sorted(range(len(texts)), key=lambda k: (-xy[k, 1], xy[k, 0])):
        box = texts[i].get_window_extent(renderer)
        w, h = box.width * to_pt, box.height * to_pt
        left = xy[i, 0] + LABEL_GAP_PT + w > right_edge
        x0 = xy[i, 0] - LABEL_GAP_PT - w if left else xy[i, 0] + LABEL_GAP_PT
        dys = LABEL_GAP_PT + (h + LABEL_GAP_PT) * rows
        y0 = xy[i, 1] + dys[:, None]  # [slots, 1] against [taken]
        hit = ((x0 < taken[:, 2]) & (taken[:, 0] < x0 + w) & (y0 < taken[:, 3]) & (taken[:, 1] < y0 + h)).any(axis=1)
        dy = dys[int(np.argmin(hit))]  # the first free slot; the first slot when none is free
        taken = np.vstack([taken, [x0, xy[i, 1] + dy, x0 + w, xy[i, 1] + dy + h]])
        texts[i].xyann = (-LABEL_GAP_PT if left else LABEL_GAP_PT, float(dy))
        texts[i].set_ha("right" if left else "left")


def scatter_figure(fr: Frontier, x: int) -> Figure:
    """Headline objective (y) against objective ``x``, front highlighted.

    Every point is labelled up to LABEL_ALL_MAX points; beyond that every front (rank-1) point.
    """
    # lazy: matplotlib only when plots are wanted; Agg, never a display
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

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
    if obj.column.endswith("_params"):
        ax.set_xscale("log")
    shown = np.arange(len(labels)) if len(labels) <= LABEL_ALL_MAX else front
    texts = [ax.annotate(labels[i], (values[i, x], values[i, y]), fontsize=7, textcoords="offset points",
                         xytext=(LABEL_GAP_PT, LABEL_GAP_PT)) for i in shown]
    ax.set_xlabel(f"{obj.column} ({obj.direction})")
    ax.set_ylabel(f"{fr.objectives[y].column} ({fr.objectives[y].direction})")
    suffix = " (seed means, 95 % CI)" if fr.replicates is not None else ""
    ax.set_title(f"{fr.sweep}: {fr.objectives[y].column} vs {obj.column}{suffix}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: never hides points
    FigureCanvasAgg(fig)  # a renderer to measure the labels with
    place_labels(ax, texts, values[shown][:, [x, y]])
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

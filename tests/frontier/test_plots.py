"""The frontier's PNG scatter plots: labels that never overprint, seed means labelled by config."""
import itertools

import numpy as np
import pytest

from detsweep import frontier
from detsweep.frontier import pareto
from detsweep.frontier import plots as frontier_plots
from detsweep.results import rows_to_table

OBJECTIVES = "ap:max,trainable_params:min,peak_rss_mb:min"


def _row(trial_id, regime, ap, params, rss, seed=0, model="fasterrcnn_r50_fpn", **kw):
    return {"sweep": "bench", "trial_id": trial_id, "status": "ok", "model": model, "regime": regime,
            "seed": seed, "ap": ap, "trainable_params": params, "peak_rss_mb": rss, **kw}


def _label_boxes(fig):
    """{label text: its bounding box in display pixels}, as the saved PNG draws it."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    return {t.get_text(): t.get_window_extent(renderer) for t in fig.axes[0].texts}


def _overlapping(boxes) -> list[tuple[str, str]]:
    return [(a, b) for (a, p), (b, q) in itertools.combinations(boxes.items(), 2) if p.overlaps(q)]


def _transfer_like():
    """The transfer benchmark's six configs x 3 seeds: Faster R-CNN full and partial lie 10 % apart in
    parameters and 0.015 apart in AP, and two DETR configs sit side by side at AP 0: the labels that
    used to overprint (docs/transfer_front.png before this test)."""
    configs = [("fasterrcnn_r18_fpn-full", "full", 0.355, 28_289_256, 1512),
               ("fasterrcnn_r18_fpn-partial", "partial", 0.339, 25_510_952, 1492),
               ("fasterrcnn_r18_fpn-lora_only-r4-box_head", "lora_only", 0.173, 682_024, 1288),
               ("detr_r18-full", "full", 0.0, 11_186_505, 1143),
               ("detr_r18-partial", "partial", 0.0, 8_398_153, 1119),
               ("detr_r18-lora_only-r4-attention_ffn", "lora_only", 0.0, 24_393, 1006)]
    rows = [_row(f"{name}-seed{s}", regime, max(0.0, ap + 0.01 * (s - 1)), params, rss + s, seed=s,
                 model="detr_r50" if name.startswith("detr") else "fasterrcnn_r50_fpn")
            for name, regime, ap, params, rss in configs for s in range(3)]
    return frontier.compute_frontier(rows_to_table(rows), pareto.parse_objectives(OBJECTIVES)), [c[0] for c in configs]


@pytest.mark.parametrize("x", [1, 2], ids=["vs_trainable_params", "vs_peak_rss_mb"])
def test_seed_means_are_labelled_by_config_and_no_two_labels_overlap(x):
    fr, names = _transfer_like()
    assert fr.replicates is not None
    boxes = _label_boxes(frontier_plots.scatter_figure(fr, x))
    assert sorted(boxes) == sorted(names)  # the config, not its first seed's trial id
    assert _overlapping(boxes) == []


def test_a_crowded_front_stacks_its_labels():
    """Twelve single trials in a tight cluster near the right edge: every label is drawn, none overprints,
    and those at the edge are set to the left of their point (inside the axes)."""
    rows = [_row(f"t{i:02d}-full-lr{i}", "full", 0.30 + 0.002 * i, 40_000_000 + 10_000 * i, 1500.0 + i, lr=float(i))
            for i in range(12)]
    rows.append(_row("small-lora", "lora_only", 0.1, 100_000, 900.0))
    fr = frontier.compute_frontier(rows_to_table(rows), pareto.parse_objectives(OBJECTIVES))
    fig = frontier_plots.scatter_figure(fr, 1)
    boxes = _label_boxes(fig)
    assert len(boxes) == 13 and _overlapping(boxes) == []
    right = fig.axes[0].get_window_extent(fig.canvas.get_renderer()).x1
    assert all(box.x1 <= right for box in boxes.values())


@pytest.mark.parametrize(("ids", "label"), [
    (["detr_r18-full-seed0", "detr_r18-full-seed1"], "detr_r18-full"),
    (["a-lr1e-12-seed0-wd0.1", "a-lr1e-12-seed1-wd0.1"], "a-lr1e-12-wd0.1"),  # the seed part need not be last
    (["a-seed0", "b-c-seed1"], "a-seed0"),  # not one shape: the first id
])
def test_config_label(ids, label):
    assert frontier_plots.config_label(ids) == label


def test_place_labels_moves_the_second_of_two_coincident_labels():
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4, 3))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot([0.0, 1.0], [0.0, 1.0], "o")
    texts = [ax.annotate(s, (0.5, 0.5), textcoords="offset points", xytext=(3, 3)) for s in ("first", "second")]
    frontier_plots.place_labels(ax, texts, np.array([[0.5, 0.5], [0.5, 0.5]]))
    assert texts[0].xyann == (3.0, 3.0)  # the first keeps the default slot
    assert texts[1].xyann[1] < 0  # the next free one: a label height below
    assert _overlapping(_label_boxes(fig)) == []


def test_a_label_keeps_off_another_labelled_point():
    """Point b sits where a's label would go by default (just right of a, at label height): a's label moves."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4, 3))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    a = np.array([0.3, 0.5])
    pt = fig.dpi / 72.0
    b = ax.transData.inverted().transform(ax.transData.transform(a) + np.array([8.0, 7.0]) * pt)
    texts = [ax.annotate(s, tuple(p), textcoords="offset points", xytext=(3, 3)) for s, p in (("a", a), ("b", b))]
    frontier_plots.place_labels(ax, texts, np.array([a, b]))
    fig.canvas.draw()
    b_px = ax.transData.transform(b)
    assert not texts[0].get_window_extent(fig.canvas.get_renderer()).contains(*b_px)
    assert texts[0].xyann != (3.0, 3.0)

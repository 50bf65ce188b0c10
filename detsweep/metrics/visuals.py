"""Per-trial PNGs: loss curves, predicted vs ground-truth boxes, reliability diagram.

Uses matplotlib's object API with the Agg canvas, so no display is needed and the global
pyplot backend is left alone.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

logger = logging.getLogger(__name__)

DPI = 100
MIN_LONG_SIDE_PX = 512  # small (synthetic) images are upscaled so labels stay readable


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, format="png", dpi=DPI)
    logger.debug("wrote %s", path)
    return path


def plot_loss_curves(history: list[dict[str, Any]], path: str | Path, *, keys: list[str] | None = None,
                     switch_epoch: int | None = None) -> Path:
    """Plot loss values of `history` (one dict per epoch, each with `epoch`) against epoch; 800x500 PNG.
    `switch_epoch`: a two_stage trial's first epoch of stage 2, drawn as a dashed line.

    `keys` defaults to every key whose name contains "loss": history rows usually carry other
    metrics too (ap, images/s, parameter counts) that do not belong on a loss axis. Entries that
    lack a key, or hold a non-numeric value for it, are skipped (e.g. a val loss every other epoch).
    """
    if not history:
        raise ValueError("history is empty; expected a list of {'epoch': int, '<loss name>': float, ...}")
    missing = [i for i, h in enumerate(history) if "epoch" not in h]
    if missing:
        raise ValueError(f"history entries {missing[:5]} have no 'epoch' key")
    if keys is None:
        keys = sorted({k for h in history for k in h if "loss" in k})
    fig = Figure(figsize=(8, 5), dpi=DPI)
    ax = fig.add_subplot()
    for name in keys:
        points = [(h["epoch"], float(h[name])) for h in history
                  if isinstance(h.get(name), (int, float)) and not isinstance(h[name], bool)
                  and math.isfinite(h[name])]
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="o", label=name)
    if not ax.lines:
        logger.warning("plot_loss_curves: none of %s has a numeric value; writing empty axes", keys)
    if switch_epoch is not None:
        ax.axvline(switch_epoch - 0.5, color="0.4", linestyle="--", label=f"stage 2 from epoch {switch_epoch}")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    if ax.lines:
        ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor; avoids importing torch here
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _image_hwc_uint8(image: Any) -> np.ndarray:
    """HxWx3 uint8 from an HxWx3 uint8 array or a [3, H, W] float tensor/array in 0..1."""
    arr = _to_numpy(image)
    if arr.ndim == 3 and arr.shape[0] == 3 and arr.shape[-1] != 3:
        arr = np.clip(arr, 0.0, 1.0).transpose(1, 2, 0)
        return (arr * 255.0 + 0.5).astype(np.uint8)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise ValueError(f"image must be HxWx3 uint8 or [3, H, W] in 0..1, got shape {tuple(arr.shape)}")
    if arr.dtype != np.uint8:
        arr = (np.clip(arr, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    return arr


def _label_name(label: int, class_names: list[str]) -> str:
    if not 0 <= label < len(class_names):
        raise ValueError(f"label {label} is outside class_names (contiguous labels 0..{len(class_names) - 1})")
    return class_names[label]


def draw_predictions(
    images: list[Any],
    predictions: list[dict[str, Any]],
    ground_truth: list[dict[str, Any]],
    class_names: list[str],
    out_dir: str | Path,
    *,
    score_threshold: float = 0.3,
    max_images: int = 8,
    prefix: str = "pred",
) -> list[Path]:
    """Draw GT (dashed green) and predictions with score >= threshold (red, "name score").

    Args:
        images: HxWx3 uint8 arrays or [3, H, W] float tensors in 0..1.
        predictions: per image `{"boxes_xyxy": [N, 4] absolute, "scores": [N], "labels": [N] 0..K-1}`;
            the detector contract's key `boxes` is accepted too.
        ground_truth: per image `{"boxes_xyxy": [M, 4] absolute, "labels": [M] 0..K-1}` (or `boxes`).
        class_names: name of each contiguous label.
        out_dir: folder for `{prefix}_{index:03d}.png`.

    Returns: the written paths, one per image, at most `max_images`. Each PNG is the image upscaled
    by the smallest integer factor that makes its longer side >= 512 px.
    """
    if not len(images) == len(predictions) == len(ground_truth):
        raise ValueError(
            f"images, predictions and ground_truth must have one entry per image, "
            f"got {len(images)}, {len(predictions)}, {len(ground_truth)}"
        )
    out_dir = Path(out_dir)
    paths = []
    for i, (image, pred, gt) in enumerate(list(zip(images, predictions, ground_truth))[:max_images]):
        rgb = _image_hwc_uint8(image)
        h, w = rgb.shape[:2]
        scale = max(1, math.ceil(MIN_LONG_SIDE_PX / max(h, w)))
        fig = Figure(figsize=(w * scale / DPI, h * scale / DPI), dpi=DPI)
        ax = fig.add_axes((0, 0, 1, 1))
        ax.imshow(rgb, extent=(0, w, h, 0), interpolation="nearest")
        ax.set_xlim(0, w)
        ax.set_ylim(h, 0)
        ax.axis("off")
        font = max(6.0, 0.025 * max(h, w) * scale * 72 / DPI)
        for box in _boxes(gt):
            _rect(ax, box, "lime", "--")
        keep = _to_numpy(pred["scores"]) >= score_threshold
        for box, label, score in zip(_boxes(pred)[keep], _to_numpy(pred["labels"])[keep].tolist(),
                                     _to_numpy(pred["scores"])[keep].tolist()):
            _rect(ax, box, "red", "-")
            ax.text(box[0], box[1], f"{_label_name(int(label), class_names)} {score:.2f}", color="white",
                    fontsize=font, va="bottom", bbox={"facecolor": "red", "alpha": 0.7, "pad": 1, "lw": 0})
        paths.append(_save(fig, out_dir / f"{prefix}_{i:03d}.png"))
    return paths


def _boxes(d: dict[str, Any]) -> np.ndarray:
    boxes = d["boxes_xyxy"] if "boxes_xyxy" in d else d["boxes"]
    return _to_numpy(boxes).reshape(-1, 4)


def _rect(ax: Any, box_xyxy: np.ndarray, color: str, linestyle: str) -> None:
    x0, y0, x1, y1 = (float(v) for v in box_xyxy)
    ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=color, linestyle=linestyle, lw=1.5))


def plot_reliability(reliability: dict[str, list], path: str | Path) -> Path:
    """Reliability diagram from `calibration.reliability(...)`: accuracy per confidence bin vs the
    diagonal, with bin counts below; 500x600 PNG. Empty bins are left blank."""
    edges = np.asarray(reliability["bin_edges"], dtype=float)
    counts = np.asarray(reliability["count"])
    if len(edges) != len(counts) + 1:
        raise ValueError(f"reliability has {len(edges)} bin edges for {len(counts)} bins; expected {len(counts) + 1}")
    acc = np.array([np.nan if a is None else a for a in reliability["accuracy"]], dtype=float)
    conf = np.array([np.nan if c is None else c for c in reliability["confidence"]], dtype=float)
    widths = np.diff(edges)
    fig = Figure(figsize=(5, 6), dpi=DPI)
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    top.bar(edges[:-1], np.nan_to_num(acc), width=widths, align="edge", edgecolor="black", label="accuracy")
    top.bar(edges[:-1], np.nan_to_num(conf - acc), bottom=np.nan_to_num(acc), width=widths, align="edge",
            color="red", alpha=0.3, label="gap to mean confidence")
    top.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    top.set_ylim(0, 1)
    top.set_ylabel("accuracy")
    top.legend(fontsize="small", loc="upper left")
    bottom.bar(edges[:-1], counts, width=widths, align="edge", color="grey", edgecolor="black")
    bottom.set_xlim(0, 1)
    bottom.set_xlabel("confidence")
    bottom.set_ylabel("detections")
    fig.tight_layout()
    return _save(fig, path)

"""Per-trial PNGs: files written, valid PNGs with the expected pixel size and count."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from detsweep.metrics.calibration import reliability
from detsweep.metrics.visuals import draw_predictions, plot_loss_curves, plot_reliability


def png_size(path):
    with Image.open(path) as im:
        assert im.format == "PNG"
        im.load()  # decodes the whole file: a truncated PNG fails here
        return im.size


def test_loss_curves_png(tmp_path):
    history = [{"epoch": 0, "loss": 2.0, "loss_bbox": 0.5, "ap": 0.1, "total_params": 41_000_000},
               {"epoch": 1, "loss": 1.5, "ap": 0.2},
               {"epoch": 2, "loss": 1.2, "loss_bbox": float("nan"), "ap": 0.3}]
    path = plot_loss_curves(history, tmp_path / "plots" / "loss.png")
    assert path == tmp_path / "plots" / "loss.png"
    assert png_size(path) == (800, 500)
    assert png_size(plot_loss_curves(history, tmp_path / "ap.png", keys=["ap"])) == (800, 500)


def test_loss_curves_bad_history(tmp_path):
    with pytest.raises(ValueError, match="history is empty"):
        plot_loss_curves([], tmp_path / "x.png")
    with pytest.raises(ValueError, match=r"history entries \[1\] have no 'epoch' key"):
        plot_loss_curves([{"epoch": 0, "loss": 1.0}, {"loss": 0.5}], tmp_path / "x.png")


def test_draw_predictions_numpy_and_torch_images(tmp_path):
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, size=(128, 96, 3), dtype=np.uint8),  # H=128, W=96 -> x4
              torch.rand(3, 100, 300)]  # [3, H, W] in 0..1 -> x2
    preds = [{"boxes_xyxy": np.array([[10, 10, 50, 60], [0, 0, 5, 5]], float), "scores": np.array([0.9, 0.1]),
              "labels": np.array([1, 0])},
             {"boxes": torch.tensor([[20.0, 20.0, 80.0, 90.0]]), "scores": torch.tensor([0.5]),
              "labels": torch.tensor([0])}]
    gts = [{"boxes_xyxy": np.array([[12, 8, 48, 62]], float), "labels": np.array([1])},
           {"boxes_xyxy": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]
    paths = draw_predictions(images, preds, gts, ["cat", "dog"], tmp_path / "vis")
    assert [p.name for p in paths] == ["pred_000.png", "pred_001.png"]
    assert [png_size(p) for p in paths] == [(384, 512), (600, 200)]
    assert sorted(p.name for p in (tmp_path / "vis").iterdir()) == ["pred_000.png", "pred_001.png"]


def test_draw_predictions_max_images_and_errors(tmp_path):
    images = [np.zeros((600, 800, 3), np.uint8)] * 5  # already large: no upscale
    preds = [{"boxes_xyxy": np.zeros((0, 4)), "scores": np.zeros(0), "labels": np.zeros(0, int)}] * 5
    gts = [{"boxes_xyxy": np.zeros((0, 4)), "labels": np.zeros(0, int)}] * 5
    paths = draw_predictions(images, preds, gts, ["a"], tmp_path, max_images=3, prefix="ep2")
    assert [p.name for p in paths] == ["ep2_000.png", "ep2_001.png", "ep2_002.png"]
    assert png_size(paths[0]) == (800, 600)
    bad = [{"boxes_xyxy": np.array([[0, 0, 5, 5]]), "scores": np.array([0.9]), "labels": np.array([3])}]
    with pytest.raises(ValueError, match=r"label 3 is outside class_names \(contiguous labels 0..0\)"):
        draw_predictions(images[:1], bad, gts[:1], ["a"], tmp_path)
    with pytest.raises(ValueError, match="one entry per image, got 2, 1, 1"):
        draw_predictions(images[:2], preds[:1], gts[:1], ["a"], tmp_path)
    with pytest.raises(ValueError, match=r"got shape \(4, 4\)"):
        draw_predictions([np.zeros((4, 4))], preds[:1], gts[:1], ["a"], tmp_path)


def test_reliability_png(tmp_path):
    rel = reliability([0.05, 0.5, 0.55, 0.97], [0, 1, 0, 1], n_bins=10)
    assert png_size(plot_reliability(rel, tmp_path / "rel.png")) == (500, 600)
    with pytest.raises(ValueError, match="3 bin edges for 10 bins; expected 11"):
        plot_reliability({**rel, "bin_edges": [0, 0.5, 1]}, tmp_path / "bad.png")

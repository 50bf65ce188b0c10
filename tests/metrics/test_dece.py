"""D-ECE (Küppers et al. 2020): the ECE of the detections scoring >= a threshold, matched at IoU 0.5,
10 bins. By hand, through the COCO matching, and against netcal's own ECE in detection mode."""
from __future__ import annotations

import numpy as np
import pytest

from detsweep.metrics.calibration import calibration_metrics, dece, ece
from tests.metrics.test_calibration import det, gt_with, shifted


def test_dece_by_hand():
    scores = [0.91, 0.97, 0.55, 0.58, 0.32, 0.25]
    correct = [1, 1, 1, 0, 0, 1]
    # 0.25 is below the threshold. Kept: bin 9 {0.91, 0.97} acc 1 conf 0.94; bin 5 {0.55, 0.58} acc 0.5
    # conf 0.565; bin 3 {0.32} acc 0 conf 0.32. (2 * 0.06 + 2 * 0.065 + 1 * 0.32) / 5 = 0.114.
    assert dece(scores, correct, score_threshold=0.3) == pytest.approx(0.114)
    # ECE of all six: the 0.25 detection lands in bin 2 with acc 1: adds |1 - 0.25| = 0.75 of weight 1/6.
    assert ece(scores, correct) == pytest.approx((0.12 + 0.13 + 0.32 + 0.75) / 6)


def test_threshold_is_inclusive_and_nothing_kept_is_none():
    assert dece([0.3], [1], score_threshold=0.3) == pytest.approx(0.7)
    assert dece([0.29, 0.1], [1, 0], score_threshold=0.3) is None
    assert dece([], [], score_threshold=0.3) is None
    with pytest.raises(ValueError, match="score_threshold"):
        dece([0.5], [1], score_threshold=1.5)


def test_dece_matches_at_iou_half_whatever_match_iou_says():
    """A detection at IoU 0.6 is wrong for ECE at match_iou 0.7, right for D-ECE (its protocol's 0.5)."""
    gt = gt_with([(3, [0, 0, 100, 100])])
    dx = 25  # IoU (100 - 25) / (100 + 25) = 0.6
    dets = [det(3, shifted(dx), 0.8), det(7, [0, 0, 50, 50], 0.1)]
    m = calibration_metrics(gt, dets, match_iou=0.7, bins=10, score_threshold=0.3)
    assert m["dece"] == pytest.approx(abs(1 - 0.8))  # the 0.1 detection is below the threshold
    assert m["ece"] == pytest.approx((0.8 + 0.1) / 2)  # both wrong at 0.7
    assert calibration_metrics(gt, [], score_threshold=0.3)["dece"] is None


def test_against_netcal_on_random_detections():
    netcal = pytest.importorskip("netcal.metrics")
    rng = np.random.default_rng(0)
    for threshold in (0.0, 0.3, 0.5):
        scores = rng.random(2000)
        correct = (rng.random(2000) < scores ** 1.5).astype(int)  # over-confident, as detectors are
        keep = scores >= threshold
        theirs = netcal.ECE(bins=10, detection=True).measure(scores[keep], correct[keep])
        assert dece(scores, correct, score_threshold=threshold) == pytest.approx(theirs, abs=1e-12)

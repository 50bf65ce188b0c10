"""Calibration: greedy matching on crafted overlaps and against pycocotools, ECE/NLL/Brier by hand."""
from __future__ import annotations

import contextlib
import io
import math

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from detsweep.metrics import calibration
from detsweep.metrics.calibration import brier, calibration_metrics, ece, match_detections, nll, reliability


def gt_with(boxes, image_id=1, extra_images=(), crowd=()):
    """GT dict from (category_id, [x, y, w, h]) pairs on one image; categories 3, 7, 12."""
    anns = [{"id": i + 1, "image_id": image_id, "category_id": c, "bbox": b, "area": b[2] * b[3],
             "iscrowd": int(i in crowd)} for i, (c, b) in enumerate(boxes)]
    images = [{"id": i, "width": 500, "height": 500} for i in (image_id, *extra_images)]
    return {"images": images, "annotations": anns, "categories": [{"id": c} for c in (3, 7, 12)]}


def det(cat, box, score, image_id=1):
    return {"image_id": image_id, "category_id": cat, "bbox": box, "score": score}


def shifted(dx, box=(0, 0, 100, 100)):
    """`box` moved right by dx: IoU with `box` is (100 - dx) / (100 + dx) for a 100-wide box."""
    return [box[0] + dx, box[1], box[2], box[3]]



def test_duplicate_only_highest_score_matches_and_flags_follow_input_order():
    gt = gt_with([(3, [0, 0, 100, 100])])
    dets = [det(3, shifted(5), 0.6), det(3, shifted(20), 0.9)]  # lower score listed first
    assert match_detections(gt, dets).tolist() == [False, True]


def test_wrong_class_never_matches():
    gt = gt_with([(3, [0, 0, 100, 100])])
    assert match_detections(gt, [det(7, [0, 0, 100, 100], 0.99)]).tolist() == [False]


def test_score_order_beats_iou():
    # The better-placed detection loses the only GT to the higher-scored one.
    gt = gt_with([(3, [0, 0, 100, 100])])
    dets = [det(3, shifted(5), 0.8), det(3, shifted(20), 0.9)]
    assert match_detections(gt, dets).tolist() == [False, True]


def test_equal_scores_keep_input_order():
    gt = gt_with([(3, [0, 0, 100, 100])])
    dets = [det(3, shifted(20), 0.5), det(3, shifted(5), 0.5)]
    assert match_detections(gt, dets).tolist() == [True, False]


def test_takes_highest_iou_unmatched_gt_then_falls_back():
    # Two same-class GTs 10 px apart; det A overlaps both, prefers the better one; det B gets the other.
    gt = gt_with([(3, [0, 0, 100, 100]), (3, [10, 0, 100, 100])])
    a = det(3, [10, 0, 100, 100], 0.9)  # IoU 90/110 with GT1, 1.0 with GT2 -> GT2
    b = det(3, [12, 0, 100, 100], 0.8)  # IoU 88/112 with GT1, 98/102 with GT2 (taken) -> GT1
    c = det(3, [6, 0, 100, 100], 0.7)  # both GTs taken -> unmatched
    assert match_detections(gt, [c, b, a]).tolist() == [False, True, True]


def test_threshold_is_inclusive_and_configurable():
    gt = gt_with([(3, [0, 0, 100, 100])])
    dets = [det(3, shifted(20), 0.9)]
    assert match_detections(gt, dets, iou_threshold=0.6).tolist() == [True]
    assert match_detections(gt, dets, iou_threshold=0.7).tolist() == [False]
    # IoU exactly 0.5: 100x100 GT, 100x50 detection inside it.
    assert match_detections(gt, [det(3, [0, 0, 100, 50], 0.9)], iou_threshold=0.5).tolist() == [True]
    with pytest.raises(ValueError, match=r"iou_threshold must be in \(0, 1\], got 1.5"):
        match_detections(gt, dets, iou_threshold=1.5)


def test_crowd_gt_is_ignored():
    gt = gt_with([(3, [0, 0, 100, 100])], crowd=(0,))
    assert match_detections(gt, [det(3, [0, 0, 100, 100], 0.9)]).tolist() == [False]


def test_images_do_not_interact():
    gt = gt_with([(3, [0, 0, 100, 100])], extra_images=(2,))
    dets = [det(3, [0, 0, 100, 100], 0.9, image_id=2), det(3, [0, 0, 100, 100], 0.8, image_id=1)]
    assert match_detections(gt, dets).tolist() == [False, True]


def random_case(seed: int, n_images: int = 12):
    rng = np.random.default_rng(seed)
    anns, dets, images = [], [], []
    for img in range(1, n_images + 1):
        images.append({"id": img, "width": 300, "height": 300})
        for _ in range(int(rng.integers(0, 6))):
            xy, wh = rng.uniform(0, 200, 2), rng.uniform(10, 100, 2)
            anns.append({"id": len(anns) + 1, "image_id": img, "category_id": int(rng.choice([3, 7])),
                         "bbox": [*xy, *wh], "area": float(wh[0] * wh[1]), "iscrowd": 0})
        own = [a for a in anns if a["image_id"] == img]
        for _ in range(int(rng.integers(0, 30))):
            if own and rng.random() < 0.7:
                a = own[int(rng.integers(len(own)))]
                box = (np.array(a["bbox"]) + rng.normal(0, 8, 4)).clip(1).tolist()
            else:
                box = [*rng.uniform(0, 200, 2), *rng.uniform(10, 100, 2)]
            dets.append(det(int(rng.choice([3, 7])), box, float(rng.random()), image_id=img))
    gt = {"images": images, "annotations": anns, "categories": [{"id": 3}, {"id": 7}]}
    return gt, dets


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_pycocotools_dt_matches_at_iou_050(seed):
    gt, dets = random_case(seed)
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = {**gt, "annotations": [dict(a) for a in gt["annotations"]]}
        coco_gt.createIndex()
        evaluator = COCOeval(coco_gt, coco_gt.loadRes([dict(d) for d in dets]), "bbox")
        evaluator.evaluate()
    expected = np.zeros(len(dets), dtype=bool)
    for e in evaluator.evalImgs:
        if e is not None and e["aRng"] == evaluator.params.areaRng[0]:  # area "all"
            for dt_id, gt_id in zip(e["dtIds"], e["dtMatches"][0]):  # row 0: IoU 0.50
                expected[dt_id - 1] = gt_id > 0  # loadRes numbers detections 1..D in input order
    got = match_detections(gt, dets)
    assert expected.sum() > 5
    np.testing.assert_array_equal(got, expected)


def test_chunked_pairs_give_same_flags(monkeypatch):
    gt, dets = random_case(5)
    whole = match_detections(gt, dets)
    monkeypatch.setattr(calibration, "_MAX_PAIRS_PER_CHUNK", 7)
    np.testing.assert_array_equal(match_detections(gt, dets), whole)


# Hand-computed reference: bins (width 0.1) 0:{.05,c0} 1:{.15,c0} 2:{.25,c1} 5:{.55,c1} 9:{.95,c1; .92,c0}
CONF = [0.05, 0.15, 0.25, 0.95, 0.92, 0.55]
CORRECT = [0, 0, 1, 1, 0, 1]


def test_ece_by_hand():
    # (|0-.05| + |0-.15| + |1-.25| + |1-.55|)/6 + (2/6)*|0.5 - 0.935| = (1.4 + 0.87)/6
    assert ece(CONF, CORRECT, n_bins=10) == pytest.approx(2.27 / 6)
    # One bin: |mean(c) - mean(p)| = |0.5 - 2.87/6|
    assert ece(CONF, CORRECT, n_bins=1) == pytest.approx(abs(0.5 - 2.87 / 6))


def test_ece_last_bin_is_closed_and_perfect_calibration_is_zero():
    assert ece([1.0, 1.0], [1, 1], n_bins=10) == 0.0
    assert reliability([1.0], [1], n_bins=4)["count"] == [0, 0, 0, 1]
    assert ece([0.25, 0.25, 0.25, 0.25], [1, 0, 0, 0], n_bins=10) == pytest.approx(0.0)


def test_brier_by_hand():
    # (.05^2 + .15^2 + .75^2 + .05^2 + .92^2 + .45^2) / 6
    assert brier(CONF, CORRECT) == pytest.approx(1.6389 / 6)


def test_nll_by_hand_and_clipping():
    assert nll([0.5, 0.8, 0.1], [1, 1, 0]) == pytest.approx(-(math.log(0.5) + math.log(0.8) + math.log(0.9)) / 3)
    assert nll([0.0], [1]) == pytest.approx(-math.log(1e-7))  # clipped, finite
    assert nll([1.0], [0]) == pytest.approx(-math.log(1e-7), rel=1e-6)


def test_reliability_bins():
    r = reliability(CONF, CORRECT, n_bins=5)
    assert r["bin_edges"] == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    assert r["count"] == [2, 1, 1, 0, 2]
    assert r["accuracy"] == [0.0, 1.0, 1.0, None, 0.5]
    assert r["confidence"][0] == pytest.approx(0.1) and r["confidence"][3] is None
    assert r["confidence"][4] == pytest.approx(0.935)


def test_bad_inputs_name_the_values():
    with pytest.raises(ValueError, match=r"confidences must lie in \[0, 1\], got values in \[0.2, 1.5\]"):
        ece([0.2, 1.5], [0, 1])
    with pytest.raises(ValueError, match="same length, got 2 and 3"):
        brier([0.2, 0.5], [0, 1, 1])
    with pytest.raises(ValueError, match="n_bins must be a positive integer, got 0"):
        ece([0.2], [1], n_bins=0)
    with pytest.raises(ValueError, match=r"correct must be 0/1 or bool, got values \[0, 2\]"):
        nll([0.2, 0.3], [0, 2])


def test_calibration_metrics_end_to_end():
    gt = gt_with([(3, [0, 0, 100, 100]), (7, [200, 200, 50, 50])])
    dets = [det(3, shifted(5), 0.9), det(3, shifted(20), 0.6), det(7, [200, 200, 50, 50], 0.8),
            det(12, [400, 400, 20, 20], 0.1)]
    out = calibration_metrics(gt, dets, bins=10)
    p, c = np.array([0.9, 0.6, 0.8, 0.1]), np.array([1, 0, 1, 0])
    assert out["n_detections"] == 4
    # Bins 9, 6, 8, 1 each hold one detection: ECE = mean |c - p|.
    assert out["ece"] == pytest.approx(np.mean(np.abs(c - p)))
    assert out["brier"] == pytest.approx(np.mean((p - c) ** 2))
    assert out["nll"] == pytest.approx(-np.mean(c * np.log(p) + (1 - c) * np.log(1 - p)))
    assert sum(out["reliability"]["count"]) == 4


def test_zero_detections_give_none():
    out = calibration_metrics(gt_with([(3, [0, 0, 100, 100])]), [])
    assert (out["ece"], out["nll"], out["brier"], out["n_detections"]) == (None, None, None, 0)
    assert out["reliability"]["count"] == [0] * 10


def test_no_ground_truth_makes_every_detection_wrong():
    gt = {"images": [{"id": 1, "width": 10, "height": 10}], "annotations": [], "categories": [{"id": 3}]}
    dets = [det(3, [0, 0, 5, 5], 0.3), det(3, [1, 1, 5, 5], 0.7)]
    assert match_detections(gt, dets).tolist() == [False, False]
    assert calibration_metrics(gt, dets)["brier"] == pytest.approx((0.09 + 0.49) / 2)

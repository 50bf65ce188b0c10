"""Error taxonomy: one crafted case per kind, precedence between kinds, and the partition invariant."""
from __future__ import annotations

import numpy as np
import pytest

from detsweep.metrics.calibration import match_detections
from detsweep.metrics.errors import error_taxonomy

A = [0, 0, 100, 100]  # GT box of class 3
B = [300, 300, 100, 100]  # GT box of class 7


def gt_with(*boxes, crowd=()):
    anns = [{"id": i + 1, "image_id": 1, "category_id": c, "bbox": b, "area": b[2] * b[3], "iscrowd": int(i in crowd)}
            for i, (c, b) in enumerate(boxes)]
    return {"images": [{"id": 1, "width": 500, "height": 500}], "annotations": anns,
            "categories": [{"id": c} for c in (3, 7, 12)]}


def det(cat, box, score=0.9):
    return {"image_id": 1, "category_id": cat, "bbox": box, "score": score}


def right(box, dx):
    return [box[0] + dx, box[1], box[2], box[3]]


NONE = {"err_cls": 0, "err_loc": 0, "err_dup": 0, "err_bkg": 0, "err_missed": 0}

CASES = {
    # name: (gt boxes, detections, non-zero counts)
    "true_positive": ([(3, A)], [det(3, A)], {}),
    "cls": ([(3, A)], [det(7, A)], {"err_cls": 1, "err_missed": 1}),
    "loc": ([(3, A)], [det(3, right(A, 60))], {"err_loc": 1, "err_missed": 1}),  # IoU 40/160 = 0.25
    "dup": ([(3, A)], [det(3, A, 0.9), det(3, right(A, 5), 0.8)], {"err_dup": 1}),
    "bkg": ([(3, A)], [det(3, [200, 0, 50, 50])], {"err_bkg": 1, "err_missed": 1}),
    "missed": ([(3, A), (7, B)], [det(3, A)], {"err_missed": 1}),
    # Precedence: IoU 0.25 with its own class but 1.0 with another class's box -> cls, not loc.
    "cls_beats_loc": ([(3, A), (7, right(A, 60))], [det(3, right(A, 60))], {"err_cls": 1, "err_missed": 2}),
    # TIDE's "both": wrong class and IoU 0.25 -> folded into cls, not bkg.
    "both_is_cls": ([(3, A)], [det(7, right(A, 60))], {"err_cls": 1, "err_missed": 1}),
    # Just under the background threshold: IoU 10/190 ~ 0.053 < 0.1.
    "iou_below_0_1_is_bkg": ([(3, A)], [det(3, right(A, 90))], {"err_bkg": 1, "err_missed": 1}),
    # Crowd GTs are ignored: a detection on one is background, and the crowd box is not missed.
    "crowd_ignored": ([(3, A), (3, B)], [det(3, B)], {"err_bkg": 1, "err_missed": 1}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_one_crafted_case_per_kind(name):
    boxes, dets, nonzero = CASES[name]
    crowd = (1,) if name == "crowd_ignored" else ()
    assert error_taxonomy(gt_with(*boxes, crowd=crowd), dets) == {**NONE, **nonzero}


def test_all_kinds_in_one_image_and_threshold():
    gt = gt_with((3, A), (7, B), (12, [0, 300, 100, 100]))
    dets = [
        det(3, A, 0.95),  # true positive
        det(3, right(A, 5), 0.9),  # dup
        det(3, B, 0.85),  # cls
        det(7, right(B, 60), 0.8),  # loc
        det(3, [200, 0, 50, 50], 0.7),  # bkg
        det(12, [450, 0, 20, 20], 0.29),  # below the 0.3 threshold: not counted
    ]
    assert error_taxonomy(gt, dets) == {"err_cls": 1, "err_loc": 1, "err_dup": 1, "err_bkg": 1, "err_missed": 2}
    # With threshold 0.0 the low-scored detection counts as background too.
    assert error_taxonomy(gt, dets, score_threshold=0.0)["err_bkg"] == 2
    # Raising the threshold above the true positive's score: A is missed and its duplicates move up.
    assert error_taxonomy(gt, dets, score_threshold=0.96) == {**NONE, "err_missed": 3}


def test_kinds_partition_detections_above_threshold():
    rng = np.random.default_rng(0)
    anns, dets = [], []
    for i in range(30):
        xy, wh = rng.uniform(0, 300, 2), rng.uniform(10, 120, 2)
        anns.append((int(rng.choice([3, 7, 12])), [*xy, *wh]))
    for _ in range(200):
        c, b = anns[int(rng.integers(len(anns)))]
        box = (np.array(b) + rng.normal(0, 15, 4)).clip(1).tolist() if rng.random() < 0.7 else \
            [*rng.uniform(0, 300, 2), *rng.uniform(10, 120, 2)]
        dets.append(det(int(rng.choice([3, 7, 12])) if rng.random() < 0.3 else c, box, float(rng.random())))
    gt = gt_with(*anns)
    out = error_taxonomy(gt, dets, score_threshold=0.3)
    above = [d for d in dets if d["score"] >= 0.3]
    n_tp = int(match_detections(gt, above).sum())
    assert n_tp + out["err_cls"] + out["err_loc"] + out["err_dup"] + out["err_bkg"] == len(above)
    assert out["err_missed"] == len(anns) - n_tp
    assert min(out.values()) > 0  # this random scene exercises every kind


def test_bad_threshold_is_rejected():
    with pytest.raises(ValueError, match=r"score_threshold must be in \[0, 1\], got 2"):
        error_taxonomy(gt_with((3, A)), [], score_threshold=2)
    assert error_taxonomy(gt_with((3, A)), []) == {**NONE, "err_missed": 1}

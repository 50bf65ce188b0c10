"""COCO bbox evaluation: parity with pycocotools run directly, closed-form cases, backends, results file."""
from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from detsweep.metrics.coco import STAT_NAMES, coco_eval, write_detections_json

CATS = [3, 7, 12]  # gappy on purpose


def make_gt(n_images: int = 6, seed: int = 0) -> dict:
    """GT with a small, a medium and a large box per 200x200 image, one of each category."""
    rng = np.random.default_rng(seed)
    images, anns = [], []
    for img_id in range(1, n_images + 1):
        images.append({"id": img_id, "width": 200, "height": 200})
        # Area ranges: small < 32^2 <= medium < 96^2 <= large.
        for side, cat in zip((20.0, 50.0, 120.0), rng.permutation(CATS).tolist()):
            x, y = rng.uniform(0, 200 - side, size=2)
            anns.append({"id": len(anns) + 1, "image_id": img_id, "category_id": cat,
                         "bbox": [float(x), float(y), side, side], "area": side * side, "iscrowd": 0})
    return {"images": images, "annotations": anns, "categories": [{"id": c, "name": f"c{c}"} for c in CATS]}


def noisy_detections(gt: dict, seed: int = 1) -> list[dict]:
    rng = np.random.default_rng(seed)
    dets = []
    for a in gt["annotations"]:
        x, y, w, h = a["bbox"]
        for _ in range(2):
            j = rng.normal(0, 0.15, size=4) * [w, h, w, h]
            cat = a["category_id"] if rng.random() > 0.2 else int(rng.choice(CATS))
            dets.append({"image_id": a["image_id"], "category_id": cat,
                         "bbox": [x + j[0], y + j[1], max(w + j[2], 1.0), max(h + j[3], 1.0)],
                         "score": float(rng.random())})
    for img in gt["images"]:
        for _ in range(5):
            x, y = rng.uniform(0, 150, size=2)
            dets.append({"image_id": img["id"], "category_id": int(rng.choice(CATS)),
                         "bbox": [float(x), float(y), 30.0, 40.0], "score": float(rng.random() * 0.5)})
    return dets


def pycocotools_stats(gt_path, dets_path) -> np.ndarray:
    """pycocotools exactly as its README runs it, from files."""
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(str(gt_path))
        evaluator = COCOeval(coco_gt, coco_gt.loadRes(str(dets_path)), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator.stats


def as_stats(result: dict) -> np.ndarray:
    return np.array([-1.0 if result[k] is None else result[k] for k in STAT_NAMES])


def test_stats_equal_pycocotools_run_directly(tmp_path):
    gt = make_gt()
    dets = noisy_detections(gt)
    gt_path = tmp_path / "gt.json"
    gt_path.write_text(json.dumps(gt))
    dets_path = write_detections_json(dets, tmp_path / "dets.json")
    expected = pycocotools_stats(gt_path, dets_path)
    result = coco_eval(gt_path, dets)
    np.testing.assert_array_equal(as_stats(result), expected[:12])
    assert 0.0 < result["ap"] < 1.0  # a non-trivial case, not all zeros or ones


def test_does_not_mutate_inputs():
    gt = make_gt()
    dets = noisy_detections(gt)
    gt_before, dets_before = json.dumps(gt), json.dumps(dets)
    coco_eval(gt, dets)
    assert json.dumps(gt) == gt_before and json.dumps(dets) == dets_before


def test_perfect_detections_give_ap_one():
    gt = make_gt()
    dets = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9}
            for a in gt["annotations"]]
    result = coco_eval(gt, dets)
    # One GT per (image, category), so even AR@1 is perfect.
    np.testing.assert_allclose(as_stats(result), np.ones(12), atol=1e-12)
    assert set(result["per_class_ap"]) == set(CATS)
    assert all(v == pytest.approx(1.0) for v in result["per_class_ap"].values())


def test_known_iou_two_thirds_gives_ap50_one_ap75_zero():
    # GT 100x100 at the origin; detection shifted right by 20 px: inter 80*100, union 120*100 -> IoU 2/3,
    # kept off the 0.05 grid of COCO's IoU thresholds so float rounding cannot flip a threshold.
    gt = {"images": [{"id": 5, "width": 300, "height": 300}],
          "categories": [{"id": 12, "name": "x"}],
          "annotations": [{"id": 1, "image_id": 5, "category_id": 12, "bbox": [0, 0, 100, 100],
                           "area": 10000, "iscrowd": 0}]}
    dets = [{"image_id": 5, "category_id": 12, "bbox": [20, 0, 100, 100], "score": 0.7}]
    result = coco_eval(gt, dets)
    assert result["ap50"] == pytest.approx(1.0, abs=1e-12)
    assert result["ap75"] == 0.0
    # IoU 2/3 clears thresholds 0.50, 0.55, 0.60, 0.65 of the ten in [.5:.95].
    assert result["ap"] == pytest.approx(0.4)
    assert result["ap_large"] == pytest.approx(0.4)
    assert result["ar100"] == pytest.approx(0.4)
    # No GT in the small / medium ranges: COCOeval's -1 becomes None.
    assert result["ap_small"] is None and result["ap_medium"] is None
    assert result["ar_small"] is None and result["ar_medium"] is None
    assert result["per_class_ap"] == {12: pytest.approx(0.4)}


def test_zero_detections_give_zero_not_crash():
    result = coco_eval(make_gt(), [])
    assert as_stats(result).tolist() == [0.0] * 12
    assert result["per_class_ap"] == {3: 0.0, 7: 0.0, 12: 0.0}


def test_faster_coco_eval_matches_pycocotools():
    pytest.importorskip("faster_coco_eval")
    gt = make_gt(n_images=10, seed=3)
    dets = noisy_detections(gt, seed=4)
    ref = coco_eval(gt, dets, backend="pycocotools")
    fast = coco_eval(gt, dets, backend="faster_coco_eval")
    np.testing.assert_allclose(as_stats(fast), as_stats(ref), rtol=0, atol=1e-6)
    for cat in CATS:
        assert fast["per_class_ap"][cat] == pytest.approx(ref["per_class_ap"][cat], abs=1e-6)
    assert as_stats(coco_eval(gt, [], backend="faster_coco_eval")).tolist() == [0.0] * 12


def test_img_ids_restricts_evaluation():
    gt = make_gt(n_images=4)
    perfect_on_1 = [{"image_id": 1, "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9}
                    for a in gt["annotations"] if a["image_id"] == 1]
    assert coco_eval(gt, perfect_on_1, img_ids=[1])["ap50"] == pytest.approx(1.0)
    assert coco_eval(gt, perfect_on_1)["ap50"] < 1.0
    with pytest.raises(ValueError, match=r"img_ids \[99\] are not in the ground truth"):
        coco_eval(gt, perfect_on_1, img_ids=[1, 99])


def test_unknown_backend_lists_allowed():
    expected = r"unknown COCO eval backend 'detectron'; allowed: \['pycocotools', 'faster_coco_eval'\]"
    with pytest.raises(ValueError, match=expected):
        coco_eval(make_gt(), [], backend="detectron")


def test_contiguous_labels_instead_of_coco_ids_are_rejected():
    dets = [{"image_id": 1, "category_id": 0, "bbox": [0, 0, 5, 5], "score": 0.5}]
    with pytest.raises(ValueError, match=r"category_id\(s\) \[0\]; the ground-truth category ids are \[3, 7, 12\]"):
        coco_eval(make_gt(), dets)


def test_unknown_image_is_rejected():
    dets = [{"image_id": 1234, "category_id": 3, "bbox": [0, 0, 5, 5], "score": 0.5}]
    with pytest.raises(ValueError, match=r"image_id\(s\) \[1234\] that are not in the ground truth"):
        coco_eval(make_gt(), dets)


def test_write_detections_json_is_atomic_and_plain(tmp_path):
    dets = [{"image_id": np.int64(1), "category_id": np.int32(7), "bbox": np.array([1.0, 2.0, 3.0, 4.0]),
             "score": np.float32(0.5)}]
    path = write_detections_json(dets, tmp_path / "sub" / "dets.json")
    assert json.loads(path.read_text()) == [{"image_id": 1, "category_id": 7, "bbox": [1.0, 2.0, 3.0, 4.0],
                                             "score": 0.5}]
    assert sorted(p.name for p in path.parent.iterdir()) == ["dets.json"]  # no temporary file left


def test_evaluate_detections_flat_row_and_extras():
    from detsweep.metrics import evaluate_detections
    from detsweep.metrics.calibration import calibration_metrics
    from detsweep.metrics.errors import error_taxonomy

    gt = make_gt()
    dets = noisy_detections(gt)
    row = evaluate_detections(gt, dets, match_iou=0.6, bins=5, error_score_threshold=0.2)
    columns = [*STAT_NAMES, "ece", "dece", "nll", "brier", "n_detections",
               "err_cls", "err_loc", "err_dup", "err_bkg", "err_missed"]
    assert sorted(row) == sorted([*columns, "per_class_ap", "reliability"])
    assert {k: row[k] for k in STAT_NAMES} == {k: v for k, v in coco_eval(gt, dets).items() if k in STAT_NAMES}
    calib = calibration_metrics(gt, dets, match_iou=0.6, bins=5)
    assert (row["ece"], row["dece"], row["nll"], row["brier"], row["n_detections"]) == \
        (calib["ece"], calib["dece"], calib["nll"], calib["brier"], len(dets))
    assert len(row["reliability"]["count"]) == 5
    assert {k: row[k] for k in error_taxonomy(gt, dets)} == error_taxonomy(gt, dets, score_threshold=0.2)
    empty = evaluate_detections(gt, [])
    assert (empty["ap"], empty["ece"], empty["n_detections"], empty["err_missed"]) == (0.0, None, 0, 18)


def test_metrics_package_import_is_light():
    import subprocess
    import sys

    code = ("import sys, detsweep.metrics, detsweep.metrics.coco, detsweep.metrics.calibration, "
            "detsweep.metrics.errors; print(sorted(m for m in ('torch', 'matplotlib', 'ray') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    code = "import sys, detsweep.metrics.efficiency, detsweep.metrics.visuals; print('ray' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() \
        == "False"


def test_detection_arrays_input_gives_same_numbers():
    from detsweep.metrics import detection_arrays

    gt = make_gt()
    dets = noisy_detections(gt)
    arrays = detection_arrays(dets)
    assert len(arrays) == len(dets) and arrays.boxes_xywh.shape == (len(dets), 4)
    assert coco_eval(gt, arrays) == coco_eval(gt, dets)


def test_non_finite_detection_is_rejected():
    dets = [{"image_id": 1, "category_id": 3, "bbox": [0, 0, float("nan"), 5], "score": 0.5}]
    with pytest.raises(ValueError, match=r"must be finite, got score 0.5 bbox \[0.0, 0.0, nan, 5.0\] \(image_id 1\)"):
        coco_eval(make_gt(), dets)


def test_gt_without_area_or_iscrowd_is_evaluated_from_the_box():
    gt = make_gt()
    dets = noisy_detections(gt)
    bare = {**gt, "annotations": [{k: v for k, v in a.items() if k not in ("area", "iscrowd")}
                                  for a in gt["annotations"]]}
    assert coco_eval(bare, dets) == coco_eval(gt, dets)  # make_gt's area is exactly w*h

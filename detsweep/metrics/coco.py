"""COCO bbox evaluation (pycocotools or faster_coco_eval) and the COCO results-file format.

Inputs are framework-neutral: a COCO annotation dict (or JSON path) and a list of COCO results dicts.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

# Order of COCOeval.stats for iouType="bbox"; the names are the results-schema columns.
STAT_NAMES: tuple[str, ...] = (
    "ap", "ap50", "ap75", "ap_small", "ap_medium", "ap_large",
    "ar1", "ar10", "ar100", "ar_small", "ar_medium", "ar_large",
)
BACKENDS: tuple[str, ...] = ("pycocotools", "faster_coco_eval")


def load_ground_truth(gt: dict | str | Path) -> dict:
    """Return the COCO annotation dict, reading it from JSON if `gt` is a path.

    The returned dict is the caller's own object when a dict was passed; nothing here mutates it.
    """
    if isinstance(gt, dict):
        return gt
    if isinstance(gt, (str, os.PathLike)):
        with open(gt, encoding="utf-8") as f:
            data = json.load(f)
        if not isinstance(data, dict):
            raise ValueError(f"{gt}: expected a COCO annotation object, got a JSON {type(data).__name__}")
        return data
    raise TypeError(f"gt must be a COCO annotation dict or a JSON path, got {type(gt).__name__}")


@dataclass(frozen=True)
class GroundTruthArrays:
    """Non-crowd ground-truth boxes as arrays, in `gt["annotations"]` order.

    Crowd boxes (`iscrowd=1`) are dropped: for calibration and the error taxonomy a detection on a
    crowd region never counts as correct (pycocotools instead ignores such detections; COCO has ~1%
    crowd boxes, so the difference is small).
    """

    image_ids: np.ndarray  # [G] int64
    category_ids: np.ndarray  # [G] int64, original COCO ids
    boxes_xywh: np.ndarray  # [G, 4] float64, absolute pixels


@dataclass(frozen=True)
class DetectionArrays:
    """Detections as arrays, in input order; the columnar twin of a COCO results list."""

    image_ids: np.ndarray  # [D] int64
    category_ids: np.ndarray  # [D] int64, original COCO ids
    boxes_xywh: np.ndarray  # [D, 4] float64, absolute pixels
    scores: np.ndarray  # [D] float64

    def __len__(self) -> int:
        return len(self.scores)

    def subset(self, keep: np.ndarray) -> "DetectionArrays":
        return DetectionArrays(self.image_ids[keep], self.category_ids[keep], self.boxes_xywh[keep], self.scores[keep])


Detections = list[dict] | DetectionArrays  # every metric accepts either form


def gt_arrays(gt: dict) -> GroundTruthArrays:
    anns = [a for a in gt.get("annotations", []) if not a.get("iscrowd", 0)]
    return GroundTruthArrays(
        image_ids=np.array([a["image_id"] for a in anns], dtype=np.int64),
        category_ids=np.array([a["category_id"] for a in anns], dtype=np.int64),
        boxes_xywh=np.array([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4),
    )


def detection_arrays(detections: Detections) -> DetectionArrays:
    """COCO results dicts as DetectionArrays (returned unchanged if already arrays)."""
    if isinstance(detections, DetectionArrays):
        return detections
    n = len(detections)
    return DetectionArrays(
        image_ids=np.fromiter((d["image_id"] for d in detections), np.int64, count=n),
        category_ids=np.fromiter((d["category_id"] for d in detections), np.int64, count=n),
        boxes_xywh=np.array([d["bbox"] for d in detections], dtype=np.float64).reshape(n, 4),
        scores=np.fromiter((d["score"] for d in detections), np.float64, count=n),
    )


def check_detections(gt: dict, dets: DetectionArrays) -> None:
    """Raise ValueError if detections refer to unknown images/categories or hold non-finite numbers.

    An unknown `category_id` almost always means contiguous labels (0..K-1) were written instead of
    the original COCO ids, so the message names both sets.
    """
    image_ids = np.array([img["id"] for img in gt.get("images", [])], dtype=np.int64)
    category_ids = np.array([cat["id"] for cat in gt.get("categories", [])], dtype=np.int64)
    bad_images = np.unique(dets.image_ids[~np.isin(dets.image_ids, image_ids)])
    if bad_images.size:
        raise ValueError(
            f"detections reference image_id(s) {bad_images[:10].tolist()} that are not in the ground truth "
            f"({image_ids.size} images)"
        )
    bad_cats = np.unique(dets.category_ids[~np.isin(dets.category_ids, category_ids)])
    if bad_cats.size:
        raise ValueError(
            f"detections use category_id(s) {bad_cats[:10].tolist()}; the ground-truth category ids are "
            f"{sorted(category_ids.tolist())} (write original COCO ids, not contiguous labels)"
        )
    finite = np.isfinite(dets.scores) & np.isfinite(dets.boxes_xywh).all(axis=1)
    if not finite.all():
        i = int(np.flatnonzero(~finite)[0])
        raise ValueError(
            f"detection scores and boxes must be finite, got score {dets.scores[i]} bbox "
            f"{dets.boxes_xywh[i].tolist()} (image_id {dets.image_ids[i]})"
        )


def write_detections_json(detections: list[dict], path: str | Path) -> Path:
    """Write COCO results JSON atomically (`storage.write_bytes_atomic`: a temporary file, then a rename)."""
    from detsweep.storage import write_bytes_atomic

    path = Path(path)
    write_bytes_atomic(json.dumps([_plain_detection(d) for d in detections]).encode(), str(path))
    return path


def coco_eval(
    gt: dict | str | Path,
    detections: Detections,
    *,
    backend: str = "pycocotools",
    img_ids: list[int] | None = None,
) -> dict[str, Any]:
    """COCO bbox AP/AR of `detections` against `gt`, with no score threshold.

    Args:
        gt: COCO annotation dict or JSON path; category ids may be gappy (e.g. 3, 7, 12).
        detections: COCO results dicts `{"image_id", "category_id" (original id),
            "bbox": [x, y, w, h] absolute pixels, "score"}` (not mutated), or DetectionArrays.
        backend: "pycocotools" (reference) or "faster_coco_eval" (same numbers, C++ evaluate).
        img_ids: evaluate only these images (default: every image in `gt`).

    Returns:
        The 12 `COCOeval.stats` under STAT_NAMES as floats, None where COCOeval reports -1
        (no ground truth in that area range), plus `per_class_ap: {category_id: AP@[.5:.95] | None}`.
        Zero detections give 0.0 wherever there is ground truth (not a crash).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown COCO eval backend {backend!r}; allowed: {list(BACKENDS)}")
    gt = load_ground_truth(gt)
    dets = detection_arrays(detections)
    check_detections(gt, dets)
    if img_ids is not None:
        unknown = sorted(set(img_ids) - {img["id"] for img in gt.get("images", [])})
        if unknown:
            raise ValueError(f"img_ids {unknown[:10]} are not in the ground truth")

    coco_cls, eval_cls = _backend_classes(backend)
    out = io.StringIO()
    # Both libraries print progress to stdout; keep it out of trial logs but available at debug.
    with contextlib.redirect_stdout(out):
        coco_gt = _index(coco_cls, gt, _copy_annotations(gt.get("annotations", [])))
        coco_dt = _index(coco_cls, gt, _result_annotations(dets))
        if backend == "faster_coco_eval":  # it logs through print_function rather than stdout
            evaluator = eval_cls(coco_gt, coco_dt, "bbox", print_function=logger.debug)
        else:
            evaluator = eval_cls(coco_gt, coco_dt, "bbox")
        if img_ids is not None:
            evaluator.params.imgIds = sorted(set(img_ids))
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    logger.debug("COCOeval (%s) output:\n%s", backend, out.getvalue())

    stats = [float(s) for s in evaluator.stats[: len(STAT_NAMES)]]
    result: dict[str, Any] = {name: (None if s == -1 else s) for name, s in zip(STAT_NAMES, stats)}
    result["per_class_ap"] = _per_class_ap(evaluator)
    return result


def _backend_classes(backend: str) -> tuple[type, type]:
    if backend == "pycocotools":
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        return COCO, COCOeval
    try:  # optional extra: pip install 'detsweep[fast]'
        from faster_coco_eval import COCO, COCOeval_faster
    except ImportError as e:
        raise ImportError(
            "backend 'faster_coco_eval' needs the faster-coco-eval package "
            "(pip install 'detsweep[fast]'), or use backend='pycocotools'"
        ) from e
    return COCO, COCOeval_faster


def _index(coco_cls: type, gt: dict, annotations: list[dict]) -> Any:
    """A COCO API object over `gt`'s images/categories with the given annotations.

    Built directly instead of via `loadRes`, because pycocotools' `loadRes([])` fails on an empty list.
    """
    coco = coco_cls()
    coco.dataset = {
        "images": list(gt.get("images", [])),
        "categories": list(gt.get("categories", [])),
        "annotations": annotations,
    }
    coco.createIndex()
    return coco


def _copy_annotations(annotations: list[dict]) -> list[dict]:
    """Shallow copies (both COCOeval implementations write an "ignore" key into each GT dict),
    with the optional-looking keys COCOeval nevertheless requires: `area` (w*h of the box) and `iscrowd`."""
    copies = []
    for a in annotations:
        a = dict(a)
        if "area" not in a:
            a["area"] = float(a["bbox"][2]) * float(a["bbox"][3])
        a.setdefault("iscrowd", 0)
        copies.append(a)
    return copies


def _result_annotations(dets: DetectionArrays) -> list[dict]:
    """Detections as the annotation dicts `COCO.loadRes` would build for bbox results."""
    boxes = dets.boxes_xywh.tolist()  # one C-level conversion instead of per-value float() calls
    areas = (dets.boxes_xywh[:, 2] * dets.boxes_xywh[:, 3]).tolist()
    return [
        # ids start at 1: COCOeval uses 0 as "unmatched"
        {"id": i, "image_id": img, "category_id": cat, "bbox": box, "score": score, "area": area, "iscrowd": 0}
        for i, img, cat, box, score, area in zip(
            range(1, len(boxes) + 1), dets.image_ids.tolist(), dets.category_ids.tolist(), boxes,
            dets.scores.tolist(), areas,
        )
    ]


def _per_class_ap(evaluator: Any) -> dict[int, float | None]:
    """AP@[.5:.95] per category (area "all", maxDets 100), averaged as COCOeval.summarize does."""
    # precision: [T iou thresholds, R recall thresholds, K categories, A area ranges, M maxDets]
    precision = np.asarray(evaluator.eval["precision"])
    per_class: dict[int, float | None] = {}
    for k, cat_id in enumerate(evaluator.params.catIds):
        p = precision[:, :, k, 0, -1]
        valid = p[p > -1]
        per_class[int(cat_id)] = float(valid.mean()) if valid.size else None
    return per_class


def _plain_detection(d: dict) -> dict:
    """A JSON-serialisable copy of one detection (numpy scalars become Python numbers)."""
    return {
        "image_id": int(d["image_id"]),
        "category_id": int(d["category_id"]),
        "bbox": [float(v) for v in d["bbox"]],
        "score": float(d["score"]),
    }

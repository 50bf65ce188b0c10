"""COCO bbox evaluation (pycocotools or faster_coco_eval) and the COCO results-file format.

Inputs are framework-neutral: a COCO annotation dict (or JSON path) and a list of COCO results dicts.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import tempfile
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


def check_detections(gt: dict, detections: list[dict]) -> None:
    """Raise ValueError if detections refer to unknown images/categories or carry a non-finite score.

    An unknown `category_id` almost always means contiguous labels (0..K-1) were written instead of
    the original COCO ids, so the message names both sets.
    """
    image_ids = {img["id"] for img in gt.get("images", [])}
    category_ids = {cat["id"] for cat in gt.get("categories", [])}
    bad_images = sorted({d["image_id"] for d in detections} - image_ids)
    if bad_images:
        raise ValueError(
            f"detections reference image_id(s) {bad_images[:10]} that are not in the ground truth "
            f"({len(image_ids)} images)"
        )
    bad_cats = sorted({d["category_id"] for d in detections} - category_ids)
    if bad_cats:
        raise ValueError(
            f"detections use category_id(s) {bad_cats[:10]}; the ground-truth category ids are "
            f"{sorted(category_ids)} (write original COCO ids, not contiguous labels)"
        )
    for d in detections:
        if not math.isfinite(d["score"]):
            raise ValueError(f"detection score must be finite, got {d['score']!r} (image_id {d['image_id']})")


def write_detections_json(detections: list[dict], path: str | Path) -> Path:
    """Write COCO results JSON atomically (temporary file in the same folder, then os.replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump([_plain_detection(d) for d in detections], f)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def coco_eval(
    gt: dict | str | Path,
    detections: list[dict],
    *,
    backend: str = "pycocotools",
    img_ids: list[int] | None = None,
) -> dict[str, Any]:
    """COCO bbox AP/AR of `detections` against `gt`, with no score threshold.

    Args:
        gt: COCO annotation dict or JSON path; category ids may be gappy (e.g. 3, 7, 12).
        detections: COCO results dicts `{"image_id", "category_id" (original id),
            "bbox": [x, y, w, h] absolute pixels, "score"}`. Not mutated.
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
    check_detections(gt, detections)
    if img_ids is not None:
        unknown = sorted(set(img_ids) - {img["id"] for img in gt.get("images", [])})
        if unknown:
            raise ValueError(f"img_ids {unknown[:10]} are not in the ground truth")

    coco_cls, eval_cls = _backend_classes(backend)
    out = io.StringIO()
    # Both libraries print progress to stdout; keep it out of trial logs but available at debug.
    with contextlib.redirect_stdout(out):
        coco_gt = _index(coco_cls, gt, _copy_annotations(gt.get("annotations", [])))
        coco_dt = _index(coco_cls, gt, _result_annotations(detections))
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
    # Shallow copies: both COCOeval implementations write an "ignore" key into each GT dict.
    return [dict(a) for a in annotations]


def _result_annotations(detections: list[dict]) -> list[dict]:
    """Detections as the annotation dicts `COCO.loadRes` would build for bbox results."""
    anns = []
    for i, d in enumerate(detections):
        x, y, w, h = (float(v) for v in d["bbox"])
        anns.append({
            "id": i + 1,  # ids start at 1: COCOeval uses 0 as "unmatched"
            "image_id": int(d["image_id"]),
            "category_id": int(d["category_id"]),
            "bbox": [x, y, w, h],
            "score": float(d["score"]),
            "area": w * h,
            "iscrowd": 0,
        })
    return anns


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

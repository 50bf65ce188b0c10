"""Per-trial detection metrics: COCO AP/AR, calibration and the error taxonomy in one call.

Torch-free on import; `efficiency` and `visuals` (torch / matplotlib) are imported on their own.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from detsweep.metrics.calibration import calibration_metrics
from detsweep.metrics.coco import (
    STAT_NAMES,
    DetectionArrays,
    Detections,
    coco_eval,
    detection_arrays,
    load_ground_truth,
    write_detections_json,
)
from detsweep.metrics.errors import error_taxonomy

__all__ = [
    "STAT_NAMES",
    "DetectionArrays",
    "detection_arrays",
    "calibration_metrics",
    "coco_eval",
    "error_taxonomy",
    "evaluate_detections",
    "write_detections_json",
]


def evaluate_detections(
    gt: dict | str | Path,
    detections: Detections,
    *,
    match_iou: float = 0.5,
    bins: int = 10,
    error_score_threshold: float = 0.3,
    backend: str = "pycocotools",
    score_threshold: float = 0.3,
) -> dict[str, Any]:
    """All quality metrics of one trial's val detections, as results-schema columns.

    Args:
        gt: COCO annotation dict or JSON path.
        detections: COCO results dicts (`bbox` = [x, y, w, h] absolute pixels, original category ids)
            or DetectionArrays.

    Returns:
        Flat dict: the 12 COCO stats (`ap` ... `ar_large`, None where no GT in an area range),
        `ece`, `dece` (detections scoring >= `score_threshold`), `nll`, `brier` (None with zero detections),
        `n_detections`, `err_cls`, `err_loc`, `err_dup`, `err_bkg`, `err_missed`; plus non-column extras
        `per_class_ap` and `reliability`.
    """
    # Read a JSON path and convert the detection dicts once, not once per metric.
    gt = load_ground_truth(gt)
    dets = detection_arrays(detections)
    result = coco_eval(gt, dets, backend=backend)
    result.update(calibration_metrics(gt, dets, match_iou=match_iou, bins=bins, score_threshold=score_threshold))
    result.update(error_taxonomy(gt, dets, score_threshold=error_score_threshold))
    return result

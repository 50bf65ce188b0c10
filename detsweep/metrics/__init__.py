"""Per-trial detection metrics: COCO AP/AR, calibration and the error taxonomy in one call.

Torch-free on import; `efficiency` and `visuals` (torch / matplotlib) are imported on their own.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from detsweep.metrics.calibration import calibration_metrics
from detsweep.metrics.coco import STAT_NAMES, coco_eval, load_ground_truth, write_detections_json
from detsweep.metrics.errors import error_taxonomy

__all__ = [
    "STAT_NAMES",
    "calibration_metrics",
    "coco_eval",
    "error_taxonomy",
    "evaluate_detections",
    "write_detections_json",
]


def evaluate_detections(
    gt: dict | str | Path,
    detections: list[dict],
    *,
    match_iou: float = 0.5,
    bins: int = 10,
    error_score_threshold: float = 0.3,
    backend: str = "pycocotools",
) -> dict[str, Any]:
    """All quality metrics of one trial's val detections, as results-schema columns.

    Args:
        gt: COCO annotation dict or JSON path.
        detections: COCO results dicts (`bbox` = [x, y, w, h] absolute pixels, original category ids).

    Returns:
        Flat dict: the 12 COCO stats (`ap` ... `ar_large`, None where no GT in an area range),
        `ece`, `nll`, `brier` (None with zero detections), `n_detections`, `err_cls`, `err_loc`,
        `err_dup`, `err_bkg`, `err_missed`; plus non-column extras `per_class_ap` and `reliability`.
    """
    gt = load_ground_truth(gt)  # read a JSON path once, not once per metric
    result = coco_eval(gt, detections, backend=backend)
    result.update(calibration_metrics(gt, detections, match_iou=match_iou, bins=bins))
    result.update(error_taxonomy(gt, detections, score_threshold=error_score_threshold))
    return result

"""TIDE-like error taxonomy of detections: classification, localisation, duplicate, background, missed.

Pure numpy; reuses the greedy matching of `calibration.py`.
"""
from __future__ import annotations

from pathlib import Path

from detsweep.metrics.calibration import greedy_match, pairwise_overlaps
from detsweep.metrics.coco import Detections, check_detections, detection_arrays, gt_arrays, load_ground_truth

# Foreground / background IoU thresholds of TIDE (Bolya et al., ECCV 2020).
FG_IOU = 0.5
BG_IOU = 0.1


def error_taxonomy(gt: dict | str | Path, detections: Detections, *, score_threshold: float = 0.3) -> dict[str, int]:
    """Count detection errors by kind, TIDE-style, over detections with score >= `score_threshold`.

    True positives come from the greedy matching at IoU 0.5 (`calibration.match_detections`: per image
    in descending score, each takes the unmatched same-class GT with the highest IoU). Every other
    detection gets exactly one kind, checked in this order, where `s` is its best IoU with a
    same-class GT and `o` its best IoU with a GT of another class (non-crowd GTs of its image):

    1. `err_dup`: s >= 0.5, i.e. right class and well placed, but every such GT was already taken
       by a higher-scored detection;
    2. `err_cls`: o >= 0.5, a well-placed box with the wrong class;
    3. `err_loc`: 0.1 <= s < 0.5, the right class, badly placed;
    4. `err_cls`: 0.1 <= o < 0.5, wrong class and badly placed (TIDE's "both" error, folded into cls
       because fixing the box alone would not make it correct);
    5. `err_bkg`: s < 0.1 and o < 0.1, IoU below 0.1 with every GT box.

    `err_missed` counts non-crowd GT boxes not matched by any true positive above the threshold.
    Crowd GT boxes are ignored throughout (a detection only on a crowd region counts as background).
    Returns ints `{"err_cls", "err_loc", "err_dup", "err_bkg", "err_missed"}`.
    """
    if not 0.0 <= score_threshold <= 1.0:
        raise ValueError(f"score_threshold must be in [0, 1], got {score_threshold!r}")
    gt = load_ground_truth(gt)
    all_dets = detection_arrays(detections)
    check_detections(gt, all_dets)
    gts = gt_arrays(gt)
    dets = all_dets.subset(all_dets.scores >= score_threshold)
    overlaps = pairwise_overlaps(gts, dets, FG_IOU)
    tp, gt_matched = greedy_match(overlaps, dets, len(gts.image_ids))

    s, o = overlaps.best_same_iou, overlaps.best_other_iou
    dup = ~tp & (s >= FG_IOU)
    cls_fg = ~tp & ~dup & (o >= FG_IOU)
    loc = ~tp & ~dup & ~cls_fg & (s >= BG_IOU)
    cls_both = ~tp & ~dup & ~cls_fg & ~loc & (o >= BG_IOU)
    bkg = ~tp & ~dup & ~cls_fg & ~loc & ~cls_both
    return {
        "err_cls": int(cls_fg.sum() + cls_both.sum()),
        "err_loc": int(loc.sum()),
        "err_dup": int(dup.sum()),
        "err_bkg": int(bkg.sum()),
        "err_missed": int((~gt_matched).sum()),
    }

"""Detection calibration: COCO-style greedy matching, then ECE / NLL / Brier and reliability bins.

Pure numpy. The vectorised matching helpers here are shared with `errors.py`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from detsweep.metrics.coco import (
    DetectionArrays,
    Detections,
    GroundTruthArrays,
    check_detections,
    detection_arrays,
    gt_arrays,
    load_ground_truth,
)

NLL_EPS = 1e-7  # probabilities are clipped to [eps, 1 - eps] so NLL stays finite (DESIGN.md)
# D-ECE's protocol (Küppers et al., "Multivariate Confidence Calibration for Object Detection", CVPR-W 2020,
# and the papers that report it): a detection is correct at IoU >= 0.5, confidences in 10 equal-width bins.
DECE_IOU = 0.5
DECE_BINS = 10
_MAX_PAIRS_PER_CHUNK = 1 << 22  # bounds memory of the det x GT pair arrays (~4M pairs, ~200 MB)


@dataclass(frozen=True)
class Overlaps:
    """Per-detection overlap summary against the non-crowd GT boxes of the same image.

    `cand_*` are the same-class (detection, GT) pairs with IoU >= the matching threshold.
    """

    best_same_iou: np.ndarray  # [D] max IoU with a same-class GT (0 when none)
    best_other_iou: np.ndarray  # [D] max IoU with a GT of another class (0 when none)
    cand_det: np.ndarray  # [P] detection index
    cand_gt: np.ndarray  # [P] GT index into GroundTruthArrays
    cand_iou: np.ndarray  # [P]


def box_iou_xywh_pairs(a_xywh: np.ndarray, b_xywh: np.ndarray) -> np.ndarray:
    """IoU of row-aligned box pairs: [P, 4] x [P, 4] (x, y, w, h) -> [P]; pycocotools' bbox IoU."""
    ix = np.minimum(a_xywh[:, 0] + a_xywh[:, 2], b_xywh[:, 0] + b_xywh[:, 2]) - np.maximum(a_xywh[:, 0], b_xywh[:, 0])
    iy = np.minimum(a_xywh[:, 1] + a_xywh[:, 3], b_xywh[:, 1] + b_xywh[:, 3]) - np.maximum(a_xywh[:, 1], b_xywh[:, 1])
    inter = np.clip(ix, 0, None) * np.clip(iy, 0, None)
    union = a_xywh[:, 2] * a_xywh[:, 3] + b_xywh[:, 2] * b_xywh[:, 3] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def pairwise_overlaps(gts: GroundTruthArrays, dets: DetectionArrays, iou_threshold: float) -> Overlaps:
    """IoU of every detection with every GT box of its image, vectorised over all images at once."""
    n_det = len(dets.scores)
    best_same = np.zeros(n_det)
    best_other = np.zeros(n_det)
    cands: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    if not len(gts.image_ids):
        empty = np.zeros(0, dtype=np.int64)
        return Overlaps(best_same, best_other, empty, empty, np.zeros(0))
    # Group GT by image; each detection gets the contiguous GT slice of its image.
    g_order = np.argsort(gts.image_ids, kind="stable")
    uniq, start, count = np.unique(gts.image_ids[g_order], return_index=True, return_counts=True)
    pos = np.minimum(np.searchsorted(uniq, dets.image_ids), len(uniq) - 1)
    has_gt = uniq[pos] == dets.image_ids
    n_pairs = np.where(has_gt, count[pos], 0)
    first = np.where(has_gt, start[pos], 0)

    cum = np.cumsum(n_pairs)
    lo = 0
    while lo < n_det:
        base = cum[lo - 1] if lo else 0
        hi = max(int(np.searchsorted(cum, base + _MAX_PAIRS_PER_CHUNK, side="right")), lo + 1)
        counts = n_pairs[lo:hi]
        if counts.sum():
            det_idx = np.repeat(np.arange(lo, hi), counts)
            offsets = np.cumsum(counts) - counts
            within = np.arange(counts.sum()) - np.repeat(offsets, counts)
            gt_idx = g_order[np.repeat(first[lo:hi], counts) + within]
            iou = box_iou_xywh_pairs(dets.boxes_xywh[det_idx], gts.boxes_xywh[gt_idx])
            same = dets.category_ids[det_idx] == gts.category_ids[gt_idx]
            # Pairs are grouped by detection, so a segment max is a reduceat over segment starts.
            nz = counts > 0
            seg_starts = offsets[nz]
            best_same[lo:hi][nz] = np.maximum.reduceat(np.where(same, iou, 0.0), seg_starts)
            best_other[lo:hi][nz] = np.maximum.reduceat(np.where(same, 0.0, iou), seg_starts)
            keep = same & (iou >= iou_threshold)
            cands.append((det_idx[keep], gt_idx[keep], iou[keep]))
        lo = hi
    if cands:
        cand_det, cand_gt, cand_iou = (np.concatenate(x) for x in zip(*cands))
    else:
        cand_det = cand_gt = np.zeros(0, dtype=np.int64)
        cand_iou = np.zeros(0)
    return Overlaps(best_same, best_other, cand_det, cand_gt, cand_iou)


def greedy_match(overlaps: Overlaps, dets: DetectionArrays, n_gt: int) -> tuple[np.ndarray, np.ndarray]:
    """COCO-style greedy matching over the candidate pairs.

    Per image, detections go in descending score (ties: input order, i.e. a stable sort); each takes
    the still-unmatched same-class GT with the highest IoU (ties: lowest GT index). Returns
    `(det_matched [D] bool, gt_matched [G] bool)`.
    """
    det_matched = np.zeros(len(dets.scores), dtype=bool)
    gt_matched = np.zeros(n_gt, dtype=bool)
    if not len(overlaps.cand_det):
        return det_matched, gt_matched
    # Global rank of each detection in (image, -score, input index) order; only within-image order matters.
    order = np.lexsort((np.arange(len(dets.scores)), -dets.scores, dets.image_ids))
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    pair_order = np.lexsort((overlaps.cand_gt, -overlaps.cand_iou, rank[overlaps.cand_det]))
    # Sequential by nature (a GT taken by a higher score is gone), but only candidate pairs reach Python.
    taken: set[int] = set()
    last_det, last_done = -1, False
    for d, g in zip(overlaps.cand_det[pair_order].tolist(), overlaps.cand_gt[pair_order].tolist()):
        if d != last_det:
            last_det, last_done = d, False
        if last_done or g in taken:
            continue
        taken.add(g)
        det_matched[d] = True
        last_done = True
    gt_matched[list(taken)] = True
    return det_matched, gt_matched


def match_detections(gt: dict | str | Path, detections: Detections, *, iou_threshold: float = 0.5) -> np.ndarray:
    """Mark each detection correct (True) or not by COCO-style greedy matching (DESIGN.md).

    Per image, detections are taken in descending score; ties keep input order (stable sort). Each is
    matched to the unmatched non-crowd GT box of the same class with the highest IoU >= `iou_threshold`
    (IoU ties: the GT listed first); each GT matches at most once. Crowd GT boxes are ignored.

    Returns: [D] bool, aligned with the input `detections` order.
    """
    if not 0.0 < iou_threshold <= 1.0:
        raise ValueError(f"iou_threshold must be in (0, 1], got {iou_threshold!r}")
    gt = load_ground_truth(gt)
    dets = detection_arrays(detections)
    check_detections(gt, dets)
    gts = gt_arrays(gt)
    matched, _ = greedy_match(pairwise_overlaps(gts, dets, iou_threshold), dets, len(gts.image_ids))
    return matched


def _as_prob_arrays(confidences: Any, correct: Any) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(confidences, dtype=np.float64).ravel()
    c = np.asarray(correct).ravel()
    if p.shape != c.shape:
        raise ValueError(f"confidences and correct must have the same length, got {p.size} and {c.size}")
    if p.size and not (np.all(p >= 0.0) and np.all(p <= 1.0)):  # also rejects NaN
        raise ValueError(f"confidences must lie in [0, 1], got values in [{np.nanmin(p)}, {np.nanmax(p)}]")
    if c.size and not np.all((c == 0) | (c == 1)):
        raise ValueError(f"correct must be 0/1 or bool, got values {np.unique(c)[:5].tolist()}")
    return p, c.astype(np.float64)


def _bin_index(p: np.ndarray, n_bins: int) -> np.ndarray:
    """Equal-width bin of each confidence: bin b holds [b/n, (b+1)/n), the last bin also holds 1.0."""
    if not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}")
    return np.minimum((p * n_bins).astype(np.int64), n_bins - 1)


def ece(confidences: Any, correct: Any, n_bins: int = 10) -> float | None:
    """Expected calibration error: sum_b (n_b / N) * |acc_b - conf_b|; None for zero detections."""
    p, c = _as_prob_arrays(confidences, correct)
    idx = _bin_index(p, n_bins)
    if not p.size:
        return None
    # (n_b/N)|acc_b - conf_b| == |sum_b(c) - sum_b(p)| / N, so no per-bin division is needed.
    gap = np.bincount(idx, weights=c, minlength=n_bins) - np.bincount(idx, weights=p, minlength=n_bins)
    return float(np.abs(gap).sum() / p.size)


def dece(confidences: Any, correct: Any, score_threshold: float = 0.3, n_bins: int = DECE_BINS) -> float | None:
    """Detection ECE (D-ECE, confidence only): the ECE of the detections whose confidence is at least
    `score_threshold`, over `n_bins` equal-width bins on [0, 1] (the bins below the threshold stay empty),
    as `netcal.metrics.ECE(bins, detection=True)` computes it. None when no detection is kept."""
    p, c = _as_prob_arrays(confidences, correct)
    if not 0.0 <= score_threshold <= 1.0:
        raise ValueError(f"score_threshold must be in [0, 1], got {score_threshold!r}")
    keep = p >= score_threshold
    return ece(p[keep], c[keep], n_bins)


def nll(confidences: Any, correct: Any) -> float | None:
    """Binary negative log-likelihood -mean(c log p + (1-c) log(1-p)), p clipped to [1e-7, 1-1e-7]."""
    p, c = _as_prob_arrays(confidences, correct)
    if not p.size:
        return None
    p = np.clip(p, NLL_EPS, 1.0 - NLL_EPS)
    return float(-np.mean(c * np.log(p) + (1.0 - c) * np.log1p(-p)))


def brier(confidences: Any, correct: Any) -> float | None:
    """Brier score mean((p - c)^2); None for zero detections."""
    p, c = _as_prob_arrays(confidences, correct)
    if not p.size:
        return None
    return float(np.mean((p - c) ** 2))


def reliability(confidences: Any, correct: Any, n_bins: int = 10) -> dict[str, list]:
    """Reliability-diagram data over equal-width bins on [0, 1] (last bin closed).

    Returns `{"bin_edges": [n_bins + 1], "count": [n_bins] int, "accuracy": [n_bins] float | None,
    "confidence": [n_bins] mean confidence | None}`; None marks an empty bin.
    """
    p, c = _as_prob_arrays(confidences, correct)
    idx = _bin_index(p, n_bins)
    count = np.bincount(idx, minlength=n_bins)
    sum_c = np.bincount(idx, weights=c, minlength=n_bins)
    sum_p = np.bincount(idx, weights=p, minlength=n_bins)
    return {
        "bin_edges": np.linspace(0.0, 1.0, n_bins + 1).tolist(),
        "count": count.tolist(),
        "accuracy": [float(s / n) if n else None for s, n in zip(sum_c, count)],
        "confidence": [float(s / n) if n else None for s, n in zip(sum_p, count)],
    }


def calibration_metrics(
    gt: dict | str | Path, detections: Detections, *, match_iou: float = 0.5, bins: int = 10,
    score_threshold: float = 0.3,
) -> dict[str, Any]:
    """ECE / NLL / Brier of detection scores against greedy-matching correctness (DESIGN.md), and D-ECE.

    ECE, NLL and Brier count every detection (no score threshold), matched at `match_iou` and binned in
    `bins`. D-ECE follows its paper's protocol: detections scoring >= `score_threshold`, matched at IoU 0.5,
    10 bins, whatever `match_iou` and `bins` say. Returns `{"ece", "dece", "nll", "brier", "n_detections",
    "reliability"}`; with zero detections ece/dece/nll/brier are None and n_detections is 0.
    """
    dets = detection_arrays(detections)
    correct = match_detections(gt, dets, iou_threshold=match_iou)
    correct_dece = correct if match_iou == DECE_IOU else match_detections(gt, dets, iou_threshold=DECE_IOU)
    scores = dets.scores
    return {
        "ece": ece(scores, correct, bins),
        "dece": dece(scores, correct_dece, score_threshold, DECE_BINS),
        "nll": nll(scores, correct),
        "brier": brier(scores, correct),
        "n_detections": len(detections),
        "reliability": reliability(scores, correct, bins),
    }

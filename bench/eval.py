"""Benchmark: plain pycocotools COCOeval vs our evaluate_detections (pycocotools / faster_coco_eval backends).

Run: .venv/bin/python bench/eval.py [--images 5000] [--dets-per-image 100]
Writes the section "## Evaluation (bench/eval.py)" of bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import logging
import platform
import re
import time
from pathlib import Path

import numpy as np

from detsweep.metrics import STAT_NAMES, evaluate_detections
from detsweep.metrics.calibration import calibration_metrics
from detsweep.metrics.errors import error_taxonomy

logger = logging.getLogger("bench.eval")
CATEGORY_IDS = [1, 3, 7, 12, 18, 25, 33, 44, 51, 62]  # gappy on purpose, like COCO's
IMAGE_SIZE = (640, 480)  # width, height
RESULTS = Path(__file__).with_name("RESULTS.md")
SECTION = "## Evaluation (bench/eval.py)"


def make_dataset(n_images: int, dets_per_image: int, seed: int = 0) -> tuple[dict, list[dict]]:
    """Synthetic COCO GT (1-15 boxes per image, all area ranges) and noisy detections.

    Per image: a jittered copy of each GT box (sometimes the wrong class), a few duplicates,
    and random background boxes to fill up to `dets_per_image`; scores correlate with quality.
    """
    rng = np.random.default_rng(seed)
    width, height = IMAGE_SIZE
    images, annotations, detections = [], [], []
    cats = np.array(CATEGORY_IDS)
    for img_id in range(1, n_images + 1):
        images.append({"id": img_id, "width": width, "height": height, "file_name": f"{img_id:06d}.jpg"})
        n_gt = int(rng.integers(1, 16))
        sizes = np.exp(rng.uniform(np.log(8), np.log(300), size=(n_gt, 2)))
        xy = rng.uniform(0, 1, size=(n_gt, 2)) * (np.array([width, height]) - sizes).clip(min=1)
        gt_xywh = np.concatenate([xy, sizes], axis=1)
        gt_cat = rng.choice(cats, size=n_gt)
        for box, cat in zip(gt_xywh, gt_cat):
            annotations.append({
                "id": len(annotations) + 1, "image_id": img_id, "category_id": int(cat),
                "bbox": box.tolist(), "area": float(box[2] * box[3]), "iscrowd": 0,
            })
        # True-ish detections: jitter proportional to box size; 10% get a wrong class.
        n_dup = min(n_gt, 3)
        src = np.concatenate([np.arange(n_gt), rng.integers(0, n_gt, size=n_dup)])
        jitter = rng.normal(0, 0.12, size=(len(src), 4)) * np.repeat(gt_xywh[src, 2:], 2, axis=1)
        det_xywh = gt_xywh[src] + jitter
        det_xywh[:, 2:] = det_xywh[:, 2:].clip(min=1)
        det_cat = np.where(rng.random(len(src)) < 0.1, rng.choice(cats, size=len(src)), gt_cat[src])
        det_score = rng.beta(5, 2, size=len(src))
        # Background fill.
        n_bkg = max(dets_per_image - len(src), 0)
        bsize = np.exp(rng.uniform(np.log(8), np.log(200), size=(n_bkg, 2)))
        bxy = rng.uniform(0, 1, size=(n_bkg, 2)) * (np.array([width, height]) - bsize).clip(min=1)
        det_xywh = np.concatenate([det_xywh, np.concatenate([bxy, bsize], axis=1)])[:dets_per_image]
        det_cat = np.concatenate([det_cat, rng.choice(cats, size=n_bkg)])[:dets_per_image]
        det_score = np.concatenate([det_score, rng.beta(1, 6, size=n_bkg)])[:dets_per_image]
        for box, cat, score in zip(det_xywh.tolist(), det_cat.tolist(), det_score.tolist()):
            detections.append({"image_id": img_id, "category_id": cat, "bbox": box, "score": score})
    gt = {"images": images, "annotations": annotations,
          "categories": [{"id": c, "name": f"class_{c}"} for c in CATEGORY_IDS]}
    return gt, detections


def plain_pycocotools(gt: dict, detections: list[dict]) -> list[float]:
    """The reference: COCO / loadRes / COCOeval exactly as the pycocotools README does it."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = {**gt, "annotations": [dict(a) for a in gt["annotations"]]}
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes([dict(d) for d in detections])
        evaluator = COCOeval(coco_gt, coco_dt, "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return [float(s) for s in evaluator.stats]


def timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


def max_stat_diff(reference: list[float], result: dict) -> float:
    return max(abs(r - (-1.0 if result[k] is None else result[k])) for r, k in zip(reference, STAT_NAMES))


def write_section(text: str) -> None:
    """Replace (or append) our section of bench/RESULTS.md, leaving other sections alone."""
    old = RESULTS.read_text(encoding="utf-8") if RESULTS.exists() else "# Benchmark results\n"
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    new = pattern.sub(lambda _: text, old) if pattern.search(old) else old.rstrip("\n") + "\n\n" + text
    RESULTS.write_text(new, encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--dets-per-image", type=int, default=100)
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    (gt, dets), t_gen = timed(make_dataset, args.images, args.dets_per_image)
    n_det = len(dets)
    logger.info("generated %d images, %d GT boxes, %d detections in %.1fs",
                args.images, len(gt["annotations"]), n_det, t_gen)

    ref, t_ref = timed(plain_pycocotools, gt, dets)
    logger.info("plain pycocotools COCOeval: %.1fs", t_ref)
    _, t_calib = timed(calibration_metrics, gt, dets)
    _, t_err = timed(error_taxonomy, gt, dets)
    logger.info("calibration %.2fs, errors %.2fs", t_calib, t_err)
    ours_fast, t_fast = timed(evaluate_detections, gt, dets, backend="faster_coco_eval")
    logger.info("evaluate_detections(faster_coco_eval): %.1fs", t_fast)
    ours_ref, t_ours = timed(evaluate_detections, gt, dets, backend="pycocotools")
    logger.info("evaluate_detections(pycocotools): %.1fs", t_ours)

    diff_ref = max_stat_diff(ref, ours_ref)
    diff_fast = max_stat_diff(ref, ours_fast)
    from importlib.metadata import version

    lines = [
        SECTION, "",
        f"Machine: {platform.machine()} CPU, 2 cores (shared), Python {platform.python_version()}, "
        f"numpy {np.__version__}, torch {version('torch')}, pycocotools {version('pycocotools')}, "
        f"faster-coco-eval {version('faster-coco-eval')}.",
        f"Data: {args.images} synthetic 640x480 images, {len(gt['annotations'])} GT boxes over "
        f"{len(CATEGORY_IDS)} gappy category ids, {n_det} detections ({args.dets_per_image}/image), seed 0.",
        "", "| path | seconds | speed-up vs plain pycocotools |", "|---|---:|---:|",
        f"| plain pycocotools `COCOeval` (COCO AP only) | {t_ref:.1f} | 1.00x |",
        f"| `evaluate_detections(backend=\"pycocotools\")` (AP + calibration + errors) | {t_ours:.1f} | {t_ref / t_ours:.2f}x |",
        f"| `evaluate_detections(backend=\"faster_coco_eval\")` (AP + calibration + errors) | {t_fast:.1f} | {t_ref / t_fast:.2f}x |",
        f"| of which `calibration_metrics` | {t_calib:.2f} | |",
        f"| of which `error_taxonomy` | {t_err:.2f} | |",
        "",
        f"12 COCO stats vs plain pycocotools: pycocotools backend max |diff| = {diff_ref:.1e} "
        f"({'identical' if diff_ref == 0 else 'not bit-identical'}); faster_coco_eval backend max |diff| = "
        f"{diff_fast:.1e} ({'identical' if diff_fast == 0 else 'within 1e-6' if diff_fast <= 1e-6 else 'DIFFERENT'}).",
        f"Goal (faster_coco_eval path >= 3x plain pycocotools): {'met' if t_ref / t_fast >= 3 else 'NOT met'} "
        f"({t_ref / t_fast:.2f}x).",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        write_section(text)


if __name__ == "__main__":
    main()

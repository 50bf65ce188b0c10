"""Benchmark: plain pycocotools COCOeval vs our evaluate_detections (pycocotools / faster_coco_eval backends).

Run: .venv/bin/python bench/eval.py [--images 5000] [--dets-per-image 100]
Writes the section "## Evaluation (bench/eval.py)" of bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import platform
import time
from importlib.metadata import version

import numpy as np

from detsweep.metrics import STAT_NAMES, coco_eval, detection_arrays, evaluate_detections
from detsweep.metrics.calibration import calibration_metrics
from detsweep.metrics.errors import error_taxonomy

logger = logging.getLogger("bench.eval")
CATEGORY_IDS = [1, 3, 7, 12, 18, 25, 33, 44, 51, 62]  # gappy on purpose, like COCO's
IMAGE_SIZE = (640, 480)  # width, height
TITLE = "Evaluation (bench/eval.py)"
SECTION = f"## {TITLE}"


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


class Clock:
    """Wall and CPU seconds of one call; CPU time is the fairer ratio on a shared machine."""

    def __init__(self, wall: float, cpu: float) -> None:
        self.wall, self.cpu = wall, cpu

    def __str__(self) -> str:
        return f"{self.wall:.2f}s wall, {self.cpu:.2f}s CPU"


def timed(fn, *args, **kwargs):
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn(*args, **kwargs)
    return out, Clock(time.perf_counter() - w0, time.process_time() - c0)


def max_stat_diff(reference: list[float], result: dict) -> float:
    return max(abs(r - (-1.0 if result[k] is None else result[k])) for r, k in zip(reference, STAT_NAMES))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=5000, help="synthetic val images (default: %(default)s)")
    parser.add_argument("--dets-per-image", type=int, default=100,
                        help="detections per image, COCO's maxDets (default: %(default)s)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = parser.parse_args()
    try:
        version("faster-coco-eval")
    except Exception:  # importlib.metadata.PackageNotFoundError
        parser.exit(2, "bench/eval.py compares against faster-coco-eval, a dev extra: "
                       "pip install -e '.[dev]' (make install does)\n")
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    (gt, dets), t_gen = timed(make_dataset, args.images, args.dets_per_image)
    logger.info("generated %d images, %d GT boxes, %d detections in %s",
                args.images, len(gt["annotations"]), len(dets), t_gen)
    load_before = os.getloadavg()[0]

    ref, t_ref = timed(plain_pycocotools, gt, dets)
    logger.info("plain pycocotools COCOeval: %s", t_ref)
    ours_fast, t_fast = timed(evaluate_detections, gt, dets, backend="faster_coco_eval")
    logger.info("evaluate_detections(faster_coco_eval): %s", t_fast)
    ours_ref, t_ours = timed(evaluate_detections, gt, dets, backend="pycocotools")
    logger.info("evaluate_detections(pycocotools): %s", t_ours)
    # The parts of the fast path, one by one.
    arrays, t_arrays = timed(detection_arrays, dets)
    _, t_coco_fast = timed(coco_eval, gt, arrays, backend="faster_coco_eval")
    _, t_calib = timed(calibration_metrics, gt, arrays)
    _, t_err = timed(error_taxonomy, gt, arrays)
    logger.info("parts: arrays %s; faster COCOeval %s; calibration %s; errors %s",
                t_arrays, t_coco_fast, t_calib, t_err)
    load_after = os.getloadavg()[0]

    diff_ref, diff_fast = max_stat_diff(ref, ours_ref), max_stat_diff(ref, ours_fast)
    fast_verdict = "identical" if diff_fast == 0 else "within 1e-6" if diff_fast <= 1e-6 else "DIFFERENT"
    speedup = t_ref.cpu / t_fast.cpu

    def ratio(t: Clock) -> str:
        return f"{t_ref.cpu / t.cpu:.2f}x | {t_ref.wall / t.wall:.2f}x"

    rows = [
        ("plain pycocotools `COCO.loadRes` + `COCOeval` (AP only)", t_ref, ratio(t_ref)),
        ("`evaluate_detections(backend=\"pycocotools\")`: AP + calibration + errors", t_ours, ratio(t_ours)),
        ("`evaluate_detections(backend=\"faster_coco_eval\")`: AP + calibration + errors", t_fast, ratio(t_fast)),
        ("&nbsp;&nbsp;part: dicts -> `DetectionArrays`", t_arrays, " | "),
        ("&nbsp;&nbsp;part: `coco_eval(backend=\"faster_coco_eval\")`", t_coco_fast, ratio(t_coco_fast)),
        ("&nbsp;&nbsp;part: `calibration_metrics` (greedy matching + ECE/NLL/Brier)", t_calib, " | "),
        ("&nbsp;&nbsp;part: `error_taxonomy` (score >= 0.3)", t_err, " | "),
    ]
    lines = [
        SECTION, "",
        f"Machine: {platform.machine()} CPU, 2 cores shared with other jobs (1-min load average "
        f"{load_before:.1f} before, {load_after:.1f} after), Python {platform.python_version()}, "
        f"numpy {np.__version__}, torch {version('torch')} (not used here), pycocotools {version('pycocotools')}, "
        f"faster-coco-eval {version('faster-coco-eval')}.",
        f"Data: {args.images} synthetic 640x480 images, {len(gt['annotations'])} GT boxes over "
        f"{len(CATEGORY_IDS)} gappy category ids, {len(dets)} detections ({args.dets_per_image}/image), "
        "seed 0. One run of each path, in this order, in one process.",
        "", "| path | CPU s | wall s | speed-up vs plain pycocotools (CPU) | (wall) |", "|---|---:|---:|---:|---:|",
        *(f"| {name} | {t.cpu:.2f} | {t.wall:.2f} | {r} |" for name, t, r in rows),
        "",
        f"12 COCO stats vs plain pycocotools: pycocotools backend max abs diff {diff_ref:.1e} "
        f"({'identical' if diff_ref == 0 else 'not identical'}); faster_coco_eval backend max abs diff "
        f"{diff_fast:.1e} ({fast_verdict}).",
        f"Goal (faster_coco_eval path >= 3x plain pycocotools): {'met' if speedup >= 3 else 'NOT met'} "
        f"({speedup:.2f}x in CPU time, {t_ref.wall / t_fast.wall:.2f}x wall). CPU time (all threads of this "
        "process) is the fairer comparison while other jobs share the 2 cores; where CPU exceeds wall, a library "
        "used a second thread, so those CPU ratios are conservative.",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        from results_md import write_section  # bench/ is on sys.path when run as a script

        write_section(TITLE, text)


if __name__ == "__main__":
    main()

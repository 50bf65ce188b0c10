"""The data checks at COCO scale: a synthetic 100k-image annotation file (7.3 boxes per image, as COCO
train's 860k boxes on 118k images; 80 classes), timed side by side in one run:

- parsing the JSON (`load_annotations`, Python's json);
- the annotation checks every run does (`check_annotations` + `check_across` with a 5k-image val);
- the image header check a run does (`probe_images(decode=False)`) on 100k files;
- the doctor's full decode (`probe_images(decode=True)`), on a subset, scaled to 100k.

The 100k image files are hard links to 16 distinct 640x480 JPEGs, so the page cache holds them: the
image figures are the CPU cost of opening, parsing and decoding, not of a cold disk or a network
filesystem. Writes the section "Data checks (bench/data_check.py)" of bench/RESULTS.md.

    python bench/data_check.py [--images 100000] [--decode-images 2000] [--no-write]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.results_md import write_section  # noqa: E402
from detsweep.data.check import check_across, check_annotations, load_annotations, probe_images  # noqa: E402
from detsweep.data.prepare import cleaned  # noqa: E402
from detsweep.data.sources import Split  # noqa: E402

BOXES_PER_IMAGE = 860_001 / 118_287  # COCO train 2017
W, H = 640, 480


def annotation_file(path: Path, n_images: int, seed: int) -> int:
    """Write a COCO-format file of `n_images` 640x480 images; returns the number of boxes."""
    rng = np.random.default_rng(seed)
    counts = rng.poisson(BOXES_PER_IMAGE, n_images)
    n = int(counts.sum())
    xy = rng.uniform(0, [W - 20, H - 20], size=(n, 2))
    wh = rng.uniform(2, [W, H], size=(n, 2)).clip(max=np.array([W, H]) - xy)
    image_of = np.repeat(np.arange(1, n_images + 1), counts)
    cats = rng.integers(1, 81, n)
    images = [{"id": i, "file_name": f"{i:012d}.jpg", "width": W, "height": H} for i in range(1, n_images + 1)]
    anns = [{"id": k + 1, "image_id": int(image_of[k]), "category_id": int(cats[k]),
             "bbox": [round(float(xy[k, 0]), 2), round(float(xy[k, 1]), 2), round(float(wh[k, 0]), 2),
                      round(float(wh[k, 1]), 2)], "area": round(float(wh[k, 0] * wh[k, 1]), 2), "iscrowd": 0}
            for k in range(n)]
    categories = [{"id": c, "name": f"class{c}", "supercategory": "thing"} for c in range(1, 81)]
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": categories}))
    return n


def image_folder(folder: Path, n_images: int) -> None:
    """`n_images` files named as the annotation file says: hard links to 16 distinct JPEGs."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    sources = []
    for k in range(16):
        src = folder / f"source{k}.jpeg"
        Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).save(src, quality=90)
        sources.append(src)
    for i in range(1, n_images + 1):
        os.link(sources[i % 16], folder / f"{i:012d}.jpg")


def timed(fn, *args, **kw):
    start = time.perf_counter()
    out = fn(*args, **kw)
    return out, time.perf_counter() - start


def measure(n_images: int, n_decode: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="detsweep-bench-") as tmp:
        tmp = Path(tmp)
        n_boxes = annotation_file(tmp / "train.json", n_images, 0)
        annotation_file(tmp / "val.json", 5000, 1)
        image_folder(tmp / "train", n_images)
        mb = (tmp / "train.json").stat().st_size / 1e6
        train = Split("train", tmp / "train.json", tmp / "train")
        coco, t_parse = timed(load_annotations, train.annotations)
        sc, t_ann = timed(check_annotations, train, coco)
        val_coco = load_annotations(tmp / "val.json")
        val = check_annotations(Split("val", tmp / "val.json", tmp / "val"), val_coco)
        _, t_across = timed(check_across, {"train": sc, "val": val})
        _, t_clean = timed(cleaned, sc)
        _, t_header = timed(probe_images, sc, decode=False, progress=False)
        sub = check_annotations(train, {**coco, "images": coco["images"][:n_decode]})
        _, t_decode = timed(probe_images, sub, decode=True, progress=False)
    return {"images": n_images, "boxes": n_boxes, "json_mb": mb, "parse_s": t_parse,
            "annotation_checks_s": t_ann + t_across, "clean_s": t_clean, "header_s": t_header,
            "decode_images": n_decode, "decode_s": t_decode, "decode_100k_s": t_decode * n_images / n_decode,
            "threads": min(8, 2 * (os.cpu_count() or 1)), "load_before": os.getloadavg()[0]}


def section(r: dict) -> str:
    machine = (f"{os.cpu_count()}-core {platform.machine()}, Python {platform.python_version()}; shared "
               f"(1-min load average {r['load_before']:.1f} before the run)")
    per = 1000 / r["images"]
    return "\n".join([
        "## Data checks (bench/data_check.py)", "",
        f"A synthetic annotation file of {r['images']:,} images and {r['boxes']:,} boxes (COCO train's 7.3 boxes "
        f"per image, 80 classes; {r['json_mb']:.0f} MB of JSON) and 640x480 JPEG files of random pixels (the "
        f"slowest to decode; hard links to 16 distinct files: page-cached, so the image rows are CPU cost, not disk). One run; machine: {machine}; "
        f"image reads in {r['threads']} threads.", "",
        "| step | seconds | per 1,000 images | what a run does |", "|---|---:|---:|---|",
        f"| parse the JSON (Python json) | {r['parse_s']:.2f} | {r['parse_s'] * per:.3f} | always (the dataset "
        f"parsed it before too) |",
        f"| annotation checks (structure, ids, boxes, categories, train vs val) | {r['annotation_checks_s']:.2f} | "
        f"{r['annotation_checks_s'] * per:.3f} | always, on the driver and in each worker |",
        f"| cleaned copy (`on_invalid: skip`, nothing to drop) | {r['clean_s']:.3f} | {r['clean_s'] * per:.4f} | "
        f"always |",
        f"| image header check (open, size, EXIF) | {r['header_s']:.2f} | {r['header_s'] * per:.3f} | by default; "
        f"none with `--skip-image-check`; once per node (cached) |",
        f"| full decode, {r['decode_images']:,} images, scaled to {r['images']:,} | {r['decode_100k_s']:.1f} | "
        f"{r['decode_s'] * 1000 / r['decode_images']:.3f} | never: `python -m detsweep.data check` only |", "",
        f"The header check takes {r['header_s'] / r['annotation_checks_s']:.1f}x the annotation checks' time, a "
        f"full decode {r['decode_100k_s'] / r['header_s']:.1f}x the header check's. The annotation checks take "
        f"seconds at COCO scale (goal: seconds, not minutes).",
    ])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=100_000)
    p.add_argument("--decode-images", type=int, default=2000)
    p.add_argument("--no-write", action="store_true", help="print only; leave bench/RESULTS.md as it is")
    args = p.parse_args()
    r = measure(args.images, min(args.decode_images, args.images))
    text = section(r)
    print(text)
    if not args.no_write:
        write_section("Data checks (bench/data_check.py)", text)


if __name__ == "__main__":
    main()

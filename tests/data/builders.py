"""Tiny datasets for the data tests, one per export layout: real PNG files and COCO JSON with gappy
or 0-based ids as each tool writes them. `good_split` is clean; tests apply one defect at a time."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

CATEGORIES = [{"id": 1, "name": "cat", "supercategory": "animal"}, {"id": 2, "name": "dog", "supercategory": "animal"}]
# (file name, width, height, boxes as (category id, [x, y, w, h]))
TRAIN = [("a.png", 40, 30, [(1, [2, 3, 10, 5]), (2, [20, 4, 10, 20])]), ("b.png", 20, 20, [(2, [1, 2, 3, 4])]),
         ("c.png", 24, 16, [(1, [0, 0, 8, 8])])]
VAL = [("d.png", 32, 24, [(1, [1, 1, 10, 10]), (2, [12, 2, 8, 8])]), ("e.png", 16, 16, [(2, [2, 2, 6, 6])])]


def write_image(path: Path, width: int, height: int, seed: int = 0, **save) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, **save)


def good_split(images_dir: Path, items=TRAIN, first_id: int = 1, categories=CATEGORIES, prefix: str = "") -> dict:
    """Write the split's images under `images_dir`; return its COCO dict (file_name = prefix + name)."""
    images, anns = [], []
    for k, (name, w, h, boxes) in enumerate(items):
        image_id = first_id + k
        write_image(images_dir / name, w, h, seed=image_id)
        images.append({"id": image_id, "file_name": prefix + name, "width": w, "height": h})
        for cid, bbox in boxes:
            anns.append({"id": 100 * first_id + len(anns), "image_id": image_id, "category_id": cid,
                         "bbox": [float(v) for v in bbox], "area": float(bbox[2] * bbox[3]), "iscrowd": 0})
    return {"images": images, "annotations": anns, "categories": [dict(c) for c in categories]}


def dump(coco: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(coco))  # NaN and Infinity as Python's json writes them
    return path


def coco2017(root: Path) -> dict[str, dict]:
    """The COCO 2017 layout: images/{train2017,val2017}, annotations/instances_{train,val}2017.json."""
    out = {"train": good_split(root / "images" / "train2017"), "val": good_split(root / "images" / "val2017", VAL, 10)}
    for split, coco in out.items():
        dump(coco, root / "annotations" / f"instances_{split}2017.json")
    return out


def roboflow(root: Path, test: bool = False) -> dict[str, dict]:
    """Roboflow's COCO export: {train,valid,test}/_annotations.coco.json beside the images, and the
    dataset's name as category 0 (supercategory 'none') that no box uses; the classes' supercategory
    is that name."""
    cats = [{"id": 0, "name": "pets-xyz", "supercategory": "none"},
            {"id": 1, "name": "cat", "supercategory": "pets-xyz"}, {"id": 2, "name": "dog", "supercategory": "pets-xyz"}]
    splits = {"train": TRAIN, "valid": VAL, **({"test": VAL} if test else {})}
    out = {}
    for k, (folder, items) in enumerate(splits.items()):
        out[folder] = dump(good_split(root / folder, items, 10 * k + 1, cats), root / folder / "_annotations.coco.json")
    return {k: json.loads(p.read_text()) for k, p in out.items()}


def cvat(root: Path, subsets=("Train", "Validation")) -> dict[str, dict]:
    """CVAT's COCO 1.0 export with subsets: annotations/instances_<Subset>.json + images/<Subset>/;
    file_names keep the task's folder (`frames/a.png`), one with Windows separators."""
    out = {}
    for k, (subset, items) in enumerate(zip(subsets, (TRAIN, VAL))):
        coco = good_split(root / "images" / subset / "frames", items, 10 * k + 1, prefix="frames/")
        coco["images"][0]["file_name"] = coco["images"][0]["file_name"].replace("/", "\\")
        out[subset] = dump(coco, root / "annotations" / f"instances_{subset}.json")
    return {k: json.loads(p.read_text()) for k, p in out.items()}


def labelstudio(root: Path) -> dict[str, dict]:
    """Label Studio's "COCO with images" export, one per split: result.json + images/, file_name
    `images/<name>`, category ids from 0."""
    cats = [{"id": 0, "name": "cat"}, {"id": 1, "name": "dog"}]
    out = {}
    for k, (folder, items) in enumerate((("train", TRAIN), ("val", VAL))):
        shifted = [(n, w, h, [(cid - 1, b) for cid, b in boxes]) for n, w, h, boxes in items]
        out[folder] = dump(good_split(root / folder / "images", shifted, 10 * k + 1, cats, prefix="images/"),
                           root / folder / "result.json")
    return {k: json.loads(p.read_text()) for k, p in out.items()}

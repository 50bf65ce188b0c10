"""The dataset checks behind `python -m detsweep.data check` and every run: an annotation file's
structure (unusable → `DataError`), its values (boxes, ids, categories), its images (found, readable,
sized as the JSON says, EXIF), and the splits against each other. Each defect is a `Finding` of one
`KIND`, which says what `data.on_invalid: skip` drops. Torch-free: the driver runs it before Ray.
"""
from __future__ import annotations

import json
import math
import os
import sys
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from detsweep.data.images import ImageReadError, fit, read_header
from detsweep.data.sources import FileResolver, Split, is_absolute

EXAMPLES = 3  # items named per finding
BORDER_SLACK_PX = 1.0  # COCO's float boxes overshoot the border by rounding (pycocotools' own data)


@dataclass(frozen=True)
class Kind:
    name: str
    severity: str  # problem (exit 1, follows data.on_invalid) | warning | info
    field: str  # the JSON field at fault
    what: str  # plural noun phrase for a count
    drops: str | None = None  # what `on_invalid: skip` drops: "image", "box" or "category"


KINDS = {k.name: k for k in (
    Kind("image_duplicate_id", "problem", "images[].id", "images whose id an earlier image has", "image"),
    Kind("image_absolute_path", "problem", "images[].file_name", "images with an absolute file_name", "image"),
    Kind("image_bad_size", "problem", "images[].width/height", "images without a positive width and height", "image"),
    Kind("image_missing", "problem", "images[].file_name", "images whose file is not in the image folder", "image"),
    Kind("image_unreadable", "problem", "images[].file_name", "unreadable images", "image"),
    Kind("image_size_mismatch", "problem", "images[].width/height", "images whose file size is not the JSON's",
         "image"),
    Kind("annotation_duplicate_id", "problem", "annotations[].id", "annotations whose id an earlier one has", "box"),
    Kind("box_wrong_length", "problem", "annotations[].bbox", "boxes that are not 4 numbers", "box"),
    Kind("box_non_finite", "problem", "annotations[].bbox", "boxes with non-finite values", "box"),
    Kind("box_empty", "problem", "annotations[].bbox", "boxes with zero or negative width or height", "box"),
    Kind("box_outside", "problem", "annotations[].bbox", "boxes empty after clipping to their image", "box"),
    Kind("unknown_category", "problem", "annotations[].category_id", "annotations of unknown categories", "box"),
    Kind("unknown_image", "problem", "annotations[].image_id", "annotations of unknown images", "box"),
    Kind("category_not_in_train", "problem", "categories", "categories that train's categories lack", "category"),
    Kind("box_clipped", "warning", "annotations[].bbox", "boxes reaching past the image border (clipped)"),
    Kind("exif_ambiguous", "warning", "images[].file_name",
         "images with an EXIF flip or half turn (sizes cannot tell; stored pixels used)"),
    Kind("class_without_val", "warning", "categories", "classes with train instances and none in val"),
    Kind("class_without_train", "warning", "categories", "classes with val instances and none in train"),
    Kind("exif_rotated", "info", "images[].file_name", "images turned by EXIF whose JSON size is the turned one "
         "(boxes fit the rotated image; rotated when loaded)"),
    Kind("exif_stored", "info", "images[].file_name", "images turned by EXIF whose JSON size is the stored one "
         "(boxes fit the stored pixels; not rotated)"),
    Kind("roboflow_root_category", "info", "categories", "Roboflow root categories dropped (the dataset's "
         "name, supercategory 'none', no annotations)", "category"),
)}


class DataError(ValueError):
    """An unusable annotation file or image folder; `str()` is the one line shown (file: field: why)."""


@dataclass
class Finding:
    split: str
    file: str
    kind: str
    count: int = 0
    examples: list[str] = field(default_factory=list)

    def add(self, example: str) -> None:
        self.count += 1
        if len(self.examples) < EXAMPLES:
            self.examples.append(example)

    @property
    def info(self) -> Kind:
        return KINDS[self.kind]

    def line(self) -> str:
        """`file: field: N what, e.g. a, b`: the refusal and the skip message."""
        return f"{self.file}: {self.info.field}: {self.count} {self.info.what}, e.g. {', '.join(self.examples)}"


@dataclass
class SplitCheck:
    """One split's annotations as checked: findings, what `skip` would drop, counts for the report."""

    split: Split
    coco: dict[str, Any]
    findings: dict[str, Finding] = field(default_factory=dict)
    drop_images: set[int] = field(default_factory=set)  # positions in coco["images"]
    drop_annotations: set[int] = field(default_factory=set)  # positions in coco["annotations"]
    drop_categories: set[int] = field(default_factory=set)  # category ids
    file_names: dict[int, str] = field(default_factory=dict)  # position -> name under the image folder
    counts: dict[str, int] = field(default_factory=dict)
    instances: Counter = field(default_factory=Counter)  # category id -> non-crowd boxes
    image_check: str = "none"  # none | header | decode

    def finding(self, kind: str) -> Finding:
        if kind not in self.findings:
            self.findings[kind] = Finding(self.split.name, str(self.split.annotations), kind)
        return self.findings[kind]

    def flag(self, kind: str, position: int | None, example: str) -> None:
        """Record one defective item; `position` is what skip drops (an image or an annotation)."""
        self.finding(kind).add(example)
        drops = KINDS[kind].drops
        if position is not None and KINDS[kind].severity == "problem":
            (self.drop_images if drops == "image" else self.drop_annotations).add(position)

    @property
    def categories(self) -> dict[int, str]:
        return {c["id"]: c["name"] for c in self.coco["categories"] if c["id"] not in self.drop_categories}


def load_annotations(path: Path) -> dict[str, Any]:
    """Parse one COCO annotation file; an unreadable or non-JSON file is a DataError naming it."""
    if not path.is_file():
        raise DataError(f"{path}: annotation file not found")
    try:
        with path.open("rb") as f:
            coco = json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}): {e.msg}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read: {e}") from None
    if not isinstance(coco, dict):
        raise DataError(f"{path}: the top level is a {type(coco).__name__}, not an object with images, "
                        f"annotations and categories")
    for key in ("images", "annotations", "categories"):
        if not isinstance(coco.get(key), list):
            got = "missing" if key not in coco else f"a {type(coco[key]).__name__}, not a list"
            raise DataError(f"{path}: {key}: {got} (a COCO file holds lists images, annotations and categories)")
    return coco


def _hint(entry: dict) -> str:
    return f" (id {entry['id']})" if type(entry.get("id")) is int else ""


def _require(path: Path, section: str, i: int, entry: Any, keys: Iterable[tuple[str, type]]) -> None:
    """Raise the DataError for the first missing or mistyped key of `section[i]`."""
    if not isinstance(entry, dict):
        raise DataError(f"{path}: {section}[{i}]: {str(entry)[:40]!r} is not an object")
    for key, typ in keys:
        if key not in entry:
            raise DataError(f"{path}: {section}[{i}].{key}: missing{_hint(entry)}")
        if type(entry[key]) is not typ:
            raise DataError(f"{path}: {section}[{i}].{key}: {entry[key]!r} must be {typ.__name__}{_hint(entry)}")


def check_annotations(split: Split, coco: dict[str, Any], *, drop_root_category: bool = False) -> SplitCheck:
    """Structure (DataError) and values (findings) of one split's parsed annotation file."""
    sc = SplitCheck(split, coco)
    path = split.annotations
    seen_categories: set[int] = set()
    for i, c in enumerate(coco["categories"]):
        _require(path, "categories", i, c, (("id", int), ("name", str)))
        if c["id"] in seen_categories:
            raise DataError(f"{path}: categories[{i}].id: category id {c['id']} is given twice")
        seen_categories.add(c["id"])
    if not seen_categories:
        raise DataError(f"{path}: categories: empty (no classes to learn)")
    sizes = _check_images_entries(sc, path)
    used = _check_annotation_entries(sc, path, sizes, seen_categories)
    if drop_root_category:
        for c in coco["categories"]:
            if c["id"] == 0 and str(c.get("supercategory", "")).lower() == "none" and 0 not in used:
                sc.drop_categories.add(0)
                sc.finding("roboflow_root_category").add(f"category 0 {c['name']!r}")
    if not sc.categories:
        raise DataError(f"{path}: categories: none left once Roboflow's root category is dropped")
    return sc


def _check_images_entries(sc: SplitCheck, path: Path) -> dict[int, tuple[float, float]]:
    """The `images` list: structure, duplicate ids, absolute names, sizes. Returns id -> (w, h) of
    the images that stay (nan for a bad size)."""
    images = sc.coco["images"]
    if not images:
        raise DataError(f"{path}: images: empty")
    sizes: dict[int, tuple[float, float]] = {}
    for j, im in enumerate(images):
        _require(path, "images", j, im, (("id", int), ("file_name", str)))
        iid, name = im["id"], im["file_name"]
        if iid in sizes:
            sc.flag("image_duplicate_id", j, f"image {iid} {name!r}")
            continue
        w, h = im.get("width"), im.get("height")
        ok = all(type(v) in (int, float) and v > 0 and math.isfinite(v) for v in (w, h))
        sizes[iid] = (float(w), float(h)) if ok else (math.nan, math.nan)
        if is_absolute(name):
            sc.flag("image_absolute_path", j, f"image {iid} {name!r}")
        if not ok:
            sc.flag("image_bad_size", j, f"image {iid} {name!r} (width {w!r}, height {h!r})")
    sc.counts["images"] = len(sizes)
    return sizes


def _check_annotation_entries(sc: SplitCheck, path: Path, sizes: dict[int, tuple[float, float]],
                              categories: set[int]) -> set[int]:
    """The `annotations` list in one pass, then the box values vectorised. Returns the category ids used."""
    anns = sc.coco["annotations"]
    seen: set[int] = set()
    with_objects: set[int] = set()
    used: set[int] = set()
    pos, boxes, wh = [], [], []
    crowd = 0
    for i, a in enumerate(anns):
        if type(a) is not dict or "bbox" not in a or not (
                type(a.get("id")) is int and type(a.get("image_id")) is int and type(a.get("category_id")) is int):
            _require(path, "annotations", i, a, (("id", int), ("image_id", int), ("category_id", int)))
            raise DataError(f"{path}: annotations[{i}].bbox: missing{_hint(a)}")
        aid, iid, cid, bbox = a["id"], a["image_id"], a["category_id"], a["bbox"]
        example = f"annotation {aid} (image {iid})"
        if aid in seen:
            sc.flag("annotation_duplicate_id", i, example)
        seen.add(aid)
        used.add(cid)
        size = sizes.get(iid)
        if size is None:
            sc.flag("unknown_image", i, example)
        if cid not in categories:
            sc.flag("unknown_category", i, f"{example} category {cid}")
        is_crowd = bool(a.get("iscrowd", 0))
        crowd += is_crowd
        if not is_crowd and cid in categories:
            sc.instances[cid] += 1
            with_objects.add(iid)
        if type(bbox) is not list or len(bbox) != 4 or not all(type(v) in (int, float) for v in bbox):
            sc.flag("box_wrong_length", i, f"{example} bbox {str(bbox)[:40]}")
            continue
        pos.append(i)
        boxes.append(bbox)
        wh.append(size or (math.nan, math.nan))
    sc.counts.update(annotations=len(anns), crowd=crowd,
                     images_without_objects=len(set(sizes) - with_objects))
    _check_boxes(sc, np.array(pos, dtype=np.int64), np.array(boxes, dtype=np.float64).reshape(-1, 4),
                 np.array(wh, dtype=np.float64).reshape(-1, 2))
    return used


def _check_boxes(sc: SplitCheck, pos: np.ndarray, xywh: np.ndarray, wh: np.ndarray) -> None:
    """Non-finite, empty, outside and clipped boxes, over all boxes at once (COCO train: 860k)."""
    with np.errstate(invalid="ignore"):
        x, y, w, h = xywh.T
        W, H = wh.T
        finite = np.isfinite(xywh).all(axis=1)
        empty = finite & ((w <= 0) | (h <= 0))
        sized = finite & ~empty & np.isfinite(W)
        x2, y2 = x + w, y + h
        gone = sized & ((np.minimum(x2, W) <= np.maximum(x, 0)) | (np.minimum(y2, H) <= np.maximum(y, 0)))
        past = sized & ~gone & ((x < -BORDER_SLACK_PX) | (y < -BORDER_SLACK_PX) | (x2 > W + BORDER_SLACK_PX)
                                | (y2 > H + BORDER_SLACK_PX))
    anns = sc.coco["annotations"]
    for kind, mask in (("box_non_finite", ~finite), ("box_empty", empty), ("box_outside", gone),
                       ("box_clipped", past)):
        hits = pos[mask]
        if not len(hits):
            continue
        finding = sc.finding(kind)
        for i in hits[:EXAMPLES]:
            a = anns[i]
            finding.examples.append(f"annotation {a['id']} (image {a['image_id']}) bbox {a['bbox']}")
        finding.count = len(hits)
        if KINDS[kind].severity == "problem":
            sc.drop_annotations.update(hits.tolist())


# --------------------------------------------------------------------------------------------
# Images: found, readable, of the JSON's size; EXIF orientation
# --------------------------------------------------------------------------------------------
def probe_images(sc: SplitCheck, *, decode: bool, workers: int | None = None,
                 progress: bool = True) -> dict[str, Any]:
    """Find and open every image the split keeps (`decode`: every pixel, else the header), in
    parallel threads (PIL releases the GIL while it reads and decodes). Returns JSON-able results
    for `apply_image_results`, so a node can cache them."""
    images_dir = sc.split.images
    if not images_dir.is_dir():
        raise DataError(f"{images_dir}: image folder of the {sc.split.name} split not found (the file_names "
                        f"of {sc.split.annotations} are relative to it)")
    resolver = FileResolver(images_dir)
    entries = sc.coco["images"]
    found: list[tuple[int, str]] = []
    results: dict[str, Any] = {"mode": "decode" if decode else "header", "files": {}, "items": []}
    for j, im in enumerate(entries):
        if j in sc.drop_images:
            continue
        rel = resolver.find(im["file_name"])
        if rel is None:
            results["items"].append((j, "image_missing", f"image {im['id']} {images_dir / im['file_name']}"))
            continue
        if rel != im["file_name"]:
            results["files"][str(j)] = rel
        found.append((j, rel))

    def probe(item: tuple[int, str]) -> tuple[int, Path, Any]:
        path = images_dir / item[1]
        try:
            return item[0], path, read_header(path, decode=decode)
        except (ImageReadError, FileNotFoundError) as e:
            return item[0], path, e

    n = workers or min(8, 2 * (os.cpu_count() or 1))
    what = "decoded" if decode else "headers"
    with ThreadPoolExecutor(max_workers=n) as pool, tqdm(total=len(found), unit="img", file=sys.stderr,
                                                         desc=f"{sc.split.name} images ({what})",
                                                         disable=not progress, leave=False) as bar:
        for j, path, info in pool.map(probe, found):
            bar.update(1)
            results["items"].extend(_judge(entries[j], j, info, path))
    return results


def _judge(im: dict[str, Any], j: int, info: Any, path: Path) -> list[tuple[int, str, str]]:
    """Findings for one probed image at `path`: unreadable, missing, size against the JSON, EXIF fit."""
    name = f"image {im['id']} {path}"
    if isinstance(info, FileNotFoundError):
        return [(j, "image_missing", name)]
    if isinstance(info, Exception):
        cause = info.__cause__ or info
        why = str(cause) if str(path) not in str(cause) else ""  # PIL's own message repeats the path
        return [(j, "image_unreadable", f"{name} ({type(cause).__name__}{': ' + why[:80] if why else ''})")]
    json_size = (int(round(im["width"])), int(round(im["height"])))
    verdict = fit(info, json_size)
    if verdict == "mismatch":
        turned = f", EXIF orientation {info.orientation}" if info.orientation != 1 else ""
        return [(j, "image_size_mismatch", f"{name} (JSON {json_size[0]}x{json_size[1]}, file "
                 f"{info.width}x{info.height}{turned})")]
    if verdict == "rotated":
        return [(j, "exif_rotated", f"{name} (orientation {info.orientation})")]
    if verdict == "ambiguous":
        return [(j, "exif_ambiguous", f"{name} (orientation {info.orientation})")]
    return [(j, "exif_stored", f"{name} (orientation {info.orientation})")] if info.orientation != 1 else []


def apply_image_results(sc: SplitCheck, results: dict[str, Any]) -> None:
    """Record `probe_images`' results (fresh or cached) as findings, drops and resolved file names."""
    sc.image_check = results["mode"]
    sc.file_names.update({int(j): rel for j, rel in results["files"].items()})
    for j, kind, example in results["items"]:
        sc.flag(kind, int(j), example)


# --------------------------------------------------------------------------------------------
# Splits against each other
# --------------------------------------------------------------------------------------------
def check_across(checks: dict[str, SplitCheck]) -> None:
    """Val's (and test's) categories must be train's, by id and name: `skip` drops the others with
    their boxes. Classes present in one of train and val only are warnings."""
    train = checks["train"].categories
    for name in ("val", "test"):
        sc = checks.get(name)
        if sc is None:
            continue
        for cid, cname in sc.categories.items():
            if train.get(cid) != cname:
                was = f", train has {train[cid]!r}" if cid in train else ""
                sc.finding("category_not_in_train").add(f"category {cid} {cname!r}{was}")
                sc.drop_categories.add(cid)
        if sc.drop_categories and "category_not_in_train" in sc.findings:
            gone = sc.drop_categories
            sc.drop_annotations.update(i for i, a in enumerate(sc.coco["annotations"]) if a["category_id"] in gone)
    val = checks["val"]
    pairs = (("class_without_val", checks["train"], val), ("class_without_train", val, checks["train"]))
    for kind, have, lack in pairs:
        for cid in sorted(have.instances):
            if not lack.instances.get(cid) and cid in train:
                have.finding(kind).add(f"{train[cid]!r} ({have.instances[cid]} boxes)")

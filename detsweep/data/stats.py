"""Sanity statistics of a COCO-format annotation file: counts and box sizes, with the data problems
found by the same annotation checks the doctor and every run use (`detsweep.data.check`)."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any

from detsweep.data.check import KINDS, check_annotations, load_annotations
from detsweep.data.sources import Split

# COCOeval's area ranges (pycocotools cocoeval.py Params: 0-32², 32²-96², 96²-1e10), on `area`.
SMALL_MAX_AREA = 32**2
MEDIUM_MAX_AREA = 96**2
# Log-scale histogram of box side sqrt(w*h) in px: [0,2), [2,4), ... [1024, inf).
SIDE_EDGES = tuple(2**k for k in range(1, 11))


def dataset_stats(ann_file: str | Path) -> dict[str, Any]:
    """Counts and sanity checks of one COCO annotation file.

    Keys: `images`, `annotations`, `crowd`, `categories`, `boxes_per_class` (name -> non-crowd
    boxes, every category listed), `size_buckets` (COCO small/medium/large by the `area` field,
    which is what COCOeval uses), `side_histogram` (list of (lo, hi, count) over sqrt(w*h) px,
    hi None = open-ended), `images_without_boxes`, `degenerate_boxes` (w <= 0 or h <= 0),
    `boxes_outside_image` (extending past the image border by more than 1 px),
    `unknown_category_annotations`, `orphan_annotations` (image id not in `images`),
    `duplicate_annotation_ids`, and `findings`: kind -> count of every annotation check that fired.
    An unusable file raises `DataError`.
    """
    path = Path(ann_file)
    coco = load_annotations(path)
    found = {k: f.count for k, f in check_annotations(Split("", path, path.parent), coco).findings.items()}
    images = {int(im["id"]): im for im in coco["images"]}
    names = {int(c["id"]): c["name"] for c in coco["categories"]}
    per_class: Counter[str] = Counter({n: 0 for n in names.values()})
    sizes = Counter({"small": 0, "medium": 0, "large": 0})
    sides = [0] * (len(SIDE_EDGES) + 1)
    with_boxes: set[int] = set()
    crowd = 0
    for a in coco["annotations"]:
        bbox = a["bbox"]
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox)):
            continue  # counted by the checks (box_wrong_length)
        x, y, w, h = (float(v) for v in bbox)
        if a.get("iscrowd", 0):
            crowd += 1
            continue
        with_boxes.add(int(a["image_id"]))
        per_class[names.get(int(a["category_id"]), f"<unknown id {a['category_id']}>")] += 1
        area = float(a.get("area", w * h))
        sizes["small" if area < SMALL_MAX_AREA else "medium" if area < MEDIUM_MAX_AREA else "large"] += 1
        side = math.sqrt(max(w, 0.0) * max(h, 0.0)) if math.isfinite(w * h) else 0.0
        sides[sum(side >= e for e in SIDE_EDGES)] += 1
    lows = (0,) + SIDE_EDGES
    return {
        "file": str(ann_file),
        "images": len(images),
        "annotations": len(coco["annotations"]),
        "crowd": crowd,
        "categories": len(names),
        "boxes_per_class": dict(per_class),
        "size_buckets": dict(sizes),
        "side_histogram": [(lo, hi, n) for lo, hi, n in zip(lows, SIDE_EDGES + (None,), sides)],
        "images_without_boxes": len(set(images) - with_boxes),
        "degenerate_boxes": found.get("box_empty", 0),
        # past the border by more than 1 px (COCO's float boxes overshoot by rounding), or wholly outside
        "boxes_outside_image": found.get("box_outside", 0) + found.get("box_clipped", 0),
        "unknown_category_annotations": found.get("unknown_category", 0),
        "orphan_annotations": found.get("unknown_image", 0),
        "duplicate_annotation_ids": found.get("annotation_duplicate_id", 0),
        "findings": found,
    }


def format_stats(stats: dict[str, Any], bar_width: int = 40) -> str:
    """Human-readable report of `dataset_stats`, with text bars for the histograms."""
    lines = [
        f"{stats['file']}",
        f"  images {stats['images']}  annotations {stats['annotations']} (crowd {stats['crowd']})  "
        f"categories {stats['categories']}  images without boxes {stats['images_without_boxes']}",
        "  boxes per class:",
    ]
    per_class = stats["boxes_per_class"]
    top = max(per_class.values(), default=0) or 1
    width = max((len(n) for n in per_class), default=0)
    for name, n in sorted(per_class.items(), key=lambda kv: (-kv[1], kv[0])):
        lines.append(f"    {name:<{width}} {n:>8}  {'#' * round(bar_width * n / top)}".rstrip())
    b = stats["size_buckets"]
    lines.append(f"  COCO sizes (by area): small {b['small']}  medium {b['medium']}  large {b['large']}")
    lines.append("  box side sqrt(w*h), px:")
    hist = stats["side_histogram"]
    used = [i for i, (_, _, n) in enumerate(hist) if n] or [0]
    top = max(n for _, _, n in hist) or 1
    for lo, hi, n in hist[used[0] : used[-1] + 1]:  # empty tails hidden
        label = f"[{lo}, {hi})" if hi is not None else f"[{lo}, inf)"
        lines.append(f"    {label:<13} {n:>8}  {'#' * round(bar_width * n / top)}".rstrip())
    checks = {
        "degenerate boxes (w or h <= 0)": stats["degenerate_boxes"],
        "boxes outside the image": stats["boxes_outside_image"],
        "annotations with unknown category": stats["unknown_category_annotations"],
        "annotations of missing images": stats["orphan_annotations"],
        "duplicate annotation ids": stats["duplicate_annotation_ids"],
    }
    shown = {"box_empty", "box_outside", "box_clipped", "unknown_category", "unknown_image", "annotation_duplicate_id"}
    checks.update({KINDS[k].what: n for k, n in stats.get("findings", {}).items()
                   if k not in shown and KINDS[k].severity in ("problem", "warning")})
    lines.append("  checks: all ok" if not any(checks.values()) else "  checks: PROBLEMS FOUND")
    lines += [f"    {k}: {v}" for k, v in checks.items() if v]
    return "\n".join(lines)

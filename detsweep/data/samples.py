"""Sanity images: a grid of a split's sample images with their boxes and class names drawn, as the
run will see them (file names resolved, the EXIF rule applied, boxes in the JSON's pixels)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from detsweep.data.check import SplitCheck
from detsweep.data.images import ImageReadError, load_rgb
from detsweep.data.prepare import cleaned

TILE_PX = 256  # each sample's longer side in the grid
_COLOURS = ((230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
            (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212))


def pick(coco: dict, n: int) -> list[dict]:
    """`n` images spread evenly over the split (sorted by id), preferring images with objects."""
    with_objects = {a["image_id"] for a in coco["annotations"] if not a.get("iscrowd", 0)}
    images = sorted(coco["images"], key=lambda im: im["id"])
    pool = [im for im in images if im["id"] in with_objects] or images
    if len(pool) <= n:
        return pool
    return [pool[int(i)] for i in np.linspace(0, len(pool) - 1, n).round()]


def _tile(sc: SplitCheck, coco: dict, image: dict, by_image: dict[int, list[dict]]) -> Image.Image:
    """One sample: the image scaled to TILE_PX with its boxes (crowd dashed grey) and class names."""
    path = sc.split.images / image["file_name"]
    names = {c["id"]: c["name"] for c in coco["categories"]}
    try:
        pixels = load_rgb(path, (int(image["width"]), int(image["height"])))
    except ImageReadError:
        pixels = np.full((TILE_PX, TILE_PX, 3), 64, np.uint8)  # the doctor reports it; keep the grid
    im = Image.fromarray(pixels)
    scale = TILE_PX / max(im.size)
    im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))))
    draw = ImageDraw.Draw(im)
    for a in by_image.get(image["id"], []):
        x, y, w, h = (v * scale for v in a["bbox"])
        colour = (160, 160, 160) if a.get("iscrowd", 0) else _COLOURS[a["category_id"] % len(_COLOURS)]
        draw.rectangle([x, y, x + w, y + h], outline=colour, width=2)
        draw.text((x + 2, y + 1), str(names.get(a["category_id"], a["category_id"])), fill=colour)
    draw.text((3, im.height - 12), f"{image['id']} {Path(image['file_name']).name}"[:40], fill=(255, 255, 255))
    return im


def write_samples(sc: SplitCheck, n: int, out: Path) -> Path | None:
    """Write `out` (PNG): `n` of the split's images in a grid, as the run would train on them (what
    `on_invalid: skip` drops left out). None when the split has no image left to draw."""
    coco = cleaned(sc)
    chosen = pick(coco, n)
    if not chosen:
        return None
    by_image: dict[int, list[dict]] = {}
    for a in coco["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    cols = math.ceil(math.sqrt(len(chosen)))
    rows = math.ceil(len(chosen) / cols)
    grid = Image.new("RGB", (cols * (TILE_PX + 4), rows * (TILE_PX + 4)), (24, 24, 24))
    for k, image in enumerate(chosen):
        tile = _tile(sc, coco, image, by_image)
        grid.paste(tile, ((k % cols) * (TILE_PX + 4) + 2, (k // cols) * (TILE_PX + 4) + 2))
    out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out)
    return out

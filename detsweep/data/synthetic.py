"""Synthetic COCO-format detection data: coloured shapes on a noisy background.

Each class has its own shape AND colour, so a detector can really learn it; category ids are
gappy on purpose so the contiguous label mapping is always exercised.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

log = logging.getLogger(__name__)

# Bump when the drawing changes, so stale caches are never reused.
GENERATOR_VERSION = 1


@dataclass(frozen=True)
class ShapeClass:
    """One synthetic class: COCO category id, name, shape and fill colour (RGB 0..255)."""

    category_id: int
    name: str
    shape: str
    rgb: tuple[int, int, int]


# Gappy ids (not 1..K) like COCO's 1..90, so code that assumes contiguous ids breaks in tests.
# Colours stay inside 30..240 so the added noise is not clipped and the mean colour is unbiased.
SHAPE_CLASSES: tuple[ShapeClass, ...] = (
    ShapeClass(3, "red_square", "square", (220, 40, 40)),
    ShapeClass(7, "green_circle", "circle", (40, 190, 60)),
    ShapeClass(12, "blue_triangle", "triangle", (50, 80, 220)),
    ShapeClass(18, "yellow_diamond", "diamond", (225, 205, 40)),
    ShapeClass(25, "magenta_ring", "ring", (210, 50, 200)),
    ShapeClass(31, "cyan_cross", "cross", (40, 200, 210)),
    ShapeClass(40, "orange_bar", "bar", (240, 130, 30)),
    ShapeClass(44, "white_star", "star", (235, 235, 235)),
)

_MIN_IMAGE_SIZE = 32
_NOISE_STD = 6.0  # mild: enough that a constant background is not a shortcut
_MARGIN = 2  # px kept free between boxes, so each box holds exactly one object


def dataset_dir_name(*, train_images: int, val_images: int, image_size: int, seed: int, num_classes: int) -> str:
    """Cache folder name keyed by every parameter that changes the bytes."""
    return (
        f"synth-v{GENERATOR_VERSION}-s{image_size}-t{train_images}-v{val_images}"
        f"-c{num_classes}-seed{seed}"
    )


def ensure_synthetic(
    root: str | Path,
    *,
    train_images: int,
    val_images: int,
    image_size: int,
    seed: int = 0,
    num_classes: int = 5,
) -> Path:
    """Return the synthetic dataset folder under `root`, generating it on first use.

    Layout: `images/{train,val}/*.png`, `annotations/instances_{train,val}.json` (COCO format,
    `bbox` = tight [x, y, w, h] in absolute pixels, `area` = object pixel count as COCO does).
    Deterministic in its parameters. Safe to call from several processes at once: each
    generates into a private temporary sibling and renames it into place; a loser discards
    its copy and uses the winner's.
    """
    _validate(train_images=train_images, val_images=val_images, image_size=image_size, num_classes=num_classes)
    root = Path(root).expanduser()
    name = dataset_dir_name(
        train_images=train_images, val_images=val_images, image_size=image_size, seed=seed, num_classes=num_classes
    )
    target = root / name
    if target.is_dir():
        return target

    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    log.info("generating synthetic dataset %s", target)
    try:
        _generate(tmp, name, train_images=train_images, val_images=val_images, image_size=image_size, seed=seed,
                  num_classes=num_classes)
        try:
            os.rename(tmp, target)  # atomic: readers see nothing or the complete folder
        except OSError:
            if not target.is_dir():
                raise
            log.info("another process generated %s first; using it", target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _validate(*, train_images: int, val_images: int, image_size: int, num_classes: int) -> None:
    if train_images < 1 or val_images < 1:
        raise ValueError(
            f"synthetic data needs at least 1 image per split, got train_images={train_images}, "
            f"val_images={val_images}"
        )
    if image_size < _MIN_IMAGE_SIZE:
        raise ValueError(f"synthetic image_size must be >= {_MIN_IMAGE_SIZE}, got {image_size}")
    if not 1 <= num_classes <= len(SHAPE_CLASSES):
        raise ValueError(f"synthetic num_classes must be in 1..{len(SHAPE_CLASSES)}, got {num_classes}")


def _generate(
    out: Path, name: str, *, train_images: int, val_images: int, image_size: int, seed: int, num_classes: int
) -> None:
    classes = SHAPE_CLASSES[:num_classes]
    categories = [{"id": c.category_id, "name": c.name, "supercategory": "shape"} for c in classes]
    next_image_id, next_ann_id = 1, 1  # ids unique across splits, as in COCO
    for split_index, (split, count) in enumerate((("train", train_images), ("val", val_images))):
        image_dir = out / "images" / split
        image_dir.mkdir(parents=True)
        # One stream per split: the val split does not change when train_images changes.
        rng = np.random.default_rng([seed, split_index])
        images, annotations = [], []
        for _ in tqdm(range(count), desc=f"synthetic {split}", unit="img", delay=1.0, leave=False):
            image_id = next_image_id
            next_image_id += 1
            pixels, objects = render_image(rng, image_size, classes)
            file_name = f"{image_id:012d}.png"
            Image.fromarray(pixels).save(image_dir / file_name)
            images.append({"id": image_id, "file_name": file_name, "width": image_size, "height": image_size})
            for category_id, bbox_xywh, area in objects:
                annotations.append({
                    "id": next_ann_id, "image_id": image_id, "category_id": category_id,
                    "bbox": bbox_xywh, "area": area, "iscrowd": 0,
                })
                next_ann_id += 1
        coco = {
            "info": {"description": f"detsweep synthetic shapes ({name})"},
            "images": images,
            "annotations": annotations,
            "categories": categories,
        }
        ann_dir = out / "annotations"
        ann_dir.mkdir(exist_ok=True)
        (ann_dir / f"instances_{split}.json").write_text(json.dumps(coco))


def render_image(
    rng: np.random.Generator, image_size: int, classes: tuple[ShapeClass, ...]
) -> tuple[np.ndarray, list[tuple[int, list[int], int]]]:
    """Draw 1-4 non-overlapping objects on a noisy grey background.

    Returns pixels `uint8[S, S, 3]` and, per object, `(category_id, bbox_xywh, area)` where
    `bbox_xywh` is the tight box `[x, y, w, h]` in absolute pixels (covering pixel columns
    x..x+w-1) and `area` the object's pixel count.
    """
    size = image_size
    grey = int(rng.integers(90, 151))
    canvas = Image.new("RGB", (size, size), (grey, grey, grey))
    draw = ImageDraw.Draw(canvas)
    placed: list[tuple[int, int, int, int]] = []  # boxes_xyxy (exclusive max) with margin checks
    objects = []
    for _ in range(int(rng.integers(1, 5))):
        cls = classes[int(rng.integers(len(classes)))]
        # Log-uniform side from ~6% to 50% of the image: at 128 px this gives small (<32 px)
        # and medium (32..96 px) COCO boxes.
        side = float(np.exp(rng.uniform(np.log(max(6.0, 0.06 * size)), np.log(0.5 * size))))
        aspect = rng.uniform(0.25, 0.4) if cls.shape == "bar" else rng.uniform(0.75, 1.33)
        w = max(4, int(round(side)))
        h = max(4, int(round(side * aspect)))
        for _attempt in range(30):
            x0 = int(rng.integers(0, size - w + 1))
            y0 = int(rng.integers(0, size - h + 1))
            box = (x0, y0, x0 + w, y0 + h)
            if all(not _overlaps(box, other) for other in placed):
                break
        else:
            continue  # crowded image: skip this object rather than overlap
        mask = Image.new("L", (size, size), 0)
        _draw_shape(ImageDraw.Draw(mask), cls.shape, box, 255)
        mask_np = np.asarray(mask) > 0
        ys, xs = np.nonzero(mask_np)
        if len(xs) == 0:
            continue
        placed.append(box)
        _draw_shape(draw, cls.shape, box, cls.rgb)
        bx0, by0 = int(xs.min()), int(ys.min())
        bbox_xywh = [bx0, by0, int(xs.max()) + 1 - bx0, int(ys.max()) + 1 - by0]
        objects.append((cls.category_id, bbox_xywh, int(mask_np.sum())))
    pixels = np.asarray(canvas, dtype=np.float32) + rng.normal(0.0, _NOISE_STD, size=(size, size, 3))
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8), objects


def _overlaps(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    return not (a[2] + _MARGIN <= b[0] or b[2] + _MARGIN <= a[0] or a[3] + _MARGIN <= b[1] or b[3] + _MARGIN <= a[1])


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill) -> None:
    """Draw `shape` filling `box` = (x0, y0, x1, y1) with x1, y1 exclusive."""
    x0, y0, x1, y1 = box[0], box[1], box[2] - 1, box[3] - 1  # PIL coordinates are inclusive
    w, h = x1 - x0, y1 - y0
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    if shape in ("square", "bar"):
        draw.rectangle((x0, y0, x1, y1), fill=fill)
    elif shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif shape == "ring":
        draw.ellipse((x0, y0, x1, y1), outline=fill, width=max(2, min(w, h) // 5))
    elif shape == "triangle":
        draw.polygon([(x0, y1), (x1, y1), (cx, y0)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=fill)
    elif shape == "cross":
        tx, ty = max(1, w // 6), max(1, h // 6)
        draw.rectangle((x0, cy - ty, x1, cy + ty), fill=fill)
        draw.rectangle((cx - tx, y0, cx + tx, y1), fill=fill)
    elif shape == "star":
        angles = np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
        draw.polygon(
            [(cx + r * np.cos(a) * w / 2, cy - r * np.sin(a) * h / 2) for a, r in zip(angles, radii)], fill=fill
        )
    else:  # internal invariant: SHAPE_CLASSES only names the shapes above
        raise AssertionError(f"unknown shape {shape!r}")

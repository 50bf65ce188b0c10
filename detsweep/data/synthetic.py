"""Synthetic COCO-format detection data: coloured shapes on a noisy background, in two domains.

Each class has its own shape AND colour, so a detector can really learn it; category ids are
gappy on purpose so the contiguous label mapping is always exercised. The `source` domain (the
default) is for pretraining a base detector; the `target` domain, for fine-tuning it, has other
classes (new shapes, and known shapes in new colours) with disjoint ids, textured backgrounds and
smaller objects.
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

# Bump when the drawing of any domain changes, so stale caches (datasets, and base detectors
# pretrained on them) are never reused.
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

# New shapes, and source shapes in new colours (a purple circle is not the green one): the class
# head must be relearned, while edges and colour blobs transfer. Ids 101.. are disjoint from the
# source's 3..44, so a label map that mixes the domains fails loudly.
TARGET_CLASSES: tuple[ShapeClass, ...] = (
    ShapeClass(101, "teal_hexagon", "hexagon", (30, 150, 140)),
    ShapeClass(104, "pink_semicircle", "semicircle", (235, 120, 170)),
    ShapeClass(108, "olive_frame", "frame", (150, 160, 40)),
    ShapeClass(113, "purple_circle", "circle", (130, 60, 200)),
    ShapeClass(119, "navy_triangle", "triangle", (40, 50, 140)),
    ShapeClass(126, "lime_arrow", "arrow", (150, 230, 60)),
)


@dataclass(frozen=True)
class Domain:
    """How one domain draws: its classes, object side range (fractions of the image size, sampled
    log-uniform, at least 6 px), the most objects per image, and the background."""

    name: str
    classes: tuple[ShapeClass, ...]
    side_frac: tuple[float, float]
    max_objects: int
    textured: bool


DOMAINS: dict[str, Domain] = {
    # Today's generator, unchanged byte for byte (the smoke sweep's caches stay valid).
    "source": Domain("source", SHAPE_CLASSES, (0.06, 0.5), 4, textured=False),
    # Sides 5-30% (source 6-50%): at 128 px a mean box side of 17 px instead of 24 (measured), mostly COCO "small".
    "target": Domain("target", TARGET_CLASSES, (0.05, 0.3), 5, textured=True),
}
DEFAULT_DOMAIN = "source"

_MIN_IMAGE_SIZE = 32
_MIN_SIDE_PX = 6.0
# Height / width ranges of the elongated shapes; every other shape is about square (0.75..1.33).
_ASPECT = {"bar": (0.25, 0.4), "semicircle": (0.45, 0.6), "arrow": (0.5, 0.75)}
_NOISE_STD = 6.0  # mild: enough that a constant background is not a shortcut
_MARGIN = 2  # px kept free between boxes, so each box holds exactly one object


def dataset_dir_name(*, train_images: int, val_images: int, image_size: int, seed: int, num_classes: int,
                     domain: str = DEFAULT_DOMAIN) -> str:
    """Cache folder name keyed by every parameter that changes the bytes (the source domain keeps
    the name it had before domains existed)."""
    tag = "" if domain == DEFAULT_DOMAIN else f"-{domain}"
    return (
        f"synth-v{GENERATOR_VERSION}{tag}-s{image_size}-t{train_images}-v{val_images}"
        f"-c{num_classes}-seed{seed}"
    )


def domain_classes(domain: str = DEFAULT_DOMAIN, num_classes: int | None = None) -> tuple[ShapeClass, ...]:
    """The classes `ensure_synthetic(domain=..., num_classes=...)` draws (all of the domain's if None)."""
    classes = _domain(domain).classes
    return classes if num_classes is None else classes[:num_classes]


def _domain(name: str) -> Domain:
    if name not in DOMAINS:
        raise ValueError(f"synthetic domain {name!r} is not one of {list(DOMAINS)}")
    return DOMAINS[name]


def ensure_synthetic(
    root: str | Path,
    *,
    train_images: int,
    val_images: int,
    image_size: int,
    seed: int = 0,
    num_classes: int = 5,
    domain: str = DEFAULT_DOMAIN,
) -> Path:
    """Return the synthetic dataset folder under `root`, generating it on first use.

    `domain`: "source" (default: SHAPE_CLASSES on plain grey) or "target" (TARGET_CLASSES, textured
    backgrounds, smaller objects); `num_classes` takes the domain's first K classes.

    Layout: `images/{train,val}/*.png`, `annotations/instances_{train,val}.json` (COCO format,
    `bbox` = tight [x, y, w, h] in absolute pixels, `area` = object pixel count as COCO does).
    Deterministic in its parameters. Safe to call from several processes at once: each
    generates into a private temporary sibling and renames it into place; a loser discards
    its copy and uses the winner's.
    """
    _validate(train_images=train_images, val_images=val_images, image_size=image_size, num_classes=num_classes,
              domain=domain)
    root = Path(root).expanduser()
    name = dataset_dir_name(
        train_images=train_images, val_images=val_images, image_size=image_size, seed=seed, num_classes=num_classes,
        domain=domain,
    )
    target = root / name
    if target.is_dir():
        return target

    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    log.info("generating synthetic dataset %s", target)
    try:
        _generate(tmp, name, train_images=train_images, val_images=val_images, image_size=image_size, seed=seed,
                  num_classes=num_classes, domain=domain)
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


def _validate(*, train_images: int, val_images: int, image_size: int, num_classes: int, domain: str) -> None:
    classes = _domain(domain).classes
    if train_images < 1 or val_images < 1:
        raise ValueError(
            f"synthetic data needs at least 1 image per split, got train_images={train_images}, "
            f"val_images={val_images}"
        )
    if image_size < _MIN_IMAGE_SIZE:
        raise ValueError(f"synthetic image_size must be >= {_MIN_IMAGE_SIZE}, got {image_size}")
    if not 1 <= num_classes <= len(classes):
        where = "" if domain == DEFAULT_DOMAIN else f" for domain {domain!r}"
        raise ValueError(f"synthetic num_classes must be in 1..{len(classes)}{where}, got {num_classes}")


def _generate(
    out: Path, name: str, *, train_images: int, val_images: int, image_size: int, seed: int, num_classes: int,
    domain: str = DEFAULT_DOMAIN,
) -> None:
    spec = _domain(domain)
    classes = spec.classes[:num_classes]
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
            pixels, objects = render_image(rng, image_size, classes, domain=spec)
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
    rng: np.random.Generator, image_size: int, classes: tuple[ShapeClass, ...], *,
    domain: Domain = DOMAINS[DEFAULT_DOMAIN],
) -> tuple[np.ndarray, list[tuple[int, list[int], int]]]:
    """Draw 1..`domain.max_objects` non-overlapping objects of `classes` on a noisy grey
    background, textured if the domain says so.

    Returns pixels `uint8[S, S, 3]` and, per object, `(category_id, bbox_xywh, area)` where
    `bbox_xywh` is the tight box `[x, y, w, h]` in absolute pixels (covering pixel columns
    x..x+w-1) and `area` the object's pixel count.
    """
    size = image_size
    grey = int(rng.integers(90, 151))
    # Drawn only when textured, so the plain source domain consumes the random stream as before.
    background = _texture(rng, size, grey) if domain.textured else (grey, grey, grey)
    canvas = Image.fromarray(background) if domain.textured else Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(canvas)
    placed: list[tuple[int, int, int, int]] = []  # boxes_xyxy (exclusive max) with margin checks
    objects = []
    low, high = domain.side_frac
    for _ in range(int(rng.integers(1, domain.max_objects + 1))):
        cls = classes[int(rng.integers(len(classes)))]
        # Log-uniform side: for the source domain at 128 px (6..50%) this gives small (<32 px)
        # and medium (32..96 px) COCO boxes.
        side = float(np.exp(rng.uniform(np.log(max(_MIN_SIDE_PX, low * size)), np.log(high * size))))
        aspect = rng.uniform(*_ASPECT.get(cls.shape, (0.75, 1.33)))
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


def _texture(rng: np.random.Generator, size: int, grey: int) -> np.ndarray:
    """A grey background `uint8[S, S, 3]` with a sine grating (random period 8-32 px, orientation,
    phase) and coarse blotches, each about +-20 levels: structure a detector must learn to ignore,
    yet far less contrast than the saturated object colours."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    angle, period, phase = rng.uniform(0, np.pi), rng.uniform(8, 32), rng.uniform(0, 2 * np.pi)
    grating = 20.0 * np.sin(2 * np.pi * (xx * np.cos(angle) + yy * np.sin(angle)) / period + phase)
    cells = rng.uniform(-20.0, 20.0, size=(4, 4)).astype(np.float32)
    blotches = np.asarray(Image.fromarray(cells).resize((size, size), Image.BILINEAR))
    tint = rng.uniform(-10.0, 10.0, size=3)  # a slight colour cast per image
    field = grey + grating + blotches
    return np.clip(np.rint(field[..., None] + tint), 0, 255).astype(np.uint8)


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
    elif shape == "frame":
        draw.rectangle((x0, y0, x1, y1), outline=fill, width=max(2, min(w, h) // 5))
    elif shape == "hexagon":
        draw.polygon([(x0 + w / 4, y0), (x1 - w / 4, y0), (x1, cy), (x1 - w / 4, y1), (x0 + w / 4, y1), (x0, cy)],
                     fill=fill)
    elif shape == "semicircle":  # the upper half of an ellipse twice the box's height: flat side down
        draw.pieslice((x0, y0, x1, y0 + 2 * h), 180, 360, fill=fill)
    elif shape == "arrow":  # pointing right: a shaft of half the height, a head of the last 40%
        head = x1 - 0.4 * w
        draw.polygon([(x0, cy - h / 4), (head, cy - h / 4), (head, y0), (x1, cy), (head, y1), (head, cy + h / 4),
                      (x0, cy + h / 4)], fill=fill)
    elif shape == "star":
        angles = np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
        draw.polygon(
            [(cx + r * np.cos(a) * w / 2, cy - r * np.sin(a) * h / 2) for a, r in zip(angles, radii)], fill=fill
        )
    else:  # internal invariant: the class tables only name the shapes above
        raise AssertionError(f"unknown shape {shape!r}")

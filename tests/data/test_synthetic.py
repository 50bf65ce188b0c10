"""Synthetic generator: layout, determinism, learnability (class = shape + colour), atomic reuse, domains."""

from __future__ import annotations

import json
import multiprocessing
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from detsweep.data import synthetic
from detsweep.data.synthetic import DOMAINS, SHAPE_CLASSES, TARGET_CLASSES, domain_classes, ensure_synthetic

SMALL = dict(train_images=10, val_images=4, image_size=96, seed=3)
BY_ID = {c.category_id: c for c in SHAPE_CLASSES}
# Fraction of the tight box an object fills, measured on boxes with both sides >= 12 px.
FILL_RANGE = {
    "square": (0.99, 1.0), "bar": (0.99, 1.0), "circle": (0.72, 0.83), "triangle": (0.47, 0.56),
    "diamond": (0.46, 0.53), "ring": (0.25, 0.52), "cross": (0.47, 0.62), "star": (0.35, 0.48),
}


def _load(folder: Path, split: str) -> dict:
    return json.loads((folder / "annotations" / f"instances_{split}.json").read_text())


def _foreground(pixels: np.ndarray) -> np.ndarray:
    """Pixels far from the grey background: noise is 6 sigma below the 40 threshold."""
    background = np.median(pixels.reshape(-1, 3), axis=0)
    return np.abs(pixels.astype(np.int32) - background).max(axis=-1) > 40


def _all_files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def all_shapes(tmp_path_factory) -> Path:
    return ensure_synthetic(tmp_path_factory.mktemp("synth"), train_images=24, val_images=4, image_size=128,
                            num_classes=len(SHAPE_CLASSES))


def test_layout_ids_and_gappy_categories(tmp_path):
    folder = ensure_synthetic(tmp_path, **SMALL)
    assert folder == tmp_path / "synth-v1-s96-t10-v4-c5-seed3"
    train, val = _load(folder, "train"), _load(folder, "val")
    assert [c["id"] for c in train["categories"]] == [3, 7, 12, 18, 25]
    assert [c["name"] for c in train["categories"]] == [
        "red_square", "green_circle", "blue_triangle", "yellow_diamond", "magenta_ring"]
    assert train["categories"] == val["categories"]
    assert len(train["images"]) == 10 and len(val["images"]) == 4
    image_ids = [im["id"] for im in train["images"] + val["images"]]
    ann_ids = [a["id"] for a in train["annotations"] + val["annotations"]]
    assert len(set(image_ids)) == 14 and len(set(ann_ids)) == len(ann_ids)
    for split, coco in (("train", train), ("val", val)):
        for im in coco["images"]:
            with Image.open(folder / "images" / split / im["file_name"]) as png:
                assert png.size == (96, 96) and png.mode == "RGB"
        per_image = [sum(a["image_id"] == im["id"] for a in coco["annotations"]) for im in coco["images"]]
        assert 1 <= min(per_image) and max(per_image) <= 4
        assert all(a["iscrowd"] == 0 and a["category_id"] in BY_ID for a in coco["annotations"])


def test_deterministic_bytes_and_seed_sensitive(tmp_path):
    a = ensure_synthetic(tmp_path / "a", **SMALL)
    b = ensure_synthetic(tmp_path / "b", **SMALL)
    assert _all_files(a) == _all_files(b)
    c = ensure_synthetic(tmp_path / "c", **{**SMALL, "seed": 4})
    assert _load(a, "train")["annotations"] != _load(c, "train")["annotations"]


def test_val_split_independent_of_train_count(tmp_path):
    a = ensure_synthetic(tmp_path, **SMALL)
    b = ensure_synthetic(tmp_path, **{**SMALL, "train_images": 11})
    strip = lambda coco: [(a["category_id"], a["bbox"]) for a in coco["annotations"]]  # noqa: E731
    assert strip(_load(a, "val")) == strip(_load(b, "val"))


def test_boxes_tight_inside_and_area_is_pixel_count(all_shapes):
    for split in ("train", "val"):
        coco = _load(all_shapes, split)
        files = {im["id"]: im["file_name"] for im in coco["images"]}
        for ann in coco["annotations"]:
            x, y, w, h = ann["bbox"]
            assert 0 <= x and 0 <= y and x + w <= 128 and y + h <= 128 and w > 0 and h > 0
            fg = _foreground(np.asarray(Image.open(all_shapes / "images" / split / files[ann["image_id"]])))
            inside = fg[y:y + h, x:x + w]
            # tight: every edge row/column of the box touches the object ...
            assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()
            # ... and the 1-px ring around it is free (objects keep a margin between them)
            ring = fg[max(y - 1, 0):y + h + 1, max(x - 1, 0):x + w + 1].sum() - inside.sum()
            assert ring == 0
            assert ann["area"] == inside.sum()


def test_class_decides_colour_and_shape(all_shapes):
    coco = _load(all_shapes, "train")
    files = {im["id"]: im["file_name"] for im in coco["images"]}
    palette = np.array([c.rgb for c in SHAPE_CLASSES], dtype=np.float64)
    seen = set()
    for ann in coco["annotations"]:
        cls = BY_ID[ann["category_id"]]
        x, y, w, h = ann["bbox"]
        pixels = np.asarray(Image.open(all_shapes / "images" / "train" / files[ann["image_id"]]))
        fg = _foreground(pixels)[y:y + h, x:x + w]
        mean_rgb = pixels[y:y + h, x:x + w][fg].mean(axis=0)
        assert np.abs(mean_rgb - cls.rgb).max() < 6, (cls.name, mean_rgb)
        assert SHAPE_CLASSES[int(np.argmin(((palette - mean_rgb) ** 2).sum(1)))] == cls
        if min(w, h) >= 12:
            lo, hi = FILL_RANGE[cls.shape]
            assert lo <= fg.mean() <= hi, (cls.name, fg.mean())
            if cls.shape == "ring":
                assert not fg[h // 2, w // 2]
            if cls.shape == "bar":
                assert w >= 2 * h
            seen.add(cls.shape)
    assert seen == set(FILL_RANGE)


def test_smoke_size_is_fast_and_has_small_and_medium_boxes(tmp_path):
    start = time.perf_counter()
    folder = ensure_synthetic(tmp_path, train_images=64, val_images=16, image_size=128)
    assert time.perf_counter() - start < 15
    areas = np.array([a["bbox"][2] * a["bbox"][3] for a in _load(folder, "train")["annotations"]])
    assert (areas < 32**2).sum() >= 10 and ((areas >= 32**2) & (areas < 96**2)).sum() >= 10


def test_reuses_existing_folder(tmp_path):
    folder = ensure_synthetic(tmp_path, **SMALL)
    ann = folder / "annotations" / "instances_train.json"
    before = ann.stat().st_mtime_ns
    (folder / "sentinel").write_text("kept")
    assert ensure_synthetic(tmp_path, **SMALL) == folder
    assert ann.stat().st_mtime_ns == before and (folder / "sentinel").read_text() == "kept"


def test_lost_race_discards_own_copy(tmp_path, monkeypatch):
    """Another process renames its copy into place while we generate: we use theirs."""
    real_generate = synthetic._generate
    target = tmp_path / synthetic.dataset_dir_name(train_images=10, val_images=4, image_size=96, seed=3,
                                                   num_classes=5)

    def generate_then_lose(out, name, **kw):
        real_generate(out, name, **kw)
        real_generate(target, name, **kw)  # the winner lands first
        (target / "winner").write_text("")

    monkeypatch.setattr(synthetic, "_generate", generate_then_lose)
    assert ensure_synthetic(tmp_path, **SMALL) == target
    assert (target / "winner").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]  # our temp copy is gone


def test_concurrent_processes_agree(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    kwargs = dict(train_images=24, val_images=8, image_size=96, seed=1)
    with ctx.Pool(3) as pool:
        results = [pool.apply_async(ensure_synthetic, (tmp_path / "shared",), kwargs) for _ in range(3)]
        paths = {r.get(timeout=60) for r in results}
    assert len(paths) == 1
    folder = paths.pop()
    assert [p.name for p in (tmp_path / "shared").iterdir()] == [folder.name]  # no temp leftovers
    assert _all_files(folder) == _all_files(ensure_synthetic(tmp_path / "single", **kwargs))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(num_classes=9), "synthetic num_classes must be in 1..8, got 9"),
        (dict(num_classes=0), "synthetic num_classes must be in 1..8, got 0"),
        (dict(image_size=16), "synthetic image_size must be >= 32, got 16"),
        (dict(train_images=0), "synthetic data needs at least 1 image per split, got train_images=0, val_images=4"),
        (dict(domain="target", num_classes=7), "synthetic num_classes must be in 1..6 for domain 'target', got 7"),
        (dict(domain="sauce"), "synthetic domain 'sauce' is not one of ['source', 'target']"),
    ],
)
def test_bad_parameters(tmp_path, kwargs, message):
    with pytest.raises(ValueError) as err:
        ensure_synthetic(tmp_path, **{**SMALL, **kwargs})
    assert str(err.value) == message
    assert not any(tmp_path.iterdir())


# ---- domains: source (the default, unchanged) and target ----------------------------------------------------------

TARGET = dict(train_images=24, val_images=4, image_size=128, seed=0, num_classes=len(TARGET_CLASSES),
              domain="target")


@pytest.fixture(scope="module")
def target_domain(tmp_path_factory) -> Path:
    return ensure_synthetic(tmp_path_factory.mktemp("target"), **TARGET)


def _background(folder: Path, split: str = "train") -> list[np.ndarray]:
    """Per image, the pixels outside every box grown by 2 px: background only."""
    coco = _load(folder, split)
    out = []
    for im in coco["images"]:
        pixels = np.asarray(Image.open(folder / "images" / split / im["file_name"])).astype(np.float64)
        free = np.ones(pixels.shape[:2], dtype=bool)
        for a in coco["annotations"]:
            if a["image_id"] == im["id"]:
                x, y, w, h = a["bbox"]
                free[max(y - 2, 0):y + h + 2, max(x - 2, 0):x + w + 2] = False
        out.append(pixels[free])
    return out


def test_source_is_the_default_and_keeps_its_name(tmp_path):
    assert DOMAINS["source"].classes == SHAPE_CLASSES and domain_classes() == SHAPE_CLASSES
    default = ensure_synthetic(tmp_path / "a", **SMALL)
    explicit = ensure_synthetic(tmp_path / "b", **SMALL, domain="source")
    assert default.name == explicit.name == "synth-v1-s96-t10-v4-c5-seed3"
    assert _all_files(default) == _all_files(explicit)


def test_domains_have_disjoint_ids_and_names(target_domain):
    source_ids = {c.category_id for c in SHAPE_CLASSES}
    target_ids = {c.category_id for c in TARGET_CLASSES}
    assert not source_ids & target_ids and min(target_ids) > max(source_ids)
    assert not {c.name for c in SHAPE_CLASSES} & {c.name for c in TARGET_CLASSES}
    assert target_domain.name == "synth-v1-target-s128-t24-v4-c6-seed0"
    train = _load(target_domain, "train")
    assert [c["id"] for c in train["categories"]] == [c.category_id for c in TARGET_CLASSES]
    assert {a["category_id"] for a in train["annotations"]} == target_ids  # every target class is drawn
    assert domain_classes("target", 2) == TARGET_CLASSES[:2]


def test_target_is_deterministic_and_differs_from_source(tmp_path, target_domain):
    again = ensure_synthetic(tmp_path, **TARGET)
    assert _all_files(again) == _all_files(target_domain)
    source = ensure_synthetic(tmp_path, **{**TARGET, "domain": "source"})
    assert source != again and _load(source, "train")["annotations"] != _load(again, "train")["annotations"]


def test_target_boxes_are_tight_and_area_is_pixel_count(target_domain):
    """The box test of the source domain, against the known object colour instead of the background
    (a textured background has no single colour to subtract)."""
    coco = _load(target_domain, "train")
    files = {im["id"]: im["file_name"] for im in coco["images"]}
    by_id = {c.category_id: c for c in TARGET_CLASSES}
    for ann in coco["annotations"]:
        x, y, w, h = ann["bbox"]
        assert 0 <= x and 0 <= y and x + w <= 128 and y + h <= 128 and w > 0 and h > 0
        pixels = np.asarray(Image.open(target_domain / "images" / "train" / files[ann["image_id"]]))
        # Object pixels: within noise of the class colour (noise std 6, so 25 is 4 sigma).
        mine = np.abs(pixels.astype(np.int32) - by_id[ann["category_id"]].rgb).max(axis=-1) < 25
        inside = mine[y:y + h, x:x + w]
        assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()
        assert abs(int(inside.sum()) - ann["area"]) <= 0.05 * ann["area"] + 2  # a few pixels lost to noise


def test_target_objects_are_smaller_on_average(all_shapes, target_domain):
    def mean_side(folder: Path) -> float:
        return float(np.mean([np.sqrt(a["bbox"][2] * a["bbox"][3]) for a in _load(folder, "train")["annotations"]]))

    source, target = mean_side(all_shapes), mean_side(target_domain)
    assert target < 0.8 * source, (source, target)


def test_textured_backgrounds_differ_from_plain(all_shapes, target_domain):
    """Plain source backgrounds are one grey plus noise (std 6); target ones carry a grating and blotches."""
    plain = [bg.std(axis=0).max() for bg in _background(all_shapes)]
    textured = [bg.std(axis=0).max() for bg in _background(target_domain)]
    assert max(plain) < 8 and min(textured) > 12, (max(plain), min(textured))

"""COCO-format detection dataset, the category-id <-> contiguous-label mapping, and the builder
that turns a sweep's `data:` section into train/val datasets plus the val ground truth for COCOeval.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from detsweep.data.images import load_rgb
from detsweep.data.transforms import apply, train_transform

log = logging.getLogger(__name__)

DATA_KINDS = ("synthetic", "coco")


def load_coco_json(ann: str | Path | Mapping[str, Any]) -> dict[str, Any]:
    """Load a COCO annotation file (or pass a loaded dict through)."""
    if isinstance(ann, Mapping):
        return dict(ann)
    path = Path(ann)
    if not path.is_file():
        raise FileNotFoundError(f"COCO annotation file not found: {path}")
    with path.open() as f:
        return json.load(f)


@dataclass(frozen=True)
class LabelMap:
    """COCO category ids (gappy, e.g. 1..90) <-> contiguous labels 0..K-1 in ascending id order."""

    category_ids: tuple[int, ...]
    names: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(self.category_ids) != len(self.names):
            raise ValueError(
                f"LabelMap needs one name per category id, got {len(self.category_ids)} ids and {len(self.names)} names"
            )
        if list(self.category_ids) != sorted(set(self.category_ids)):
            raise ValueError(f"LabelMap category_ids must be unique and ascending, got {list(self.category_ids)}")
        if not self.category_ids:
            raise ValueError("LabelMap needs at least one category")
        # Not a field: a dict lookup for to_label, kept out of eq/hash/repr.
        object.__setattr__(self, "_label_of", {c: i for i, c in enumerate(self.category_ids)})

    @classmethod
    def from_coco(cls, ann: str | Path | Mapping[str, Any], classes: Sequence[str] | None = None) -> LabelMap:
        """Build from a COCO annotation dict or file; `classes` keeps only those category names."""
        categories = load_coco_json(ann)["categories"]
        by_name = {c["name"]: int(c["id"]) for c in categories}
        if classes is None:
            chosen = sorted((int(c["id"]), c["name"]) for c in categories)
        else:
            unknown = [c for c in classes if c not in by_name]
            if unknown:
                raise ValueError(f"unknown class {unknown[0]!r}; available: {sorted(by_name)}")
            if len(set(classes)) != len(classes):
                raise ValueError(f"classes must not repeat, got {list(classes)}")
            chosen = sorted((by_name[name], name) for name in classes)
        return cls(tuple(i for i, _ in chosen), tuple(n for _, n in chosen))

    @property
    def num_classes(self) -> int:
        return len(self.category_ids)

    def __contains__(self, category_id: int) -> bool:
        return category_id in self._label_of

    def to_label(self, category_id: int) -> int:
        """COCO category id -> contiguous label."""
        try:
            return self._label_of[int(category_id)]
        except KeyError:
            raise KeyError(f"category id {category_id} is not in the label map {list(self.category_ids)}") from None

    def to_category_id(self, label: int) -> int:
        """Contiguous label -> COCO category id."""
        if not 0 <= int(label) < self.num_classes:
            raise KeyError(f"label {label} is out of range 0..{self.num_classes - 1}")
        return self.category_ids[int(label)]

    def as_dict(self) -> dict[str, list]:
        """JSON-able form, stored in every checkpoint."""
        return {"category_ids": list(self.category_ids), "names": list(self.names)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Sequence]) -> LabelMap:
        return cls(tuple(int(i) for i in d["category_ids"]), tuple(str(n) for n in d["names"]))


class CocoDetection(Dataset):
    """A COCO-format folder as `(image, target)` pairs in the torchvision detection contract.

    `image`: float32 `[3, H, W]` in 0..1. `target`: `boxes` float32 `[N, 4]` xyxy absolute pixels,
    `labels` int64 `[N]` contiguous 0..K-1 (checked at construction), `image_id` int, `orig_size` (h, w).
    Targets drop crowd annotations, classes outside `label_map`, and boxes that are empty after
    clipping to the image (x2 <= x1 or y2 <= y1); the evaluation ground truth (`coco_gt`)
    keeps them all, so COCOeval treats crowd regions as "ignore" as usual. Images without
    objects stay (DETR trains on empty targets).
    """

    def __init__(
        self,
        image_dir: str | Path,
        ann_file: str | Path,
        *,
        label_map: LabelMap | None = None,
        train: bool = False,
        hflip_prob: float = 0.5,
        image_ids: Sequence[int] | None = None,
        coco: Mapping[str, Any] | None = None,
    ) -> None:
        """`image_ids` restricts to those images (default: all, sorted); `coco` is the already
        parsed content of `ann_file`, to avoid parsing a large file twice (it is not retained)."""
        if not 0.0 <= hflip_prob <= 1.0:
            raise ValueError(f"hflip_prob must be in [0, 1], got {hflip_prob}")
        self.image_dir = Path(image_dir)
        if not self.image_dir.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.image_dir}")
        self.ann_file = Path(ann_file)
        if coco is None:
            coco = load_coco_json(self.ann_file)
        self._gt: dict[str, Any] | None = None
        # uint8 pixels (set by a GPU trial's worker): a quarter of float32's bytes through the loader and
        # the host-to-device copy; `engine.to_device` scales them to 0..1 on the device.
        self.uint8 = False
        self.label_map = label_map if label_map is not None else LabelMap.from_coco(coco)
        self.train = train
        self.hflip_prob = hflip_prob
        # data.augment (data/transforms.py): today's random flip by default; the worker sets its trial's recipe.
        self.transform = train_transform("hflip", flip_p=hflip_prob) if train and hflip_prob > 0 else None

        files = {int(im["id"]): im["file_name"] for im in coco["images"]}
        # The JSON's sizes decide whether an EXIF-turned image is turned when loaded (images.load_rgb).
        sizes = {int(im["id"]): _json_size(im) for im in coco["images"]}
        if image_ids is None:
            ids = sorted(files)
        else:
            missing = [i for i in image_ids if i not in files]
            if missing:
                raise ValueError(f"image ids not in {self.ann_file}: {missing[:5]}")
            ids = list(image_ids)
        self._image_ids = ids
        self._file_names = [files[i] for i in ids]
        self._json_sizes = [sizes[i] for i in ids]
        self._check_images_exist()
        self._boxes_xywh, self._labels, self._offsets = self._pack_targets(coco["annotations"], ids)

    def _check_images_exist(self) -> None:
        """Fail here, naming a path, rather than mid-epoch: an interrupted copy of COCO lacks files."""
        # One directory listing, not a stat per image: cheap even for COCO train's 118k files on NFS.
        listed = set(os.listdir(self.image_dir))
        missing = [n for n in self._file_names if n not in listed and not (self.image_dir / n).is_file()]
        if missing:
            raise FileNotFoundError(f"{len(missing)} of the {len(self._file_names)} images that {self.ann_file} "
                                    f"lists are missing from {self.image_dir}, e.g. {self.image_dir / missing[0]}")

    def _pack_targets(self, annotations: list[dict], ids: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Concatenate kept boxes per image into flat numpy arrays plus offsets.

        Numpy arrays instead of per-image lists of dicts: DataLoader workers then share pages
        instead of copying them on refcount writes (matters for COCO's 860k boxes).
        """
        per_image: dict[int, list[tuple[list[float], int]]] = {i: [] for i in ids}
        for a in annotations:
            anns = per_image.get(int(a["image_id"]))
            if anns is None or a.get("iscrowd", 0) or int(a["category_id"]) not in self.label_map:
                continue
            anns.append((a["bbox"], self.label_map.to_label(a["category_id"])))
        counts = [len(per_image[i]) for i in ids]
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        flat = [item for i in ids for item in per_image[i]]
        boxes = np.array([b for b, _ in flat], dtype=np.float32).reshape(-1, 4)
        labels = np.array([lab for _, lab in flat], dtype=np.int64)
        # Checked here, once and on the CPU: the detectors do not re-check labels on the device (a host-device
        # sync per image, issue 13), and DETR would silently train label K as "no object".
        bad = np.unique(labels[(labels < 0) | (labels >= self.label_map.num_classes)])
        if bad.size:
            raise ValueError(f"{self.ann_file}: labels must be contiguous in 0..{self.label_map.num_classes - 1}, "
                             f"got {bad.tolist()}")
        return boxes, labels, offsets

    def __len__(self) -> int:
        return len(self._image_ids)

    @property
    def image_ids(self) -> list[int]:
        """COCO image ids in dataset order."""
        return list(self._image_ids)

    @property
    def coco_gt(self) -> dict[str, Any]:
        """The full COCO ground-truth dict for COCOeval (crowd and all classes of the file included)."""
        if self._gt is None:  # loaded on first use: only the val set needs it
            self._gt = load_coco_json(self.ann_file)
        return self._gt

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        image_id = self._image_ids[index]
        # ImageReadError names the file: an image unreadable mid-run (a network filesystem) fails the
        # trial with that one line, never a bare OSError.
        pixels = load_rgb(self.image_dir / self._file_names[index], self._json_sizes[index])
        image = torch.from_numpy(pixels.copy()).permute(2, 0, 1).float().div_(255.0)
        h, w = pixels.shape[:2]

        start, end = self._offsets[index], self._offsets[index + 1]
        xywh = torch.from_numpy(self._boxes_xywh[start:end].copy())
        boxes_xyxy = torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1)
        boxes_xyxy[:, 0::2].clamp_(0, w)
        boxes_xyxy[:, 1::2].clamp_(0, h)
        keep = (boxes_xyxy[:, 2] > boxes_xyxy[:, 0]) & (boxes_xyxy[:, 3] > boxes_xyxy[:, 1])
        boxes_xyxy = boxes_xyxy[keep]
        labels = torch.from_numpy(self._labels[start:end].copy())[keep]

        # torch's global RNG: DataLoader seeds it per loader worker, so augmentations differ across workers.
        image, boxes_xyxy, labels = apply(self.transform, image, boxes_xyxy, labels)
        if self.uint8:  # a GPU trial's loader: a quarter of the bytes to copy, scaled back on the device
            image = image.mul(255.0).round_().to(torch.uint8)
        # orig_size: the image's own size, for boxes predicted on a resized eval image (engine.predict).
        target = {"boxes": boxes_xyxy, "labels": labels, "image_id": int(image_id), "orig_size": (h, w)}
        return image, target


def _json_size(image: Mapping[str, Any]) -> tuple[int, int] | None:
    w, h = image.get("width"), image.get("height")
    return (int(round(w)), int(round(h))) if isinstance(w, (int, float)) and isinstance(h, (int, float)) else None


def collate_fn(batch: Sequence[tuple[torch.Tensor, dict]]) -> tuple[list[torch.Tensor], list[dict]]:
    """Batch as lists, not stacked: images differ in size, the detectors batch them themselves."""
    images, targets = zip(*batch) if batch else ((), ())
    return list(images), list(targets)


@dataclass
class DatasetSplits:
    """What `build_dataset_splits` gives a trial: the datasets, the label map, the val ground truth
    COCOeval scores, and what the checks skipped (`n_skipped_images`, `n_skipped_boxes`)."""

    train: CocoDetection
    val: CocoDetection
    label_map: LabelMap
    val_ann: Path
    skipped: dict[str, int]


def build_datasets(**kwargs: Any) -> tuple[CocoDetection, CocoDetection, LabelMap, Path]:
    """`(train_set, val_set, label_map, val_ann_file)`: `build_dataset_splits` without the skip counts."""
    d = build_dataset_splits(**kwargs)
    return d.train, d.val, d.label_map, d.val_ann


def build_dataset_splits(
    *,
    kind: str,
    root: str | Path,
    train_images: int | None,
    val_images: int | None,
    image_size: int,
    classes: Sequence[str] | None,
    seed: int = 0,
    num_classes: int = 5,
    format: str = "auto",
    train: Any = None,
    val: Any = None,
    on_invalid: str = "error",
    image_check: str = "header",
    domain: str = "source",
) -> DatasetSplits:
    """The datasets of a sweep's data section.

    kind "synthetic": generated on first use (`train_images`/`val_images`/`image_size`/`seed`/
    `num_classes` are generation parameters). kind "coco": the splits of `root` in its layout
    (`format`, `detsweep.data.sources`), or the explicit `train`/`val` splits (`annotations`,
    `images`), checked (`detsweep.data.prepare`: annotations always, image headers unless
    `image_check` is `none`; cached once per node) with the `on_invalid` policy; `train_images`/
    `val_images` of 0 or None mean all images, otherwise the first N image ids (sorted);
    `image_size` and `num_classes` are unused (the detectors resize; the annotation file has the classes).
    With `classes`, training keeps only images holding at least one object of those classes,
    while val keeps all its images so false positives still count. `val_ann` is the exact
    ground truth COCOeval must score: cleaned, and restricted to the chosen classes and images (a
    cached derived file when any applies).
    """
    if kind not in DATA_KINDS:
        raise ValueError(f"data kind {kind!r} is not one of {list(DATA_KINDS)}")
    skipped = {"n_skipped_images": 0, "n_skipped_boxes": 0}
    if kind == "synthetic":
        from detsweep.data.synthetic import ensure_synthetic

        folder = ensure_synthetic(root, train_images=int(train_images or 0), val_images=int(val_images or 0),
                                  image_size=image_size, seed=seed, num_classes=num_classes, domain=domain)
        train_dir, val_dir = folder / "images" / "train", folder / "images" / "val"
        train_ann = folder / "annotations" / "instances_train.json"
        val_ann = folder / "annotations" / "instances_val.json"
        train_coco, val_coco = load_coco_json(train_ann), None
        train_limit = val_limit = None  # generation parameters, already applied
    else:
        (train_dir, train_ann, train_coco), (val_dir, val_ann, val_coco), skipped = _checked_splits(
            root, format, train, val, on_invalid, image_check)
        train_limit, val_limit = train_images or None, val_images or None

    label_map = LabelMap.from_coco(train_coco, list(classes) if classes else None)
    train_ids = sorted(int(im["id"]) for im in train_coco["images"])
    if classes:
        with_objects = {int(a["image_id"]) for a in train_coco["annotations"]
                        if not a.get("iscrowd", 0) and int(a["category_id"]) in label_map}
        train_ids = [i for i in train_ids if i in with_objects]
    train_ids = train_ids[:train_limit] if train_limit else train_ids
    train_set = CocoDetection(train_dir, train_ann, label_map=label_map, train=True, image_ids=train_ids,
                              coco=train_coco)
    del train_coco  # COCO train is ~450 MB of JSON; the dataset keeps only packed arrays

    if classes or val_limit:
        val_ann, val_coco = _write_val_subset(val_ann, label_map, val_limit), None
    val_set = CocoDetection(val_dir, val_ann, label_map=label_map, train=False, coco=val_coco)
    log.info("data %s: %d train / %d val images, %d classes", kind, len(train_set), len(val_set), label_map.num_classes)
    return DatasetSplits(train_set, val_set, label_map, val_ann, skipped)


def _checked_splits(root: str | Path, format: str, train: Any, val: Any, on_invalid: str, image_check: str):
    """((images, annotations, cleaned COCO dict) of train, the same of val, skip counts) of a coco
    source. A val file that cleaning changes is written as a derived file for COCOeval."""
    from detsweep.data.prepare import changed_ground_truth, cleaned, prepare, write_derived
    from detsweep.data.sources import resolve

    source = resolve(root, format, train, val)
    checks, skipped = prepare(source, on_invalid=on_invalid, image_check=image_check, progress=False)
    out = []
    for name in ("train", "val"):
        sc = checks.pop(name)
        coco, ann = cleaned(sc), sc.split.annotations
        if name == "val" and changed_ground_truth(sc):
            dropped = f"{sorted(sc.drop_images)}:{sorted(sc.drop_annotations)}:{sorted(sc.drop_categories)}"
            ann = write_derived(ann, coco, f"cleaned:{dropped}")
        out.append((sc.split.images, ann, coco))
    return out[0], out[1], skipped


def filter_coco(coco: Mapping[str, Any], category_ids: Sequence[int], image_ids: Sequence[int] | None = None) -> dict:
    """COCO dict restricted to `category_ids` (original ids kept) and optionally to `image_ids`."""
    cats, ims = set(category_ids), None if image_ids is None else set(image_ids)
    return {
        **{k: v for k, v in coco.items() if k not in ("images", "annotations", "categories")},
        "images": [im for im in coco["images"] if ims is None or int(im["id"]) in ims],
        "annotations": [a for a in coco["annotations"]
                        if int(a["category_id"]) in cats and (ims is None or int(a["image_id"]) in ims)],
        "categories": [c for c in coco["categories"] if int(c["id"]) in cats],
    }


def _write_val_subset(val_ann: Path, label_map: LabelMap, limit: int | None) -> Path:
    """Write (once) the val GT restricted to the label map's classes and the first `limit` images.

    The name hashes the source file's identity and the selection, so concurrent trials agree on
    it; the write is atomic. Next to the annotations when writable, else in the temp folder.
    """
    stat = val_ann.stat()
    key = json.dumps([str(val_ann.resolve()), stat.st_size, stat.st_mtime_ns, label_map.as_dict(), limit])
    name = f"{val_ann.stem}.subset-{hashlib.sha1(key.encode()).hexdigest()[:12]}.json"
    candidates = [val_ann.parent / ".detsweep-cache", Path(tempfile.gettempdir()) / "detsweep-cache"]
    for cache_dir in candidates:
        out = cache_dir / name
        if out.is_file():
            return out
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
            coco = load_coco_json(val_ann)
            ids = sorted(int(im["id"]) for im in coco["images"])
            subset = filter_coco(coco, label_map.category_ids, ids[:limit] if limit else None)
            tmp = cache_dir / f".{name}.{uuid.uuid4().hex}.tmp"  # unique across nodes sharing a volume
            tmp.write_text(json.dumps(subset))
            os.replace(tmp, out)
            return out
        except PermissionError:
            log.info("cannot write %s; using %s", cache_dir, candidates[-1])
    raise PermissionError(f"cannot write the val subset annotations into any of {[str(c) for c in candidates]}")

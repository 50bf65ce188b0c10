"""Where a dataset's splits live: the COCO 2017 layout, explicit splits, and the Roboflow, CVAT and
Label Studio COCO exports (`format: auto` recognises them from the folder), plus how an image's
`file_name` is found under its split's image folder. Stdlib only: loading a sweep file uses it.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

FORMATS = ("auto", "coco2017", "roboflow", "cvat", "labelstudio", "coco")
SPLITS = ("train", "val", "test")
# Folder (or CVAT subset) names each export uses for a split, compared case-insensitively.
SPLIT_NAMES = {"train": ("train", "training"), "val": ("val", "valid", "validation"), "test": ("test", "testing")}
ROBOFLOW_FILE = "_annotations.coco.json"
LABELSTUDIO_FILE = "result.json"
# What each layout looks like, for the message when a root matches none of them.
LAYOUTS = {
    "coco2017": "annotations/instances_{train,val}2017.json + images/{train2017,val2017}/",
    "roboflow": f"{{train,valid,test}}/{ROBOFLOW_FILE} with the images beside it",
    "cvat": "annotations/instances_<subset>.json + images/<subset>/ (subsets Train, Validation, Test)",
    "labelstudio": f"one export per split: {{train,val,test}}/{LABELSTUDIO_FILE} + images/",
}
_WINDOWS_DRIVE = re.compile(r"^[A-Za-z]:/")


class SourceError(ValueError):
    """A dataset that cannot be located. `key` is the sweep key to blame (`data.root`, `data.train`, ...)."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


@dataclass(frozen=True)
class Split:
    """One split: the COCO annotation file and the folder its `file_name`s are relative to."""

    name: str  # train | val | test
    annotations: Path
    images: Path


@dataclass(frozen=True)
class Source:
    """A dataset's splits (`train` and `val` always, `test` when present) and the layout they came from."""

    format: str  # one of FORMATS except auto: the layout taken
    splits: dict[str, Split]
    detected: bool = False  # format came from `auto`
    root: Path | None = None  # None for explicit splits

    @property
    def drops_root_category(self) -> bool:
        """Roboflow puts the dataset's name in as category 0 (supercategory 'none'), annotated nowhere."""
        return self.format == "roboflow"

    def describe(self) -> str:
        where = f"{self.format} layout at {self.root}" if self.root else f"explicit splits ({self.format})"
        return where + (" (format: auto)" if self.detected else "")


def resolve(root: str | Path | None, format: str = "auto", train: object = None, val: object = None,
            test: object = None) -> Source:
    """The splits of a sweep's `data:` section. `train`/`val`/`test` are None or objects with
    `annotations` and `images` attributes (SplitConfig); given, they win over `root`."""
    if format not in FORMATS:
        raise SourceError("data.format", f"{format!r} is not one of {list(FORMATS)}")
    if train is not None or val is not None or test is not None:
        return explicit_splits({"train": train, "val": val, "test": test}, format)
    if root is None:
        raise SourceError("data.root", "no data.root and no data.train/data.val")
    return root_layout(root, format)


def _as_path(value: str | Path) -> Path:
    return Path(os.path.expanduser(str(value)))


def explicit_splits(given: dict[str, object], format: str = "auto") -> Source:
    """`data.train: {annotations, images}` and `data.val` (and `data.test`), any COCO-format files."""
    for name in ("train", "val"):
        if given.get(name) is None:
            raise SourceError(f"data.{name}", "missing: data.train and data.val are given together "
                              "(each {annotations: FILE, images: DIR})")
    splits = {}
    for name, cfg in given.items():
        if cfg is None:
            continue
        ann = _as_path(getattr(cfg, "annotations"))
        images = getattr(cfg, "images", None)
        splits[name] = Split(name, ann, _as_path(images) if images else guess_images_dir(ann))
    taken = format if format != "auto" else guess_format(splits["train"].annotations)
    return Source(taken, splits, detected=format == "auto")


def guess_format(ann_file: Path) -> str:
    """The export an annotation file comes from, by its name and place."""
    if ann_file.name == ROBOFLOW_FILE:
        return "roboflow"
    if ann_file.name == LABELSTUDIO_FILE:
        return "labelstudio"
    if ann_file.parent.name == "annotations" and re.fullmatch(r"instances_.+\.json", ann_file.name):
        return "coco2017" if ann_file.name.endswith("2017.json") else "cvat"
    return "coco"


def guess_images_dir(ann_file: Path) -> Path:
    """The image folder of an annotation file given alone: `images/<subset>` or `images/` beside an
    `annotations/` folder (COCO 2017, CVAT), `images/` beside it (Label Studio), else its own folder
    (Roboflow)."""
    if ann_file.parent.name == "annotations":
        images = ann_file.parent.parent / "images"
        subset = ann_file.stem.removeprefix("instances_")
        return images / subset if (images / subset).is_dir() else images
    return ann_file.parent


def root_layout(root: str | Path, format: str = "auto") -> Source:
    """The splits under a dataset root in the given layout, or the one recognised (`auto`)."""
    path = _as_path(root)
    if not path.is_dir():
        raise SourceError("data.root", f"{str(root)!r} is not a directory")
    taken = detect(path) if format == "auto" else format
    if taken == "coco":
        raise SourceError("data.format", "'coco' (plain COCO files) needs data.train and data.val, not "
                          "data.root; a root takes one of ['auto', 'coco2017', 'roboflow', 'cvat', 'labelstudio']")
    splits = {"coco2017": _coco2017, "roboflow": _roboflow, "cvat": _cvat, "labelstudio": _labelstudio}[taken](path)
    return Source(taken, splits, detected=format == "auto", root=path)


def detect(root: Path) -> str:
    """Which layout `root` holds: the first of coco2017, roboflow, cvat, labelstudio whose
    annotation files are there."""
    if (root / "annotations" / "instances_train2017.json").is_file():
        return "coco2017"
    if any((d / ROBOFLOW_FILE).is_file() for d in _subdirs(root)):
        return "roboflow"
    if any(p.name != "instances_train2017.json" for p in (root / "annotations").glob("instances_*.json")):
        return "cvat"
    if (root / LABELSTUDIO_FILE).is_file() or any((d / LABELSTUDIO_FILE).is_file() for d in _subdirs(root)):
        return "labelstudio"
    known = "; ".join(f"{k}: {v}" for k, v in LAYOUTS.items())
    raise SourceError("data.root", f"{str(root)!r} holds no dataset layout detsweep knows ({known}); or give "
                      f"data.train and data.val")


def _subdirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []


def _named(candidates: list[Path], split: str) -> Path | None:
    """The candidate whose name (a folder or a CVAT subset) is one of the split's names."""
    names = SPLIT_NAMES[split]
    for name in names:  # in preference order: `val` before `valid` before `validation`
        for c in candidates:
            if c.name.lower() == name or c.stem.removeprefix("instances_").lower() == name:
                return c
    return None


def _need(splits: dict[str, Split], fmt: str, root: Path, what: str) -> dict[str, Split]:
    for name in ("train", "val"):
        if name not in splits:
            raise SourceError("data.root", f"{str(root)!r} ({fmt}) has no {name} split: expected {what}")
    return splits


def _coco2017(root: Path) -> dict[str, Split]:
    splits = {}
    for name in ("train", "val"):
        ann = root / "annotations" / f"instances_{name}2017.json"
        if not ann.is_file():
            raise SourceError("data.root", f"{str(root)!r} has no annotations/instances_{name}2017.json (a COCO "
                              f"2017 root holds {LAYOUTS['coco2017']}; `python -m detsweep.data coco2017 --root "
                              f"DIR` fetches it)")
        splits[name] = Split(name, ann, root / "images" / f"{name}2017")
    return splits


def _roboflow(root: Path) -> dict[str, Split]:
    folders = [d for d in _subdirs(root) if (d / ROBOFLOW_FILE).is_file()]
    splits = {}
    for name in SPLITS:
        d = _named(folders, name)
        if d is not None:
            splits[name] = Split(name, d / ROBOFLOW_FILE, d)
    return _need(splits, "roboflow", root, f"train/{ROBOFLOW_FILE} and valid/{ROBOFLOW_FILE}")


def _cvat(root: Path) -> dict[str, Split]:
    files = sorted((root / "annotations").glob("instances_*.json"))
    splits = {}
    for name in SPLITS:
        f = _named(files, name)
        if f is not None:
            splits[name] = Split(name, f, guess_images_dir(f))
    if not splits and files:
        subsets = [f.stem.removeprefix("instances_") for f in files]
        raise SourceError("data.root", f"{str(root)!r} (cvat) has the subsets {subsets} and none named Train or "
                          f"Validation: name the subsets so in CVAT, or give data.train and data.val")
    return _need(splits, "cvat", root, "annotations/instances_Train.json and annotations/instances_Validation.json")


def _labelstudio(root: Path) -> dict[str, Split]:
    folders = [d for d in _subdirs(root) if (d / LABELSTUDIO_FILE).is_file()]
    splits = {}
    for name in SPLITS:
        d = _named(folders, name)
        if d is not None:
            splits[name] = Split(name, d / LABELSTUDIO_FILE, guess_images_dir(d / LABELSTUDIO_FILE))
    if not splits and (root / LABELSTUDIO_FILE).is_file():
        raise SourceError("data.root", f"{str(root)!r} (labelstudio) is one export, one split: unzip one export "
                          f"per split into train/ and val/ under the root, or give data.train and data.val")
    return _need(splits, "labelstudio", root, f"train/{LABELSTUDIO_FILE} and val/{LABELSTUDIO_FILE}")


# --------------------------------------------------------------------------------------------
# file_name -> the file under the split's image folder
# --------------------------------------------------------------------------------------------
def is_absolute(file_name: str) -> bool:
    """`/home/a.jpg`, `C:\\data\\a.jpg`, `\\\\server\\a.jpg`: a path of the annotating machine."""
    name = file_name.replace("\\", "/")
    return name.startswith("/") or bool(_WINDOWS_DRIVE.match(name))


def candidates(file_name: str) -> list[str]:
    """Relative paths to try for a `file_name`, most specific first: backslashes read as `/`, then
    leading folders dropped one by one (`images/train/a.jpg`, `train/a.jpg`, `a.jpg`), since
    exports write them relative to the export's root, not to the image folder."""
    parts = [p for p in PurePosixPath(file_name.replace("\\", "/")).parts if p not in (".", "")]
    out = []
    for i in range(len(parts)):
        rest = parts[i:]
        if ".." not in rest:
            out.append("/".join(rest))
    return out


class FileResolver:
    """Finds each `file_name` under one image folder; one directory listing serves flat folders."""

    def __init__(self, images: Path) -> None:
        self.images = images
        self._listed: set[str] | None = None

    @property
    def listed(self) -> set[str]:
        if self._listed is None:
            self._listed = set(os.listdir(self.images)) if self.images.is_dir() else set()
        return self._listed

    def _exists(self, rel: str) -> bool:
        top, sep, _ = rel.partition("/")
        # A nested name needs its first folder in the listing: no stat for prefixes that cannot match.
        return top in self.listed and (not sep or (self.images / rel).is_file())

    def find(self, file_name: str) -> str | None:
        """The path relative to the image folder, or None when no candidate exists."""
        return next((rel for rel in candidates(file_name) if self._exists(rel)), None)

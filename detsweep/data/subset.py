"""COCO class subsets (e.g. 10 of the 80 classes) written as a new COCO-format root.

The output is itself a valid `kind: coco` root: `annotations/instances_{split}2017.json` plus
`images/{split}2017` symlinks to the source images (never copies).
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from detsweep.storage import write_bytes_atomic
from detsweep.data.coco import LabelMap, filter_coco, load_coco_json

log = logging.getLogger(__name__)

SPLITS = ("train2017", "val2017")


def write_subset(
    root_or_ann: str | Path, classes: Sequence[str], out_dir: str | Path, *, keep_all_images: bool | None = None
) -> dict[str, int]:
    """Write the annotations of `classes` only, keeping the original category ids.

    `root_or_ann`: a COCO root (`annotations/instances_{train,val}2017.json`, every split found
    is written) or one annotation file. Image policy: a training split keeps only images with
    at least one annotation of the chosen classes; a val split (file name containing "val")
    keeps ALL its images, so false positives on images without those classes still count.
    `keep_all_images` overrides that choice. Crowd annotations are kept (COCOeval ignores them).
    Returns the non-crowd box count per class name, summed over the splits written.
    """
    src = Path(root_or_ann).expanduser()
    if src.is_dir():
        ann_files = [src / "annotations" / f"instances_{s}.json" for s in SPLITS]
        ann_files = [f for f in ann_files if f.is_file()]
        if not ann_files:
            raise FileNotFoundError(
                f"no annotations under {src}: expected {src}/annotations/instances_{{train,val}}2017.json"
            )
    elif src.is_file():
        ann_files = [src]
    else:
        raise FileNotFoundError(f"no such COCO root or annotation file: {src}")
    if not classes:
        raise ValueError("write_subset needs at least one class name")

    out_dir = Path(out_dir).expanduser()
    (out_dir / "annotations").mkdir(parents=True, exist_ok=True)
    totals: Counter[str] = Counter({name: 0 for name in classes})
    for ann_file in ann_files:
        coco = load_coco_json(ann_file)
        label_map = LabelMap.from_coco(coco, list(classes))  # unknown names raise, listing the valid ones
        keep_all = ("val" in ann_file.stem) if keep_all_images is None else keep_all_images
        subset = filter_coco(coco, label_map.category_ids)
        if not keep_all:
            with_objects = {int(a["image_id"]) for a in subset["annotations"] if not a.get("iscrowd", 0)}
            subset["images"] = [im for im in coco["images"] if int(im["id"]) in with_objects]
            subset["annotations"] = [a for a in subset["annotations"] if int(a["image_id"]) in with_objects]
        _write_json_atomic(out_dir / "annotations" / ann_file.name, subset)

        names = dict(zip(label_map.category_ids, label_map.names))
        counts = Counter(names[int(a["category_id"])] for a in subset["annotations"] if not a.get("iscrowd", 0))
        totals.update(counts)
        log.info("%s: %d images, %d boxes", ann_file.name, len(subset["images"]), sum(counts.values()))
        _link_images(ann_file, out_dir)
    return dict(totals)


def _write_json_atomic(path: Path, obj: dict) -> None:
    write_bytes_atomic(json.dumps(obj).encode(), str(path))


def _link_images(ann_file: Path, out_dir: Path) -> None:
    """Symlink `out_dir/images/<split>` to the source images of `instances_<split>.json`.

    Looks where our layout and COCO's zip layout put them (`root/images/<split>`,
    `root/<split>`); without either, only the annotations are written.
    """
    split = ann_file.stem.removeprefix("instances_")
    data_root = ann_file.resolve().parent.parent
    for candidate in (data_root / "images" / split, data_root / split):
        if candidate.is_dir():
            link = out_dir / "images" / split
            link.parent.mkdir(parents=True, exist_ok=True)
            if link.is_symlink() or link.exists():
                if link.resolve() == candidate.resolve():
                    return
                if not link.is_symlink():
                    raise FileExistsError(f"{link} exists and is not a symlink; not replacing it")
                link.unlink()
            link.symlink_to(candidate.resolve(), target_is_directory=True)
            return
    log.warning("no image folder found for %s; wrote annotations only", ann_file)

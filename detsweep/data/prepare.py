"""A run's data checks and their policy: `check_source` runs the checks of `check.py` on a source's
splits (image results cached once per node and dataset), `enforce` refuses (`on_invalid: error`) or
drops and counts (`skip`), and `cleaned` gives the COCO dict that the dataset is then built from.
The driver calls it before Ray starts; each worker calls it again when it builds its datasets (the
annotation checks take seconds; the image results come from the cache). Torch-free.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from detsweep.data.check import KINDS, DataError, Finding, SplitCheck, apply_image_results, check_across, \
    check_annotations, load_annotations, probe_images
from detsweep.data.sources import Source

log = logging.getLogger(__name__)

ON_INVALID = ("error", "skip")
IMAGE_CHECKS = ("header", "none")  # a run's; the doctor also decodes ("decode")
CACHE_DIR = Path(tempfile.gettempdir()) / "detsweep-cache"  # node-local: image results once per node


def check_source(source: Source, *, splits: Sequence[str] = ("train", "val"), image_check: str = "header",
                 workers: int | None = None, progress: bool = True, cache: str = "use") -> dict[str, SplitCheck]:
    """Every check on `splits` of `source` (those it has). `image_check`: `decode`, `header`, or
    `none`; the image checks of a split whose image folder is not on this machine are left out
    (its `image_check` stays `none`). `cache`: `use` this node's image results when there are
    some, `refresh` them (the driver: an image fixed in place leaves the folder's mtime alone), or
    `off`. Raises DataError for an unusable file or folder."""
    checks: dict[str, SplitCheck] = {}
    for name in splits:
        split = source.splits.get(name)
        if split is None:
            continue
        coco = load_annotations(split.annotations)
        sc = check_annotations(split, coco, drop_root_category=source.drops_root_category)
        if image_check != "none" and split.images.is_dir():
            probe = dict(decode=image_check == "decode", workers=workers, progress=progress)
            apply_image_results(sc, probe_images(sc, **probe) if cache == "off" else
                                _cached(sc, image_check, probe, refresh=cache == "refresh"))
        checks[name] = sc
    check_across(checks)
    return checks


def _cache_file(sc: SplitCheck, mode: str) -> Path:
    """Keyed by the annotation file's and image folder's identity: a changed dataset is checked anew."""
    ann, images = sc.split.annotations.resolve(), sc.split.images.resolve()
    a, i = ann.stat(), images.stat()
    key = json.dumps([str(ann), a.st_size, a.st_mtime_ns, str(images), i.st_mtime_ns, mode])
    return CACHE_DIR / f"images-{hashlib.sha1(key.encode()).hexdigest()[:16]}.json"


def _cached(sc: SplitCheck, mode: str, probe: dict[str, Any], refresh: bool = False) -> dict[str, Any]:
    """`probe_images`' results from this node's cache, computed and stored on the first call (and
    on every `refresh`)."""
    path = _cache_file(sc, mode)
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    # Trials starting together on one node wait for the first one's check instead of repeating it.
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if path.is_file() and not refresh:
            return json.loads(path.read_text())
        results = probe_images(sc, **probe)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        tmp.write_text(json.dumps(results))
        os.replace(tmp, path)
        return results


def problems(checks: dict[str, SplitCheck]) -> list[Finding]:
    """Every problem, image problems first (the order of KINDS), train's before val's within a kind."""
    order = {k: i for i, k in enumerate(KINDS)}
    found = [f for sc in checks.values() for f in sc.findings.values() if f.info.severity == "problem"]
    return sorted(found, key=lambda f: order[f.kind])


def enforce(checks: dict[str, SplitCheck], on_invalid: str) -> dict[str, int]:
    """`error`: raise a DataError with the first problem (file, field, count, first items). `skip`:
    log one line per kind of problem (count and first item) and return the skip counts
    `{"n_skipped_images": ..., "n_skipped_boxes": ...}` (boxes dropped for their own defect; the
    boxes of a skipped image are not counted again)."""
    if on_invalid not in ON_INVALID:
        raise ValueError(f"on_invalid {on_invalid!r} is not one of {list(ON_INVALID)}")
    found = problems(checks)
    if found and on_invalid == "error":
        more = f" (and {len(found) - 1} more kinds of problem; `python -m detsweep.data check` lists them)" \
            if len(found) > 1 else ""
        raise DataError(f"{found[0].line()}{more}; data.on_invalid: skip drops them")
    for f in found:
        log.warning("skipped %d %s (%s: %s), first %s", f.count, f.info.what, f.file, f.info.field, f.examples[0])
    for sc in checks.values():
        for f in sc.findings.values():
            if f.info.severity == "info" and f.info.drops:
                log.info("%s: %s: %s", f.file, f.info.what, ", ".join(f.examples))
        if len(sc.drop_images) >= sc.counts["images"]:
            raise DataError(f"{sc.split.annotations}: images: no usable image left once the problems above are "
                            f"skipped")
    return {"n_skipped_images": sum(len(sc.drop_images) for sc in checks.values()),
            "n_skipped_boxes": sum(len(sc.drop_annotations) for sc in checks.values())}


def cleaned(sc: SplitCheck) -> dict[str, Any]:
    """The split's COCO dict without what `enforce` skipped (the dropped images with their boxes,
    the dropped boxes and categories), file_names as found under the image folder. The parsed dict
    itself when nothing changes."""
    coco = sc.coco
    if not (sc.drop_images or sc.drop_annotations or sc.drop_categories or sc.file_names):
        return coco
    images = [dict(im, file_name=sc.file_names[j]) if j in sc.file_names else im
              for j, im in enumerate(coco["images"]) if j not in sc.drop_images]
    kept = {im["id"] for im in images}
    anns = [a for i, a in enumerate(coco["annotations"]) if i not in sc.drop_annotations and a["image_id"] in kept]
    cats = [c for c in coco["categories"] if c["id"] not in sc.drop_categories]
    return {**coco, "images": images, "annotations": anns, "categories": cats}


def changed_ground_truth(sc: SplitCheck) -> bool:
    """Whether `cleaned` differs from the file in what COCOeval reads (not only in file_names)."""
    return bool(sc.drop_images or sc.drop_annotations or sc.drop_categories)


def prepare(source: Source, *, on_invalid: str, image_check: str = "header", progress: bool = True,
            cache: str = "use") -> tuple[dict[str, SplitCheck], dict[str, int]]:
    """A run's checks of train and val with the policy applied: (checks, skip counts). Logs what
    the image check did. Raises DataError (unusable, or a problem under `on_invalid: error`)."""
    started = time.perf_counter()
    checks = check_source(source, image_check=image_check, progress=progress, cache=cache)
    skipped = enforce(checks, on_invalid)
    for name, sc in checks.items():
        how = {"header": "image headers checked", "decode": "images decoded",
               "none": "image check skipped" if image_check == "none" else
               f"images not on this machine ({sc.split.images}): each node checks them once"}[sc.image_check]
        log.info("data %s (%s): %d images, %d boxes; %s", name, source.describe(), sc.counts["images"],
                 sc.counts["annotations"], how)
    log.info("data checks took %.1f s", time.perf_counter() - started)
    return checks, skipped


def write_derived(source_file: Path, coco: dict[str, Any], tag: str) -> Path:
    """Write (once) a derived annotation file for COCOeval next to `source_file` (else in the temp
    folder), named by a hash of the source's identity and `tag`; atomic, so concurrent trials agree."""
    stat = source_file.stat()
    key = json.dumps([str(source_file.resolve()), stat.st_size, stat.st_mtime_ns, tag])
    name = f"{source_file.stem}.{hashlib.sha1(key.encode()).hexdigest()[:12]}.json"
    for cache_dir in (source_file.parent / ".detsweep-cache", CACHE_DIR):
        out = cache_dir / name
        if out.is_file():
            return out
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
            tmp = cache_dir / f".{name}.{uuid.uuid4().hex}.tmp"
            tmp.write_text(json.dumps(coco))
            os.replace(tmp, out)
            return out
        except PermissionError:
            continue
    raise DataError(f"{source_file}: cannot write its cleaned copy next to it or into {CACHE_DIR}")

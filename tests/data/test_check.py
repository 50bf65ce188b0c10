"""One small dataset per defect, through the run's own path: `detsweep.run.prepare_data` (the driver,
before Ray) refuses with the exact line under `on_invalid: error`; under `skip` the workers' builder
drops and counts exactly what the check named. Unusable files are refused under either policy."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from detsweep import run
from detsweep.data.coco import build_dataset_splits
from detsweep.sweep import SweepError, expand, parse_sweep

from tests.data.builders import coco2017, dump, write_image

SKIP_TAIL = "; data.on_invalid: skip drops them"


def _set(split: str, section: str, index: int, **values):
    def mutate(root: Path, coco: dict) -> None:
        coco[split][section][index].update(values)
    return mutate


def _add(split: str, section: str, **entry):
    def mutate(root: Path, coco: dict) -> None:
        coco[split][section].append(entry)
    return mutate


def _file(split: str, name: str, data: bytes):
    def mutate(root: Path, coco: dict) -> None:
        (root / "images" / f"{split}2017" / name).write_bytes(data)
    return mutate


def _category(split: str, **category):
    def mutate(root: Path, coco: dict) -> None:
        coco[split]["categories"].append(category)
        coco[split]["annotations"].append({"id": 999, "image_id": 10, "category_id": category["id"],
                                           "bbox": [1.0, 1.0, 4.0, 4.0], "iscrowd": 0})
    return mutate


def _rename_category(split: str, cid: int, name: str):
    def mutate(root: Path, coco: dict) -> None:
        next(c for c in coco[split]["categories"] if c["id"] == cid)["name"] = name
    return mutate


T, V = "{train}", "{val}"  # the annotation files, filled in per test
I = "{images}"  # train's image folder
DEFECTS = [
    # (id, mutation, the refusal under on_invalid: error (without its tail), the skip counts)
    ("box_non_finite", _set("train", "annotations", 0, bbox=[float("nan"), 3.0, 10.0, 5.0]),
     f"{T}: annotations[].bbox: 1 boxes with non-finite values, e.g. annotation 100 (image 1) bbox [nan, 3.0, 10.0, 5.0]",
     (0, 1)),
    ("box_infinite", _set("train", "annotations", 1, bbox=[1.0, 1.0, float("inf"), 2.0]),
     f"{T}: annotations[].bbox: 1 boxes with non-finite values, e.g. annotation 101 (image 1) bbox [1.0, 1.0, inf, 2.0]",
     (0, 1)),
    ("box_wrong_length", _set("train", "annotations", 0, bbox=[1.0, 2.0, 3.0]),
     f"{T}: annotations[].bbox: 1 boxes that are not 4 numbers, e.g. annotation 100 (image 1) bbox [1.0, 2.0, 3.0]",
     (0, 1)),
    ("box_not_numbers", _set("train", "annotations", 0, bbox=["1", 2, 3, 4]),
     f"{T}: annotations[].bbox: 1 boxes that are not 4 numbers, e.g. annotation 100 (image 1) bbox ['1', 2, 3, 4]",
     (0, 1)),
    ("box_empty", _set("train", "annotations", 2, bbox=[1.0, 1.0, 0.0, 5.0]),
     f"{T}: annotations[].bbox: 1 boxes with zero or negative width or height, e.g. annotation 102 (image 2) "
     f"bbox [1.0, 1.0, 0.0, 5.0]", (0, 1)),
    ("box_outside", _set("train", "annotations", 0, bbox=[45.0, 1.0, 5.0, 5.0]),
     f"{T}: annotations[].bbox: 1 boxes empty after clipping to their image, e.g. annotation 100 (image 1) "
     f"bbox [45.0, 1.0, 5.0, 5.0]", (0, 1)),
    ("unknown_category", _set("train", "annotations", 0, category_id=7),
     f"{T}: annotations[].category_id: 1 annotations of unknown categories, e.g. annotation 100 (image 1) category 7",
     (0, 1)),
    ("unknown_image", _set("train", "annotations", 3, image_id=99),
     f"{T}: annotations[].image_id: 1 annotations of unknown images, e.g. annotation 103 (image 99)", (0, 1)),
    ("annotation_duplicate_id", _set("train", "annotations", 3, id=100),
     f"{T}: annotations[].id: 1 annotations whose id an earlier one has, e.g. annotation 100 (image 3)", (0, 1)),
    ("image_duplicate_id", _add("train", "images", id=2, file_name="c.png", width=24, height=16),
     f"{T}: images[].id: 1 images whose id an earlier image has, e.g. image 2 'c.png'", (1, 0)),
    ("image_absolute_path", _set("train", "images", 1, file_name="/home/ann/pets/b.png"),
     f"{T}: images[].file_name: 1 images with an absolute file_name, e.g. image 2 '/home/ann/pets/b.png'", (1, 0)),
    ("image_absolute_windows_path", _set("train", "images", 1, file_name="C:\\Users\\ann\\b.png"),
     f"{T}: images[].file_name: 1 images with an absolute file_name, e.g. image 2 'C:\\\\Users\\\\ann\\\\b.png'", (1, 0)),
    ("image_bad_size", _set("train", "images", 1, width=0),
     f"{T}: images[].width/height: 1 images without a positive width and height, e.g. image 2 'b.png' "
     f"(width 0, height 20)", (1, 0)),
    ("image_missing", _set("train", "images", 2, file_name="zz.png"),
     f"{T}: images[].file_name: 1 images whose file is not in the image folder, e.g. image 3 {I}/zz.png", (1, 0)),
    ("image_unreadable", _file("train", "b.png", b"not an image"),
     f"{T}: images[].file_name: 1 unreadable images, e.g. image 2 {I}/b.png (UnidentifiedImageError)", (1, 0)),
    ("image_size_mismatch", _set("train", "images", 0, width=41),
     f"{T}: images[].width/height: 1 images whose file size is not the JSON's, e.g. image 1 {I}/a.png "
     f"(JSON 41x30, file 40x30)", (1, 0)),
    ("val_category_not_in_train", _category("val", id=3, name="bird"),
     f"{V}: categories: 1 categories that train's categories lack, e.g. category 3 'bird'", (0, 1)),
    ("val_category_renamed", _rename_category("val", 2, "wolf"),
     f"{V}: categories: 1 categories that train's categories lack, e.g. category 2 'wolf', train has 'dog'", (0, 2)),
]


def _dataset(tmp_path: Path, mutate) -> tuple[Path, dict[str, str]]:
    root = tmp_path / "coco"
    coco = coco2017(root)
    mutate(root, coco)
    for split in ("train", "val"):
        dump(coco[split], root / "annotations" / f"instances_{split}2017.json")
    names = {"train": str(root / "annotations" / "instances_train2017.json"),
             "val": str(root / "annotations" / "instances_val2017.json"), "images": str(root / "images" / "train2017")}
    return root, names


def _trials(root: Path, tmp_path: Path, **data):
    sweep = parse_sweep({"name": "t", "data": {"kind": "coco", "root": str(root), **data},
                         "storage": str(tmp_path / "out")}, "t.yaml")
    return expand(sweep)


@pytest.mark.parametrize("mutate, line", [(m, ln) for _, m, ln, _ in DEFECTS], ids=[d[0] for d in DEFECTS])
def test_each_defect_is_refused_before_ray_with_one_line(tmp_path, mutate, line):
    root, names = _dataset(tmp_path, mutate)
    with pytest.raises(SweepError) as err:
        run.prepare_data(_trials(root, tmp_path))
    assert str(err.value) == line.format(**names) + SKIP_TAIL


@pytest.mark.parametrize("mutate, line, counts", [(m, ln, c) for _, m, ln, c in DEFECTS], ids=[d[0] for d in DEFECTS])
def test_each_defect_is_skipped_counted_and_logged(tmp_path, caplog, mutate, line, counts):
    root, names = _dataset(tmp_path, mutate)
    caplog.set_level(logging.INFO, logger="detsweep.data")
    run.prepare_data(_trials(root, tmp_path, on_invalid="skip"))  # the driver passes it
    skipped = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipped ")]
    line = line.format(**names)
    file, field, rest = line.split(": ", 2)
    count, what = rest.split(", e.g. ")[0].split(" ", 1)
    first = rest.split(", e.g. ")[1]
    assert skipped == [f"skipped {count} {what} ({file}: {field}), first {first}"]
    splits = build_dataset_splits(kind="coco", root=root, train_images=0, val_images=0, image_size=0, classes=None,
                                  on_invalid="skip")  # what each worker builds
    assert (splits.skipped["n_skipped_images"], splits.skipped["n_skipped_boxes"]) == counts
    duplicate = "an earlier image has" in line  # the duplicate entry goes, its id stays
    assert len(splits.train) + len(splits.val) == 5 - counts[0] + duplicate


def test_a_clean_dataset_passes_and_says_what_it_checked(tmp_path, caplog):
    root, _ = _dataset(tmp_path, lambda root, coco: None)
    caplog.set_level(logging.INFO, logger="detsweep.data")
    run.prepare_data(_trials(root, tmp_path))
    said = [r.getMessage() for r in caplog.records]
    assert f"data train (coco2017 layout at {root} (format: auto)): 3 images, 4 boxes; image headers checked" in said
    sweep = parse_sweep({"name": "t", "data": {"kind": "coco", "root": str(root)}}, "t.yaml")
    trials, _ = run.plan(sweep, run.parse_args(["t.yaml", "--skip-image-check"]))
    assert trials[0].data.image_check == "none"  # the workers check no image either
    run.prepare_data(trials)
    assert f"data val (coco2017 layout at {root} (format: auto)): 2 images, 3 boxes; image check skipped" in \
        [r.getMessage() for r in caplog.records]


def test_skip_image_check_leaves_an_unreadable_image_to_the_trial(tmp_path):
    root, _ = _dataset(tmp_path, _file("train", "b.png", b"not an image"))
    run.prepare_data(_trials(root, tmp_path, image_check="none"))  # annotations only: passes


def test_problems_are_refused_image_problems_first_and_more_kinds_counted(tmp_path):
    def two(root, coco):
        _set("train", "annotations", 0, bbox=[1.0, 1.0, 0.0, 5.0])(root, coco)
        _set("val", "images", 1, file_name="gone.png")(root, coco)
    root, names = _dataset(tmp_path, two)
    with pytest.raises(SweepError) as err:
        run.prepare_data(_trials(root, tmp_path))
    assert str(err.value) == (f"{names['val']}: images[].file_name: 1 images whose file is not in the image folder, "
                              f"e.g. image 11 {root}/images/val2017/gone.png (and 1 more kinds of problem; "
                              f"`python -m detsweep.data check` lists them){SKIP_TAIL}")


def test_an_image_unreadable_mid_run_fails_with_the_file_named(tmp_path):
    root, _ = _dataset(tmp_path, lambda root, coco: None)
    splits = build_dataset_splits(kind="coco", root=root, train_images=0, val_images=0, image_size=0, classes=None)
    (root / "images" / "train2017" / "a.png").write_bytes(b"")  # after the checks: a network filesystem, say
    with pytest.raises(Exception) as err:
        splits.train[0]
    assert type(err.value).__name__ == "ImageReadError" and not isinstance(err.value, OSError)
    assert str(err.value).startswith(f"cannot read image {root}/images/train2017/a.png: ")


def _write(path: Path, text: str) -> None:
    path.write_text(text)


UNUSABLE = [
    # (id, the train file's text, the one line)
    ("malformed_json", '{"images": [{"id": 1, "file_name": "a.png', None),
    ("top_level_list", "[]", "{train}: the top level is a list, not an object with images, annotations and categories"),
    ("no_images", json.dumps({"annotations": [], "categories": []}),
     "{train}: images: missing (a COCO file holds lists images, annotations and categories)"),
    ("annotations_not_a_list", json.dumps({"images": [], "annotations": {}, "categories": []}),
     "{train}: annotations: a dict, not a list (a COCO file holds lists images, annotations and categories)"),
]


def _unusable_field(coco: dict, what: str) -> None:
    if what == "bbox_missing":
        del coco["annotations"][1]["bbox"]
    elif what == "category_id_string":
        coco["annotations"][0]["category_id"] = "1"
    elif what == "file_name_missing":
        del coco["images"][2]["file_name"]
    elif what == "image_id_float":
        coco["images"][0]["id"] = 1.5
    elif what == "category_twice":
        coco["categories"].append({"id": 2, "name": "wolf"})
    elif what == "no_categories":
        coco["categories"] = []


UNUSABLE_FIELDS = [
    ("bbox_missing", "{train}: annotations[1].bbox: missing (id 101)"),
    ("category_id_string", "{train}: annotations[0].category_id: '1' must be int (id 100)"),
    ("file_name_missing", "{train}: images[2].file_name: missing (id 3)"),
    ("image_id_float", "{train}: images[0].id: 1.5 must be int"),
    ("category_twice", "{train}: categories[2].id: category id 2 is given twice"),
    ("no_categories", "{train}: categories: empty (no classes to learn)"),
]


@pytest.mark.parametrize("on_invalid", ["error", "skip"])
@pytest.mark.parametrize("text, line", [(t, ln) for _, t, ln in UNUSABLE], ids=[u[0] for u in UNUSABLE])
def test_an_unusable_file_is_refused_under_either_policy(tmp_path, on_invalid, text, line):
    root, names = _dataset(tmp_path, lambda root, coco: None)
    _write(Path(names["train"]), text)
    if line is None:  # the parser's own words, with the place
        try:
            json.loads(text)
        except json.JSONDecodeError as e:
            line = f"{{train}}: not valid JSON (line {e.lineno}, column {e.colno}): {e.msg}"
    with pytest.raises(SweepError) as err:
        run.prepare_data(_trials(root, tmp_path, on_invalid=on_invalid))
    assert str(err.value) == line.format(**names)


@pytest.mark.parametrize("what, line", UNUSABLE_FIELDS, ids=[u[0] for u in UNUSABLE_FIELDS])
def test_an_unusable_field_names_the_file_the_field_and_the_id(tmp_path, what, line):
    root, names = _dataset(tmp_path, lambda root, coco: _unusable_field(coco["train"], what))
    with pytest.raises(SweepError) as err:
        run.prepare_data(_trials(root, tmp_path, on_invalid="skip"))
    assert str(err.value) == line.format(**names)


def test_the_cli_refuses_before_ray_with_exit_status_2(tmp_path):
    """`python -m detsweep.run` itself: one `error:` line, status 2, and ray never imported."""
    import subprocess
    import sys

    root, names = _dataset(tmp_path, _set("train", "annotations", 0, bbox=[1.0, 1.0, 0.0, 5.0]))
    sweep = tmp_path / "t.yaml"
    sweep.write_text(json.dumps({"name": "t", "data": {"kind": "coco", "root": str(root)},
                                 "storage": str(tmp_path / "out")}))
    code = ("import sys; from detsweep import run; rc = run.main([sys.argv[1]]); "
            "print('ray' in sys.modules, rc)")
    done = subprocess.run([sys.executable, "-c", code, str(sweep)], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[2])
    assert done.stdout.split() == ["False", "2"], done.stderr
    assert done.stderr.splitlines()[-1] == (
        f"error: {names['train']}: annotations[].bbox: 1 boxes with zero or negative width or height, e.g. "
        f"annotation 100 (image 1) bbox [1.0, 1.0, 0.0, 5.0]{SKIP_TAIL}")


def test_all_images_skipped_is_unusable(tmp_path):
    def unreadable(root, coco):
        for name, *_ in [("d.png",), ("e.png",)]:
            (root / "images" / "val2017" / name).write_bytes(b"x")
    root, names = _dataset(tmp_path, unreadable)
    with pytest.raises(SweepError) as err:
        run.prepare_data(_trials(root, tmp_path, on_invalid="skip"))
    assert str(err.value) == f"{names['val']}: images: no usable image left once the problems above are skipped"


def test_truncated_image_passes_the_header_check_and_fails_the_doctor(tmp_path):
    root, names = _dataset(tmp_path, lambda root, coco: None)
    path = root / "images" / "train2017" / "a.png"
    write_image(path, 40, 30)
    path.write_bytes(path.read_bytes()[:200])  # the header survives, the pixels do not
    run.prepare_data(_trials(root, tmp_path))  # a run reads headers only
    from detsweep.data.doctor import diagnose
    from detsweep.data.sources import resolve

    report = diagnose(resolve(root), progress=False)
    finding = report.checks["train"].findings["image_unreadable"]
    assert finding.examples[0].startswith(f"image 1 {path} (OSError: ") and report.exit_code == 1


def test_image_headers_are_read_once_per_node(tmp_path, monkeypatch):
    """The driver reads them (afresh), and the workers on its machine reuse its results."""
    from detsweep.data import prepare as prepare_module

    root, _ = _dataset(tmp_path, lambda root, coco: None)
    calls, real = [], prepare_module.probe_images
    monkeypatch.setattr(prepare_module, "probe_images", lambda sc, **kw: calls.append(sc.split.name) or real(sc, **kw))
    run.prepare_data(_trials(root, tmp_path))
    for _ in range(2):  # two trials' workers
        build_dataset_splits(kind="coco", root=root, train_images=0, val_images=0, image_size=0, classes=None)
    assert calls == ["train", "val"]


def test_images_the_driver_cannot_see_are_left_to_the_nodes(tmp_path, caplog):
    """A cluster's head holds only the annotations: the annotation checks run, the image checks wait."""
    root, names = _dataset(tmp_path, lambda root, coco: None)
    data = {"train": {"annotations": names["train"], "images": str(tmp_path / "on-the-workers" / "train")},
            "val": {"annotations": names["val"], "images": str(tmp_path / "on-the-workers" / "val")}}
    caplog.set_level(logging.INFO, logger="detsweep.data")
    run.prepare_data(_trials(root, tmp_path, **data))
    assert (f"data train (explicit splits (coco2017) (format: auto)): 3 images, 4 boxes; images not on this machine "
            f"({tmp_path}/on-the-workers/train): each node checks them once") in [r.getMessage() for r in caplog.records]

"""Data sources: each export layout found (and `format: auto` saying which), each quirk of
Roboflow, CVAT and Label Studio handled, explicit splits, EXIF rotation both ways, and the sweep
file's data keys refused with one line."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
from PIL import Image

from detsweep.data.coco import build_dataset_splits
from detsweep.data.sources import SourceError, candidates, resolve, root_layout
from detsweep.sweep import SweepError, parse_sweep

from tests.data.builders import VAL, coco2017, cvat, dump, good_split, labelstudio, roboflow


def _build(**kw):
    return build_dataset_splits(kind="coco", train_images=0, val_images=0, image_size=0, classes=None, **kw)


LAYOUTS = [
    # (builder, the layout auto detects, the annotation files of train and val relative to the root)
    (coco2017, "coco2017", ("annotations/instances_train2017.json", "annotations/instances_val2017.json")),
    (roboflow, "roboflow", ("train/_annotations.coco.json", "valid/_annotations.coco.json")),
    (cvat, "cvat", ("annotations/instances_Train.json", "annotations/instances_Validation.json")),
    (labelstudio, "labelstudio", ("train/result.json", "val/result.json")),
]


@pytest.mark.parametrize("make, fmt, files", LAYOUTS, ids=[x[1] for x in LAYOUTS])
def test_auto_recognises_each_layout_and_the_splits_build(tmp_path, caplog, make, fmt, files):
    make(tmp_path)
    source = resolve(tmp_path)
    assert (source.format, source.detected) == (fmt, True)
    assert [source.splits[s].annotations for s in ("train", "val")] == [tmp_path / f for f in files]
    assert resolve(tmp_path, fmt).format == fmt and not resolve(tmp_path, fmt).detected
    caplog.set_level(logging.INFO, logger="detsweep.data")
    splits = _build(root=tmp_path)
    assert (len(splits.train), len(splits.val)) == (3, 2) and splits.skipped == {"n_skipped_images": 0,
                                                                                 "n_skipped_boxes": 0}
    # every box is there: the file_names were found whatever their prefix or separator
    assert [len(splits.train[i][1]["boxes"]) for i in range(3)] == [2, 1, 1]
    assert f"data train ({fmt} layout at {tmp_path} (format: auto)): 3 images, 4 boxes; image headers checked" in \
        [r.getMessage() for r in caplog.records]


def test_roboflow_root_category_is_dropped_with_a_log_line(tmp_path, caplog):
    roboflow(tmp_path, test=True)
    caplog.set_level(logging.INFO, logger="detsweep.data")
    splits = _build(root=tmp_path)
    assert splits.label_map.category_ids == (1, 2) and splits.label_map.names == ("cat", "dog")
    assert (f"{tmp_path}/train/_annotations.coco.json: Roboflow root categories dropped (the dataset's name, "
            f"supercategory 'none', no annotations): category 0 'pets-xyz'") in [r.getMessage() for r in caplog.records]
    gt = splits.val_ann.read_text()
    assert '"name": "pets-xyz"' not in gt  # COCOeval scores the dataset's own classes only
    assert resolve(tmp_path).splits["test"].annotations == tmp_path / "test" / "_annotations.coco.json"


def test_roboflow_category_0_is_kept_when_boxes_use_it(tmp_path):
    coco = roboflow(tmp_path)
    coco["train"]["annotations"][0]["category_id"] = 0
    dump(coco["train"], tmp_path / "train" / "_annotations.coco.json")
    assert _build(root=tmp_path, on_invalid="skip").label_map.category_ids == (0, 1, 2)


def test_labelstudio_zero_based_ids_map_through_the_label_map(tmp_path):
    labelstudio(tmp_path)
    splits = _build(root=tmp_path)
    assert splits.label_map.category_ids == (0, 1) and splits.label_map.names == ("cat", "dog")
    assert splits.train[0][1]["labels"].tolist() == [0, 1]


def test_cvat_prefixes_and_backslashes_resolve_under_the_image_folder(tmp_path):
    coco = cvat(tmp_path)
    assert coco["Train"]["images"][0]["file_name"] == "frames\\a.png"
    assert resolve(tmp_path).splits["train"].images == tmp_path / "images" / "Train"
    assert _build(root=tmp_path).train.image_ids == [1, 2, 3]


def test_candidates_drop_leading_folders_and_read_backslashes():
    assert candidates("images\\Train\\a.png") == ["images/Train/a.png", "Train/a.png", "a.png"]
    assert candidates("./x/../a.png") == ["a.png"]


SOURCE_ERRORS = [
    ("cvat_default_only", lambda r: cvat(r, subsets=("default", "other")), "auto",
     "{root!r} (cvat) has the subsets ['default', 'other'] and none named Train or Validation: name the subsets so "
     "in CVAT, or give data.train and data.val"),
    ("labelstudio_one_export", lambda r: dump(good_split(r / "images", prefix="images/"), r / "result.json"), "auto",
     "{root!r} (labelstudio) is one export, one split: unzip one export per split into train/ and val/ under the "
     "root, or give data.train and data.val"),
    ("roboflow_without_valid", lambda r: (roboflow(r), (r / "valid" / "_annotations.coco.json").unlink()), "auto",
     "{root!r} (roboflow) has no val split: expected train/_annotations.coco.json and valid/_annotations.coco.json"),
    ("coco_format_needs_splits", coco2017, "coco",
     "'coco' (plain COCO files) needs data.train and data.val, not data.root; a root takes one of ['auto', "
     "'coco2017', 'roboflow', 'cvat', 'labelstudio']"),
]


@pytest.mark.parametrize("make, fmt, message", [x[1:] for x in SOURCE_ERRORS], ids=[x[0] for x in SOURCE_ERRORS])
def test_a_layout_that_cannot_be_used_says_why(tmp_path, make, fmt, message):
    make(tmp_path)
    with pytest.raises(SourceError) as err:
        root_layout(str(tmp_path), fmt)
    assert str(err.value) == message.format(root=str(tmp_path))


def test_explicit_splits_of_any_coco_files(tmp_path):
    train = dump(good_split(tmp_path / "pics" / "tr"), tmp_path / "labels" / "train.json")
    val = dump(good_split(tmp_path / "pics" / "va", VAL, 10), tmp_path / "labels" / "val.json")
    sweep = parse_sweep({"name": "s", "data": {"kind": "coco", "train": {"annotations": str(train),
                                                                         "images": str(tmp_path / "pics" / "tr")},
                                               "val": {"annotations": str(val), "images": str(tmp_path / "pics" / "va")}}})
    d = sweep.data
    splits = _build(root=d.root, format=d.format, train=d.train, val=d.val)
    assert (len(splits.train), len(splits.val)) == (3, 2)
    assert resolve(d.root, d.format, d.train, d.val).describe() == "explicit splits (coco) (format: auto)"


def test_explicit_roboflow_file_without_images_uses_its_folder(tmp_path):
    roboflow(tmp_path)
    sweep = parse_sweep({"name": "s", "data": {"kind": "coco", "train": {"annotations": f"{tmp_path}/train/_annotations.coco.json"},
                                               "val": {"annotations": f"{tmp_path}/valid/_annotations.coco.json"}}})
    source = resolve(sweep.data.root, "auto", sweep.data.train, sweep.data.val)
    assert source.format == "roboflow" and source.splits["val"].images == tmp_path / "valid"


SWEEP_ERRORS = [
    ({"kind": "synthetic", "format": "roboflow"}, "f.yaml: data.format: 'roboflow' needs data.kind 'coco'"),
    ({"kind": "synthetic", "train": {"annotations": "x.json"}},
     "f.yaml: data.train: needs data.kind 'coco' (the synthetic data makes its own splits)"),
    ({"kind": "coco", "train": {"annotations": "x.json"}},
     "f.yaml: data.val: missing: data.train and data.val go together, each {annotations: FILE, images: DIR}"),
    ({"kind": "coco", "train": {"annotations": "/nope/t.json"}, "val": {"annotations": "/nope/v.json"}},
     "f.yaml: data.train.annotations: '/nope/t.json' is not a file"),
    ({"kind": "coco", "format": "yolo"},
     "f.yaml: data.format: 'yolo' is not one of ['auto', 'coco2017', 'roboflow', 'cvat', 'labelstudio', 'coco']"),
    ({"kind": "coco", "on_invalid": "drop"}, "f.yaml: data.on_invalid: 'drop' is not one of ['error', 'skip']"),
    ({"kind": "coco", "train": {"images": "x"}}, "f.yaml: data.train.annotations: required key is missing"),
]


@pytest.mark.parametrize("data, line", SWEEP_ERRORS, ids=[line.split(": ")[1] for _, line in SWEEP_ERRORS])
def test_data_keys_are_refused_with_one_line(data, line):
    with pytest.raises(SweepError) as err:
        parse_sweep({"name": "s", "data": data}, "f.yaml")
    assert str(err.value) == line


# ---- EXIF --------------------------------------------------------------------------------------

def _exif_dataset(tmp_path: Path, orientation: int, json_size: tuple[int, int]) -> Path:
    """One 40x30 JPEG stored with an EXIF orientation, its JSON size as given, one box per split."""
    root = tmp_path / "rf"
    for folder in ("train", "valid"):
        exif = Image.Exif()
        exif[0x0112] = orientation
        (root / folder).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (40, 30), (200, 10, 10)).save(root / folder / "p.jpg", exif=exif)
        coco = {"images": [{"id": 1, "file_name": "p.jpg", "width": json_size[0], "height": json_size[1]}],
                "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1.0, 1.0, 20.0, 25.0],
                                 "iscrowd": 0}], "categories": [{"id": 1, "name": "thing"}]}
        dump(coco, root / folder / "_annotations.coco.json")
    return root


EXIF = [
    # (orientation, JSON (w, h), finding, image tensor (H, W) the dataset loads)
    (6, (30, 40), "exif_rotated", (40, 30)),  # annotated on the turned image: turned when loaded
    (6, (40, 30), "exif_stored", (30, 40)),  # annotated on the stored pixels: left as stored
    (8, (30, 40), "exif_rotated", (40, 30)),
    (3, (40, 30), "exif_ambiguous", (30, 40)),  # a half turn keeps the size: stored pixels, with a warning
]


@pytest.mark.parametrize("orientation, json_size, kind, hw", EXIF, ids=[f"{o}-{k}" for o, _, k, _ in EXIF])
def test_exif_rotation_applied_only_when_the_json_size_is_the_rotated_one(tmp_path, orientation, json_size, kind, hw):
    root = _exif_dataset(tmp_path, orientation, json_size)
    from detsweep.data.doctor import diagnose

    report = diagnose(resolve(root), progress=False)
    assert list(report.checks["train"].findings) == [kind] and report.exit_code == 0
    image, target = _build(root=root).val[0]
    assert tuple(image.shape[1:]) == hw and target["boxes"].tolist() == [[1.0, 1.0, 21.0, 26.0]]


def test_exif_turned_image_whose_json_size_fits_neither_is_a_size_mismatch(tmp_path):
    root = _exif_dataset(tmp_path, 6, (50, 50))
    with pytest.raises(Exception) as err:
        _build(root=root)
    assert str(err.value).startswith(f"{root}/train/_annotations.coco.json: images[].width/height: 1 images whose "
                                     f"file size is not the JSON's, e.g. image 1 {root}/train/p.jpg (JSON 50x50, "
                                     f"file 40x30, EXIF orientation 6)")

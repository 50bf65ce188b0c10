"""Class subsets, dataset statistics, and the `python -m detsweep.data` command line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from detsweep.data.__main__ import main
from detsweep.data.coco import build_datasets
from detsweep.data.stats import dataset_stats, format_stats
from detsweep.data.subset import write_subset

CATEGORIES = [{"id": 1, "name": "person"}, {"id": 3, "name": "car"}, {"id": 17, "name": "cat"},
              {"id": 18, "name": "dog"}]


def _ann(ann_id, image_id, category_id, bbox, iscrowd=0, area=None):
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "bbox": bbox, "iscrowd": iscrowd,
            "area": bbox[2] * bbox[3] if area is None else area}


def _split(image_ids, anns) -> dict:
    images = [{"id": i, "file_name": f"{i}.png", "width": 200, "height": 160} for i in image_ids]
    return {"images": images, "annotations": anns, "categories": CATEGORIES}


@pytest.fixture()
def coco_root(tmp_path) -> Path:
    """train: 1 person+car, 2 dog, 3 car only, 4 crowd person only. val: 10 dog, 11 car, 12 nothing."""
    root = tmp_path / "coco"
    train = _split([1, 2, 3, 4], [_ann(1, 1, 1, [0, 0, 10, 10]), _ann(2, 1, 3, [20, 20, 5, 5]),
                                  _ann(3, 2, 18, [5, 5, 40, 40]), _ann(4, 2, 18, [50, 10, 8, 8]),
                                  _ann(5, 3, 3, [1, 1, 2, 2]), _ann(6, 4, 1, [0, 0, 50, 50], iscrowd=1)])
    val = _split([10, 11, 12], [_ann(7, 10, 18, [0, 0, 30, 30]), _ann(8, 11, 3, [0, 0, 30, 30])])
    for split, coco in (("train2017", train), ("val2017", val)):
        (root / "images" / split).mkdir(parents=True)
        for im in coco["images"]:  # a COCO root holds the images its annotations list
            Image.new("RGB", (im["width"], im["height"])).save(root / "images" / split / im["file_name"])
        (root / "annotations").mkdir(exist_ok=True)
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(coco))
    return root


def _read(path: Path) -> dict:
    return json.loads(path.read_text())


# ---- subset -------------------------------------------------------------------------------------

def test_subset_keeps_ids_drops_empty_train_images_keeps_all_val(coco_root, tmp_path):
    out = tmp_path / "subset"
    counts = write_subset(coco_root, ["dog", "person"], out)
    assert counts == {"dog": 3, "person": 1}  # crowd person not counted
    train = _read(out / "annotations" / "instances_train2017.json")
    assert train["categories"] == [{"id": 1, "name": "person"}, {"id": 18, "name": "dog"}]
    assert [im["id"] for im in train["images"]] == [1, 2]  # 3: car only; 4: crowd only
    assert [a["id"] for a in train["annotations"]] == [1, 3, 4]
    val = _read(out / "annotations" / "instances_val2017.json")
    assert [im["id"] for im in val["images"]] == [10, 11, 12]  # all: false positives still count
    assert [a["id"] for a in val["annotations"]] == [7]
    for split in ("train2017", "val2017"):
        link = out / "images" / split
        assert link.is_symlink() and link.resolve() == (coco_root / "images" / split).resolve()


def test_subset_output_is_a_coco_root(coco_root, tmp_path):
    write_subset(coco_root, ["dog", "person"], tmp_path / "subset")
    write_subset(coco_root, ["dog", "person"], tmp_path / "subset")  # re-run: links already right
    _, _, label_map, _ = build_datasets(kind="coco", root=tmp_path / "subset", train_images=0, val_images=0,
                                        image_size=800, classes=None)
    assert label_map.category_ids == (1, 18) and label_map.names == ("person", "dog")


def test_subset_single_file_and_override(coco_root, tmp_path):
    ann = coco_root / "annotations" / "instances_train2017.json"
    counts = write_subset(ann, ["car"], tmp_path / "one", keep_all_images=True)
    assert counts == {"car": 2}
    written = _read(tmp_path / "one" / "annotations" / "instances_train2017.json")
    assert len(written["images"]) == 4 and [a["id"] for a in written["annotations"]] == [2, 5]


def test_subset_unknown_class_lists_valid_names(coco_root, tmp_path):
    with pytest.raises(ValueError) as err:
        write_subset(coco_root, ["dog", "horse"], tmp_path / "x")
    assert str(err.value) == "unknown class 'horse'; available: ['car', 'cat', 'dog', 'person']"


def test_subset_missing_source(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such COCO root or annotation file: .*nope"):
        write_subset(tmp_path / "nope", ["dog"], tmp_path / "x")


# ---- stats --------------------------------------------------------------------------------------

@pytest.fixture()
def messy_file(tmp_path) -> Path:
    anns = [
        _ann(1, 1, 1, [0, 0, 10, 10]),  # small, side 10
        _ann(2, 1, 1, [0, 0, 40, 40]),  # medium, side 40
        _ann(3, 1, 18, [0, 0, 120, 100]),  # large, side ~110
        _ann(4, 2, 3, [10, 10, 0, 5]),  # degenerate
        _ann(5, 2, 3, [190, 10, 20, 20]),  # past the right border
        _ann(5, 2, 3, [5, 5, 3, 3]),  # duplicate id 5
        _ann(7, 99, 1, [1, 1, 4, 4]),  # image 99 does not exist
        _ann(8, 1, 42, [1, 1, 4, 4]),  # category 42 does not exist
        _ann(9, 3, 1, [0, 0, 60, 60], iscrowd=1),  # crowd: image 3 still has no boxes
        _ann(10, 1, 1, [0, 0, 50, 50], area=900),  # COCO sizes use `area` (small), not the box
    ]
    path = tmp_path / "messy.json"
    path.write_text(json.dumps(_split([1, 2, 3], anns)))
    return path


def test_stats_counts_sizes_and_problems(messy_file):
    s = dataset_stats(messy_file)
    assert (s["images"], s["annotations"], s["crowd"], s["categories"]) == (3, 10, 1, 4)
    assert s["boxes_per_class"] == {"person": 4, "car": 3, "cat": 0, "dog": 1, "<unknown id 42>": 1}
    assert s["size_buckets"] == {"small": 7, "medium": 1, "large": 1}
    hist = {lo: n for lo, _, n in s["side_histogram"]}
    assert (hist[0], hist[2], hist[4], hist[8], hist[16], hist[32], hist[64]) == (1, 1, 2, 1, 1, 2, 1)
    assert sum(hist.values()) == 9 and s["side_histogram"][-1] == (1024, None, 0)
    assert s["images_without_boxes"] == 1
    assert (s["degenerate_boxes"], s["boxes_outside_image"], s["unknown_category_annotations"],
            s["orphan_annotations"], s["duplicate_annotation_ids"]) == (1, 1, 1, 1, 1)


def test_format_stats_reports_problems(messy_file):
    text = format_stats(dataset_stats(messy_file))
    assert "images 3  annotations 10 (crowd 1)  categories 4  images without boxes 1" in text
    assert "COCO sizes (by area): small 7  medium 1  large 1" in text
    assert "checks: PROBLEMS FOUND" in text and "duplicate annotation ids: 1" in text
    assert "[1024, inf)" not in text  # empty histogram tails are hidden


# ---- CLI ----------------------------------------------------------------------------------------

def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "detsweep.data", *args], capture_output=True, text=True,
                          timeout=120)


def test_cli_stats_runs_as_module(coco_root):
    done = _cli("stats", str(coco_root))
    assert done.returncode == 0, done.stderr
    assert "instances_train2017.json" in done.stdout and "instances_val2017.json" in done.stdout
    assert "checks: all ok" in done.stdout


def test_cli_stats_missing_file(tmp_path, capsys):
    assert main(["stats", str(tmp_path / "missing.json")]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == (
        f"python -m detsweep.data stats: error: {tmp_path / 'missing.json'}: annotation file not found\n")


@pytest.mark.parametrize("command", ["check", "coco2017", "subset", "stats", "synthetic"])
def test_cli_help_per_subcommand(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: python -m detsweep.data {command}")


def test_cli_subset_prints_counts(coco_root, tmp_path, capsys):
    assert main(["subset", "--root", str(coco_root), "--classes", "person", "dog", "--out", str(tmp_path / "s")]) == 0
    out = capsys.readouterr().out
    assert "person        1" in out and "dog           3" in out


def test_cli_user_errors_exit_2_with_one_line(coco_root, tmp_path, capsys):
    assert main(["subset", "--root", str(coco_root), "--classes", "horse", "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert err == ("python -m detsweep.data subset: error: unknown class 'horse'; "
                   "available: ['car', 'cat', 'dog', 'person']\n")
    with pytest.raises(SystemExit) as exit_:
        main(["coco2017"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == (
        "python -m detsweep.data coco2017: error: the following arguments are required: --root (see --help)\n")


def test_cli_synthetic_prints_folder(tmp_path, capsys):
    assert main(["synthetic", "--root", str(tmp_path), "--train-images", "2", "--val-images", "1",
                 "--image-size", "48"]) == 0
    folder = Path(capsys.readouterr().out.strip())
    assert folder == tmp_path / "synth-v1-s48-t2-v1-c5-seed0"
    assert (folder / "annotations" / "instances_val.json").is_file()

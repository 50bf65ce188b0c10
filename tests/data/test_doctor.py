"""`python -m detsweep.data check`: the report, its exit status (0 clean, 1 problems, 2 unusable), the
JSON report, the sample grids, and every way of naming the dataset (a sweep file, a root, files)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

from detsweep.data.__main__ import main

from tests.data.builders import coco2017, dump, roboflow

REPO = Path(__file__).resolve().parents[2]


def test_clean_roboflow_root_reports_and_exits_0(tmp_path, capsys):
    roboflow(tmp_path, test=True)
    assert main(["check", "--root", str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"dataset: roboflow layout at {tmp_path} (format: auto)"
    assert out[1] == (f"  train  {tmp_path}/train/_annotations.coco.json  images {tmp_path}/train  "
                      f"(image check: decode)")
    table = out[out.index("split  images  boxes  crowd  no objects  classes  problems  warnings"):][:4]
    assert table[1:] == ["train       3      4      0           0        2         0         0",
                         "val         2      3      0           0        2         0         0",
                         "test        2      3      0           0        2         0         0"]
    assert "  class  id  train  val  test" in out and "  cat     1      2    1     1" in out
    assert out[-1] == "result: clean: 0 kinds of problem, 0 kinds of warning (exit 0)"


def test_problems_exit_1_and_the_json_report_lists_them(tmp_path, capsys):
    coco = coco2017(tmp_path)
    coco["train"]["annotations"][0]["bbox"] = [1.0, 1.0, -2.0, 3.0]
    coco["train"]["annotations"][1]["iscrowd"] = 1
    coco["val"]["annotations"] = [a for a in coco["val"]["annotations"] if a["category_id"] == 1]
    for split in ("train", "val"):
        dump(coco[split], tmp_path / "annotations" / f"instances_{split}2017.json")
    report_file = tmp_path / "report.json"
    assert main(["check", "--root", str(tmp_path), "--json", str(report_file)]) == 1
    out = capsys.readouterr().out
    assert ("problems (data.on_invalid: error refuses the run; skip drops them):\n  train  annotations[].bbox: 1 boxes "
            "with zero or negative width or height, e.g. annotation 100 (image 1) bbox [1.0, 1.0, -2.0, 3.0]") in out
    assert "  train  categories: 1 classes with train instances and none in val, e.g. 'dog' (1 boxes)" in out
    report = json.loads(report_file.read_text())
    assert (report["status"], report["exit_code"], report["error"]) == ("problems", 1, None)
    assert report["splits"]["train"]["crowd"] == 1 and report["splits"]["train"]["image_check"] == "decode"
    kinds = {f["kind"]: f for f in report["splits"]["train"]["findings"]}
    assert set(kinds) == {"box_empty", "class_without_val"}
    assert kinds["box_empty"]["on_invalid_skip_drops"] == "box" and kinds["box_empty"]["count"] == 1
    assert report["classes"] == [{"id": 1, "name": "cat", "train": 2, "val": 1, "test": None},
                                 {"id": 2, "name": "dog", "train": 1, "val": 0, "test": None}]  # crowd not counted


def test_unusable_exits_2_with_the_line_and_a_json_status(tmp_path, capsys):
    coco2017(tmp_path)
    (tmp_path / "annotations" / "instances_val2017.json").write_text('{"images": [')
    assert main(["check", "--root", str(tmp_path), "--json", str(tmp_path / "r.json")]) == 2
    out = capsys.readouterr().out.splitlines()
    assert out[-3:-1] == [(f"unusable: {tmp_path}/annotations/instances_val2017.json: not valid JSON (line 1, column 13): "
                       f"Expecting value"), "result: unusable (exit 2)"]
    assert json.loads((tmp_path / "r.json").read_text())["status"] == "unusable"


def test_a_root_without_a_known_layout_is_one_line_and_exit_2(tmp_path, capsys):
    assert main(["check", "--root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"python -m detsweep.data check: error: --root: {str(tmp_path)!r} holds no dataset layout")
    assert len(err.splitlines()) == 1


def test_samples_draw_a_png_grid_per_split(tmp_path, capsys):
    roboflow(tmp_path / "rf")
    assert main(["check", "--root", str(tmp_path / "rf"), "--samples", "2", "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    for split in ("train", "val"):
        png = tmp_path / "out" / f"samples_{split}.png"
        assert f"samples: {png}" in out
        with Image.open(png) as im:
            assert im.format == "PNG" and im.size == (2 * 260, 260)  # 2 tiles of 256 px + borders


def test_explicit_files_and_headers_only(tmp_path, capsys):
    coco2017(tmp_path)
    ann = tmp_path / "annotations"
    assert main(["check", "--train-ann", str(ann / "instances_train2017.json"), "--train-images",
                 str(tmp_path / "images" / "train2017"), "--val-ann", str(ann / "instances_val2017.json"),
                 "--headers-only"]) == 0
    out = capsys.readouterr().out
    # the val image folder is guessed: images/<subset> next to annotations/ (val2017 is not a folder: images/)
    assert out.splitlines()[0] == "dataset: explicit splits (coco2017) (format: auto)"
    assert "(image check: header)" in out


def test_a_sweep_file_names_the_dataset(tmp_path):
    roboflow(tmp_path / "rf")
    sweep = tmp_path / "s.yaml"
    sweep.write_text(yaml.safe_dump({"name": "s", "data": {"kind": "coco", "root": str(tmp_path / "rf"),
                                                           "format": "roboflow"}}))
    done = subprocess.run([sys.executable, "-m", "detsweep.data", "check", str(sweep)], capture_output=True,
                          text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == f"dataset: roboflow layout at {tmp_path / 'rf'}"


@pytest.mark.parametrize("args, line", [
    ([], "python -m detsweep.data check: error: give a sweep file, --root DIR, or --train-ann FILE --val-ann FILE"),
    (["--train-ann", "t.json"], "python -m detsweep.data check: error: --val: missing: data.train and data.val are "
                                "given together (each {annotations: FILE, images: DIR})"),
])
def test_missing_arguments_are_one_line(args, line, capsys):
    assert main(["check", *args]) == 2
    assert capsys.readouterr().err.splitlines() == [line]

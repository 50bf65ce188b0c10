"""Bring your own dataset, end to end on a real local Ray: a Roboflow-layout export (root category 0,
`valid/` as val) with one box outside its image under `data.on_invalid: skip` runs to `ok`, and
results.parquet counts the skipped box. One DDP worker, a tiny DETR, one epoch."""
from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
import yaml

from detsweep import run

from tests.data.builders import dump, good_split

pytestmark = pytest.mark.ray

ROBOFLOW_CATEGORIES = [{"id": 0, "name": "shapes-abc", "supercategory": "none"},
                       {"id": 1, "name": "square", "supercategory": "shapes-abc"},
                       {"id": 2, "name": "disc", "supercategory": "shapes-abc"}]


def _items(n: int, start: int) -> list:
    return [(f"img{start + k}.jpg", 64, 48, [(1 + k % 2, [4.0 + k, 6.0, 20.0, 16.0])]) for k in range(n)]


def test_a_roboflow_export_runs_to_ok_with_a_skipped_box(ray_cluster, tmp_path):
    root = tmp_path / "roboflow"
    for k, (folder, n) in enumerate((("train", 6), ("valid", 3))):
        coco = good_split(root / folder, _items(n, 10 * k), 10 * k + 1, ROBOFLOW_CATEGORIES)
        if folder == "train":  # one box wholly outside its 64x48 image: skipped and counted
            coco["annotations"].append({"id": 999, "image_id": 1, "category_id": 1, "bbox": [70.0, 5.0, 4.0, 4.0],
                                        "iscrowd": 0})
        dump(coco, root / folder / "_annotations.coco.json")
    sweep = {
        "name": "byod",
        "data": {"kind": "coco", "root": str(root), "on_invalid": "skip"},
        "model": {"detr": {"backbone": "resnet18", "num_queries": 4, "hidden_dim": 32, "nheads": 2, "enc_layers": 1,
                           "dec_layers": 1, "dim_feedforward": 32, "dropout": 0.0}},
        "train": {"epochs": 1, "batch_size_per_worker": 2},
        "eval": {"visuals": False},
        "resources": {"ddp_workers": 1, "cpus_per_worker": 1, "gpus_per_worker": 0},
        "grid": {"model": ["detr_r50"], "regime": ["full"]},
        "storage": str(tmp_path / "results"),
    }
    path = tmp_path / "byod.yaml"
    path.write_text(yaml.safe_dump(sweep))

    assert run.main([str(path)]) == 0

    (row,) = pq.read_table(tmp_path / "results" / "byod" / "results.parquet").to_pylist()
    assert row["status"] == "ok", row["error"]
    assert (row["n_skipped_images"], row["n_skipped_boxes"]) == (0, 1)
    assert sorted(json.loads(row["per_class_ap"])) == ["1", "2"]  # Roboflow's root category 0 is not a class

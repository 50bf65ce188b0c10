"""End to end on a real local Ray: TorchTrainer with 2 DDP workers (gloo), real COCOeval, a real
Parquet file. One sweep with a full and a LoRA DETR trial plus a Faster R-CNN trial whose checkpoint
file is corrupt, so it fails while the others go on (partial runs for real in the resume test)."""
from __future__ import annotations

import glob
import json
from pathlib import Path

import pyarrow.parquet as pq
import yaml

from detsweep import run


def tiny_sweep(tmp: Path, synthetic_root: Path, **overrides) -> dict:
    sweep = {
        "name": "e2e",
        "data": {"kind": "synthetic", "root": str(synthetic_root), "train_images": 8, "val_images": 4,
                 "image_size": 64, "num_classes": 3},
        "model": {
            "detr": {"backbone": "resnet18", "num_queries": 8, "hidden_dim": 32, "nheads": 2, "enc_layers": 1,
                     "dec_layers": 1, "dim_feedforward": 64, "dropout": 0.0},
            "faster_rcnn": {"backbone": "resnet18", "min_size": 64, "max_size": 64},
        },
        "lora": {"rank": 4, "placement": "attention_ffn"},
        "train": {"epochs": 2, "batch_size_per_worker": 2},
        # One DDP worker: the tests that put DDP itself under test ask for two.
        "resources": {"ddp_workers": 1, "cpus_per_worker": 1, "gpus_per_worker": 0},
        "grid": {"model": ["detr_r50"], "regime": ["full"]},
        "storage": str(tmp / "results"),
    }
    for key, value in overrides.items():
        sweep[key] = value
    return sweep


def write_sweep(tmp: Path, sweep: dict) -> Path:
    path = tmp / f"{sweep['name']}.yaml"
    path.write_text(yaml.safe_dump(sweep))
    return path


def test_sweep_end_to_end(ray_cluster, tmp_path, synthetic_root):
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"this is not a torch checkpoint")
    sweep = tiny_sweep(tmp_path, synthetic_root)
    # 5 val images on 2 ranks: the distributed sampler pads rank 1 with a repeat of image 0, which
    # the gathered predictions must score once.
    sweep["data"]["val_images"] = 5
    # DDP under test: padding, gathering, dedup. Half a CPU per worker: all 3 trials at once on the 4-CPU
    # test cluster (one round of trial start-ups instead of two).
    sweep["resources"].update(ddp_workers=2, cpus_per_worker=0.5)
    sweep["model"]["faster_rcnn"]["weights"] = str(corrupt)
    sweep["fault_tolerance"] = {"keep": 1}
    sweep["grid"] = {"model": ["detr_r50", "fasterrcnn_r50_fpn"], "regime": ["full", "lora_only"]}
    path = write_sweep(tmp_path, sweep)

    assert run.main([str(path), "--max-concurrent", "3"]) == 0

    root = tmp_path / "results" / "e2e"
    # The trial list the run started with, for --resume to check the sweep file against.
    saved = json.loads((root / "trials.json").read_text())
    assert saved["max_concurrent_trials"] == 3 and len(saved["trials"]) == 3
    table = pq.read_table(root / "results.parquet")
    rows = {r["trial_id"]: r for r in table.to_pylist()}
    assert set(rows) == {"detr_r18-full", "detr_r18-lora_only-r4-attention_ffn", "fasterrcnn_r18_fpn-full"}
    failed = rows.pop("fasterrcnn_r18_fpn-full")
    assert failed["status"] == "error"
    assert "corrupt.pth" in failed["error"] or "checkpoint" in failed["error"].lower(), failed["error"]
    for tid, r in rows.items():
        assert r["status"] == "ok", (tid, r["error"])
        assert r["error"] is None
        for k in ("ap", "ap50", "ap75", "ar100"):
            assert 0.0 <= r[k] <= 1.0, (tid, k, r[k])
        assert r["epochs_completed"] == 2 and r["ddp_workers"] == 2
        assert r["train_s"] > 0 and r["eval_s"] > 0 and r["wall_s"] > r["train_s"]
        assert r["train_images_per_s"] > 0 and r["peak_rss_mb"] > 0
        assert r["peak_vram_train_mb"] is None and r["device"] == "cpu"
        assert r["n_detections"] == 5 * 8  # every query of every val image, no threshold, no duplicates
        # Every column is filled in, except the ones that are null by definition here.
        # (COCOeval's medium/large stats are -1 -> null: 64 px images hold only small objects.)
        null_ok = {"error", "peak_vram_train_mb", "peak_vram_eval_mb", "peak_vram_reserved_mb", "gpu_name", "gpu_uuid",
                   "ap_medium", "ap_large", "ar_medium", "ar_large",
                   "best_ap_medium", "best_ap_large", "best_ar_medium", "best_ar_large",
                   # no prices in this sweep, no LoRA target patterns, no two_stage, few confident detections
                   "cost_usd", "lora_targets", "trainable_params_stage1", "trainable_params_stage2", "dece"} | (
            set() if r["regime"] == "lora_only" else {"lora_rank", "lora_placement", "lora_alpha"})
        assert [k for k, v in r.items() if v is None and k not in null_ok] == [], tid
        assert r["gpu_hours"] == 0.0 and r["trainable_frac"] == r["trainable_params"] / r["total_params"]
        assert set(json.loads(r["per_class_ap"])) == {"3", "7", "12"}  # the gappy COCO category ids
        assert r["hostname"] and r["git_sha"] and len(r["git_sha"]) == 40
        assert r["torch_version"].startswith("2.14.1") and r["ray_version"] == "2.60.0"
        assert r["started_at"] < r["finished_at"]
    full, lora = rows["detr_r18-full"], rows["detr_r18-lora_only-r4-attention_ffn"]
    assert lora["total_params"] == full["total_params"] + lora["lora_params"]
    assert lora["trainable_params"] < full["trainable_params"]
    assert lora["lora_rank"] == 4 and full["lora_rank"] is None
    assert table.schema.field("lora_rank").type == "int32"

    # The frontier runs on the sweep's own output: ranks the two ok trials, lists the failed one.
    from detsweep import frontier

    assert frontier.main([str(root / "results.parquet")]) == 0
    front = {r["trial_id"]: r for r in pq.read_table(root / "frontier.parquet").to_pylist()}
    assert set(front) == set(rows) | {"fasterrcnn_r18_fpn-full"}
    assert front["fasterrcnn_r18_fpn-full"]["pareto_rank"] is None
    assert min(front[t]["pareto_rank"] for t in rows) == 1
    report = (root / "report.md").read_text()
    assert "fasterrcnn_r18_fpn-full" in report and "detr_r18-lora_only-r4-attention_ffn" in report
    assert sorted(p.name for p in root.glob("*.png"))

    history = pq.read_table(root / "history.parquet").to_pylist()
    epochs = sorted((h["trial_id"], h["epoch"]) for h in history)
    assert epochs == sorted((tid, e) for tid in rows for e in (0, 1))

    # Each ok trial's last checkpoint holds the COCO results JSON, re-evaluable offline; with
    # keep: 1, epoch 0's checkpoint is gone.
    ckpt = Path(full["checkpoint_path"])
    assert [p for p in ckpt.parent.glob("checkpoint_*") if p.is_dir()] == [ckpt]
    assert json.loads((ckpt / "meta.json").read_text())["epoch"] == 1
    dets = json.loads((ckpt / "detections.json").read_text())
    assert len(dets) == 40 and {"image_id", "category_id", "bbox", "score"} <= set(dets[0])
    assert len({d["image_id"] for d in dets}) == 5
    # Last epoch's pictures: loss curves, reliability diagram, the first val images drawn.
    for name in ["loss_curves.png", "reliability.png"] + [f"predictions/pred_{i:03d}.png" for i in range(5)]:
        assert (ckpt / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    # The LoRA checkpoint holds adapters and heads only: far smaller than the full one.
    lora_ckpt = Path(lora["checkpoint_path"]) / "model.pt"
    full_ckpt = Path(full["checkpoint_path"]) / "model.pt"
    assert lora_ckpt.stat().st_size < full_ckpt.stat().st_size / 5
    # Tune writes TensorBoard event files per trial: loss components, lr and eval metrics each epoch.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = glob.glob(str(root / "tune" / "detr_r18-full" / "events.out.tfevents.*"))
    acc = EventAccumulator(events)
    acc.Reload()
    for tag in ("loss", "loss_ce", "loss_bbox", "loss_giou", "lr", "ap", "ece"):
        assert [e.step for e in acc.Scalars(f"ray/tune/{tag}")] == [1, 2], tag  # epochs completed

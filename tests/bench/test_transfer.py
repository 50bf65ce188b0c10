"""bench/transfer.py's table: per config, mean ± the 95 % Student-t half-width over the seeds, AP at half
the epochs from history.parquet, AP as a share of the same model's full fine-tuning, failures listed."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "transfer.py"


def _module():
    spec = importlib.util.spec_from_file_location("bench_transfer", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _row(tid, regime, seed, ap, status="ok", **kw):
    return {"trial_id": tid, "model": "fasterrcnn_r50_fpn", "regime": regime, "lora_placement": kw.get("placement"),
            "lora_rank": kw.get("rank"), "seed": seed, "status": status, "error": kw.get("error"), "ap": ap,
            "ap50": None if ap is None else ap * 2, "trainable_params": kw.get("params", 1000), "peak_vram_train_mb": None,
            "peak_rss_mb": 500.0, "train_images_per_s": 10.0, "wall_s": 60.0}


def test_table_means_intervals_plateau_and_share_of_full(tmp_path):
    rows = [_row(f"full-s{s}", "full", s, ap) for s, ap in enumerate((0.1, 0.2, 0.3))]
    rows += [_row(f"lora-s{s}", "lora_only", s, ap, placement="box_head", rank=4, params=20)
             for s, ap in enumerate((0.1, 0.1))]
    rows.append(_row("lora-s2", "lora_only", 2, None, status="error", placement="box_head", rank=4,
                     error="boom"))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "results.parquet")
    # Epoch 2 of 4 (0-based 1) is "half"; epoch 0 must not be read as it.
    history = [{"trial_id": r["trial_id"], "epoch": e, "ap": 0.05 + e} for r in rows for e in (0, 1)]
    pq.write_table(pa.Table.from_pylist(history), tmp_path / "history.parquet")

    body, failed = _module().table(tmp_path / "results.parquet", epochs=4)
    lines = body.splitlines()
    assert lines[0].startswith("| config | seeds | AP | AP50 | AP at epoch 2 | AP / full |")
    # mean 0.2, sd 0.1, t(0.975, 2) = 4.303: half-width 4.303 * 0.1 / sqrt(3) = 0.248
    assert lines[2] == ("| fasterrcnn_r50_fpn full | 3 | 0.200 ± 0.248 | 0.400 ± 0.497 | 1.050 ± 0.000 | 100% | "
                        "1,000 | 500 | 10.0 | 60 |")
    assert lines[3].startswith("| fasterrcnn_r50_fpn lora_only r4 box_head | 2 | 0.100 ± 0.000 | 0.200 ± 0.000 | "
                               "1.050 ± 0.000 | 50% | 20 |")
    assert failed == ["lora-s2: error (boom)"]
    assert lines[-1] == ("- fasterrcnn_r50_fpn, best LoRA (fasterrcnn_r50_fpn lora_only r4 box_head): 50% of full's "
                         "AP, with 2.0% of full's trainable parameters.")


def test_sweep_file_replicates_the_demo_or_the_sweep_given(tmp_path):
    """The demo keeps its results folder (`transfer-bench`, the recorded section's); another file gets its own,
    with the seeds as a grid axis and the epochs given, the rest of the file as it is."""
    import argparse

    import yaml

    m = _module()
    long_demo = m.ROOT / "sweeps" / "demo_long.yaml"
    assert m.bench_name(m.DEMO) == "transfer-bench" and m.bench_name(long_demo) == "transfer-bench-demo_long"
    args = argparse.Namespace(sweep=long_demo, epochs=5, seeds="0,2", storage=str(tmp_path / "out"))
    written = yaml.safe_load(m.sweep_file(args, tmp_path).read_text())
    original = yaml.safe_load(long_demo.read_text())
    assert written["name"] == "transfer-bench-demo_long" and written["storage"] == str(tmp_path / "out")
    assert written["train"] == {**original["train"], "epochs": 5}
    assert written["grid"] == {**original["grid"], "train.seed": [0, 2]}
    assert written["model"] == original["model"]  # the base named by weights: base:demo_detr_long, unchanged

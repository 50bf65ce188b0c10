"""`weights: base:NAME` on a real local Ray: the base is pretrained first, as a trial through the same
Tune function, Train worker and engine, then the sweep's trial fine-tunes from its checkpoint with a
fresh class head; a second run (even with --fresh) reuses the cached base."""
from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from detsweep import run
from tests.ray.test_e2e import tiny_sweep, write_sweep

pytestmark = pytest.mark.ray


def test_a_base_is_pretrained_once_then_fine_tuned_and_reused(ray_cluster, tmp_path, synthetic_root, capfd, caplog):
    sweep = tiny_sweep(tmp_path, synthetic_root, name="transfer")
    sweep["data"].update({"domain": "target", "train_images": 4, "val_images": 2})
    sweep["model"]["detr"]["weights"] = "base:src"
    sweep["bases"] = {"src": {"data": {"kind": "synthetic", "root": str(synthetic_root), "domain": "source",
                                       "train_images": 4, "val_images": 2, "image_size": 64, "num_classes": 3},
                              "train": {"epochs": 1, "batch_size_per_worker": 2},
                              "resources": {"ddp_workers": 1, "cpus_per_worker": 1}}}
    sweep["train"] = {"epochs": 1, "batch_size_per_worker": 2}
    sweep["resources"] = {"ddp_workers": 1, "cpus_per_worker": 1, "gpus_per_worker": 0}
    sweep["eval"] = {"visuals": False}
    path = write_sweep(tmp_path, sweep)
    assert run.main([str(path), "-q"]) == 0
    first = capfd.readouterr()
    assert "pretrained first, into" in first.out and "base-src-" in first.out

    (base_dir,) = (tmp_path / "results" / "_bases").iterdir()
    base_rows = pq.read_table(base_dir / "results.parquet").to_pylist()
    assert [r["status"] for r in base_rows] == ["ok"] and base_rows[0]["regime"] == "full"
    (row,) = pq.read_table(tmp_path / "results" / "transfer" / "results.parquet").to_pylist()
    assert row["status"] == "ok", row["error"]
    assert row["data"].endswith(":target")  # fine-tuned on the target domain, from the source base

    # The next run finds it built (the same check a run makes before it pretrains), and --fresh clears
    # the sweep's folder, not the bases.
    assert run.main([str(path), "--dry-run"]) == 0
    assert f"cached in {base_dir}" in capfd.readouterr().out
    from detsweep.cluster.bases import build_bases
    from detsweep.sweep import expand, load_sweep
    from detsweep.sweep.bases import base_trials
    from detsweep.sweep.grid import root_of

    loaded = load_sweep(path)
    trials = expand(loaded)
    bases = base_trials(trials, loaded, root_of(trials[0].storage))
    with caplog.at_level("INFO", logger="detsweep.cluster.bases"):
        build_bases(bases, quiet=True)  # nothing to train: a log line, no Tune run
    assert any("cached in" in m and "reused" in m for m in caplog.messages)

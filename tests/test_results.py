"""Results schema, atomic Parquet writes, the results/history store and provenance."""
import datetime as dt
import os
import subprocess
import sys

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

import detsweep
from detsweep import provenance as provenance_mod
from detsweep import checkpoint, results, storage
from detsweep.provenance import provenance
from detsweep.results import RESULTS_SCHEMA, ResultsStore, infer_extra_columns, results_schema, rows_to_table
from detsweep.storage import write_parquet_atomic

UTC = dt.timezone.utc


def _row(trial_id: str, **kw) -> dict:
    row = {"sweep": "smoke", "trial_id": trial_id, "status": "ok", "model": "detr_r50", "regime": "full",
           "lora_rank": None, "epochs": 2, "lr": 1e-4, "seed": 0, "ap": 0.25, "ece": 0.1,
           "trainable_params": 41_000_000, "started_at": dt.datetime(2024, 5, 1, 12, 0, tzinfo=UTC)}
    row.update(kw)
    return row


def test_schema_order_and_types():
    assert RESULTS_SCHEMA.names == [
        "sweep", "trial_id", "status", "error",
        "model", "regime", "regime_detail", "lora_rank", "lora_placement", "lora_alpha", "lora_targets", "backbone", "num_queries",
        "dec_layers", "epochs", "lr", "seed", "ddp_workers", "gpus_per_worker", "data",
        "ap", "ap50", "ap75", "ap_small", "ap_medium", "ap_large",
        "ar1", "ar10", "ar100", "ar_small", "ar_medium", "ar_large",
        "best_epoch", "best_ap", "best_ap50", "best_ap75", "best_ap_small", "best_ap_medium", "best_ap_large",
        "best_ar1", "best_ar10", "best_ar100", "best_ar_small", "best_ar_medium", "best_ar_large", "best_ece",
        "best_val_loss", "val_loss",
        "ece", "nll", "brier", "n_detections", "dece",
        "err_cls", "err_loc", "err_dup", "err_bkg", "err_missed",
        "total_params", "trainable_params", "trainable_frac", "lora_params", "trainable_params_stage1",
        "trainable_params_stage2",
        "peak_vram_train_mb", "peak_vram_eval_mb", "peak_vram_reserved_mb", "peak_rss_mb", "train_images_per_s", "eval_images_per_s",
        "train_s", "eval_s", "wall_s", "worker_s", "gpu_hours", "cost_usd", "device", "amp_dtype",
        "epochs_completed", "checkpoint_path", "per_class_ap", "reliability", "n_skipped_images", "n_skipped_boxes",
        "detsweep_version", "git_sha", "torch_version", "ray_version", "hostname", "gpu_name", "gpu_uuid",
        "started_at", "finished_at",
    ]
    assert RESULTS_SCHEMA.field("lora_rank").type == pa.int32()
    assert RESULTS_SCHEMA.field("seed").type == pa.int64()
    assert RESULTS_SCHEMA.field("n_detections").type == pa.int64()
    assert RESULTS_SCHEMA.field("err_missed").type == pa.int64()
    assert RESULTS_SCHEMA.field("gpu_hours").type == pa.float64()
    assert RESULTS_SCHEMA.field("finished_at").type == pa.timestamp("us", tz="UTC")


def test_extra_columns_inferred_and_appended():
    extra = infer_extra_columns({"train.weight_decay": [1e-4, 0], "lora.rank": [4, 8], "train.amp": [True, False],
                                 "train.batch_size_per_worker": [2, 4], "data.kind": ["coco", None]})
    assert extra == {"train_weight_decay": pa.float64(), "train_amp": pa.bool_(),
                     "train_batch_size_per_worker": pa.int64(), "data_kind": pa.string()}
    schema = results_schema(extra)
    assert schema.names[-4:] == list(extra)
    with pytest.raises(ValueError, match="extra column 'ap' clashes"):
        results_schema({"ap": pa.float64()})


def test_rows_to_table_coerces_and_nulls():
    table = rows_to_table([
        _row("a", lora_rank=np.int64(8), ap=np.float32(0.5), trainable_params=np.int64(3), epochs=2.0,
             finished_at="2024-05-01T13:00:00+00:00", per_class_ap={"cat": 0.5}, n_detections=float("nan")),
        {"trial_id": "b", "status": "error", "error": ValueError("loss is nan")},
    ])
    assert table.schema == RESULTS_SCHEMA
    d = table.to_pylist()
    assert d[0]["lora_rank"] == 8 and d[0]["epochs"] == 2 and d[0]["ap"] == pytest.approx(0.5)
    assert d[0]["finished_at"] == dt.datetime(2024, 5, 1, 13, tzinfo=UTC)
    assert d[0]["per_class_ap"] == '{"cat": 0.5}'
    assert d[0]["n_detections"] is None
    assert d[1]["error"] == "loss is nan" and d[1]["ap"] is None and d[1]["lora_rank"] is None


def test_rows_to_table_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"unknown result keys \['bogus', 'train.wd'\]"):
        rows_to_table([_row("a", bogus=1, **{"train.wd": 0.1})])
    with pytest.raises(ValueError, match=r"status 'done' is not one of \['ok', 'error', 'stopped', 'running'\]"):
        rows_to_table([_row("a", status="done")])
    with pytest.raises(ValueError, match=r"column 'epochs': cannot convert 2.5 \(float\) to int32"):
        rows_to_table([_row("a", epochs=2.5)])
    with pytest.raises(ValueError, match=r"column 'ap': cannot convert 'high' \(str\) to double"):
        rows_to_table([_row("a", ap="high")])
    with pytest.raises(ValueError, match="column 'started_at': 'yesterday' is not an ISO-8601 timestamp"):
        rows_to_table([_row("a", started_at="yesterday")])


def test_round_trip_pyarrow_pandas_duckdb(tmp_path):
    extra = {"train_weight_decay": pa.float64()}
    table = rows_to_table([_row("a", lora_rank=4, train_weight_decay=0.1), _row("b", train_weight_decay=None)], extra)
    path = tmp_path / "results.parquet"
    write_parquet_atomic(table, str(path))

    back = pq.read_table(path)
    assert back.equals(table) and back.schema.field("lora_rank").type == pa.int32()

    df = pd.read_parquet(path, dtype_backend="numpy_nullable")
    assert str(df["lora_rank"].dtype) == "Int32"  # a null int stays an int, not float NaN
    assert df["lora_rank"].tolist()[0] == 4 and df["lora_rank"].isna().tolist() == [False, True]
    assert df["started_at"].dt.tz is not None

    rows = duckdb.sql(f"select trial_id, lora_rank, typeof(lora_rank), train_weight_decay "
                      f"from '{path}' order by trial_id").fetchall()
    assert rows == [("a", 4, "INTEGER", 0.1), ("b", None, "INTEGER", None)]


def _garbage_then_raise(table, where, **kwargs):
    where.write(b"PAR1 half a file")
    raise OSError("disk full")


def test_crash_mid_write_leaves_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "results.parquet"
    old = rows_to_table([_row("a")])
    write_parquet_atomic(old, str(path))
    before = path.read_bytes()

    monkeypatch.setattr(pq, "write_table", _garbage_then_raise)
    with pytest.raises(OSError, match="disk full"):
        write_parquet_atomic(rows_to_table([_row("a"), _row("b")]), str(path))
    monkeypatch.undo()

    assert path.read_bytes() == before
    assert pq.read_table(path).equals(old)
    assert sorted(os.listdir(tmp_path)) == ["results.parquet"]  # no tmp litter


def test_write_through_pyarrow_filesystem_uri(tmp_path, monkeypatch):
    uri = f"file://{tmp_path}/sub/results.parquet"
    table = rows_to_table([_row("a")])
    write_parquet_atomic(table, uri)
    assert pq.read_table(tmp_path / "sub" / "results.parquet").equals(table)

    monkeypatch.setattr(pq, "write_table", _garbage_then_raise)
    with pytest.raises(OSError, match="disk full"):
        write_parquet_atomic(rows_to_table([_row("b")]), uri)
    assert os.listdir(tmp_path / "sub") == ["results.parquet"]


def test_upsert_trial_replaces_in_place(tmp_path):
    store = ResultsStore(str(tmp_path / "smoke"))
    assert store.read_results() is None and store.trial_ids() == set()
    store.upsert_trial(_row("a", status="running", ap=None))
    store.upsert_trial(_row("b", status="error", error="CUDA OOM"))
    store.upsert_trial(_row("a", status="ok", ap=0.4))
    table = store.read_results()
    assert table.column("trial_id").to_pylist() == ["a", "b"]
    assert table.column("ap").to_pylist() == [0.4, 0.25]
    assert table.column("status").to_pylist() == ["ok", "error"]
    assert store.results_uri == str(tmp_path / "smoke" / "results.parquet")
    assert store.trial_ids() == {"a", "b"}
    assert store.trial_ids("ok") == {"a"} and store.trial_ids("error") == {"b"}
    with pytest.raises(ValueError, match=r"status 'failed' is not one of"):
        store.trial_ids("failed")


def test_upsert_trial_with_extra_columns_keeps_them(tmp_path):
    store = ResultsStore(f"file://{tmp_path}/sweep")
    extra = {"train_weight_decay": pa.float64()}
    store.upsert_trial(_row("a", train_weight_decay=0.1), extra)
    store.upsert_trial(_row("b"))  # the column already in the file is kept without repeating extra_columns
    table = store.read_results()
    assert table.column("train_weight_decay").to_pylist() == [0.1, None]
    with pytest.raises(ValueError, match="extra column 'train_weight_decay' is double"):
        store.upsert_trial(_row("c"), {"train_weight_decay": pa.string()})


def test_history_dedup_keeps_latest(tmp_path):
    store = ResultsStore(str(tmp_path))
    t0 = dt.datetime(2024, 5, 1, tzinfo=UTC)
    store.upsert_history([
        {"sweep": "s", "trial_id": "a", "epoch": 0, "loss": 2.0, "reported_at": t0},
        {"sweep": "s", "trial_id": "a", "epoch": 1, "loss": 1.5, "checkpoint_path": "/x"},
        {"sweep": "s", "trial_id": "b", "epoch": 0, "loss": 3.0, "ap": 0.1},
    ])
    # after a resume, epoch 1 of trial a is reported again
    store.upsert_history([{"sweep": "s", "trial_id": "a", "epoch": 1, "loss": 1.2, "ap": np.float64(0.3)}])
    hist = store.read_history()
    assert hist.schema.field("epoch").type == pa.int32()
    assert hist.schema.field("reported_at").type == pa.timestamp("us", tz="UTC")
    assert "checkpoint_path" not in hist.column_names
    rows = [(r["trial_id"], r["epoch"], r["loss"], r["ap"]) for r in hist.to_pylist()]
    assert rows == [("a", 0, 2.0, None), ("a", 1, 1.2, 0.3), ("b", 0, 3.0, 0.1)]
    assert hist.column("reported_at").to_pylist()[0] == t0
    with pytest.raises(ValueError, match="a history row needs 'trial_id' and 'epoch'"):
        store.upsert_history([{"trial_id": "a", "loss": 1.0}])


def test_provenance_fields():
    prov = provenance()
    assert set(prov) == {"detsweep_version", "git_sha", "torch_version", "ray_version", "hostname"}
    assert prov["detsweep_version"] == detsweep.__version__
    assert prov["git_sha"] is None or len(prov["git_sha"]) == 40
    assert prov["hostname"]
    rows_to_table([_row("a", **prov)])  # fits the schema


def test_provenance_does_not_import_torch_or_ray():
    code = ("import sys; from detsweep.provenance import provenance; p = provenance(); "
            "assert p['torch_version']; assert 'torch' not in sys.modules and 'ray' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_git_sha_none_outside_a_repo(monkeypatch, tmp_path):
    fake = tmp_path / "detsweep"
    fake.mkdir()
    monkeypatch.setattr(detsweep, "__file__", str(fake / "__init__.py"))
    provenance_mod._git_sha.cache_clear()
    try:
        assert provenance_mod._git_sha() is None
    finally:
        provenance_mod._git_sha.cache_clear()


@pytest.mark.parametrize("scheme", ["", "file://"])
def test_exists_and_delete_dir_for_paths_and_uris(tmp_path, scheme):
    from detsweep.storage import delete_dir, exists

    folder = tmp_path / "sweep"
    (folder / "tune").mkdir(parents=True)
    assert exists(f"{scheme}{folder}/tune") and not exists(f"{scheme}{folder}/nope")
    delete_dir(f"{scheme}{folder}")
    assert not folder.exists() and not exists(f"{scheme}{folder}")


def test_summarize_exit_status_and_table(tmp_path, capsys):
    from detsweep.run import summarize

    root = tmp_path / "smoke"
    assert summarize(str(root)) == 1
    assert capsys.readouterr().err.strip() == f"no results were written under {root}"

    store = ResultsStore(str(root))
    store.upsert_trial(_row("a", status="error", ap=None, error="RuntimeError: boom"))
    store.upsert_trial(_row("b", status="stopped", ap=0.125))
    assert summarize(str(root)) == 1  # no trial ok: the command failed
    out = capsys.readouterr().out
    assert "error    ap=-       a  RuntimeError: boom" in out
    assert "stopped  ap=0.1250  b" in out
    assert "0 of 2 trials ok" in out

    store.upsert_trial(_row("c", ap=0.5))
    assert summarize(str(root)) == 0
    out = capsys.readouterr().out
    assert "1 of 3 trials ok" in out
    assert f"next: python -m detsweep.frontier {root / 'results.parquet'}" in out


def test_gpu_hours():
    assert results.gpu_hours(7200, 0.5) == 1.0
    assert results.gpu_hours(1800, 4) == 2.0
    with pytest.raises(ValueError, match="got wall_s=-1, gpus_held=1"):
        results.gpu_hours(-1, 1)


def test_latest_checkpoint_is_the_one_of_the_latest_epoch(tmp_path):
    import json

    run = tmp_path / "train-t1"
    assert checkpoint.latest_checkpoint(str(run)) is None  # no run folder yet
    # A restart on a node whose clock is behind names epoch 2's folder before epoch 1's.
    for name, epoch in (("checkpoint_2026-11-23_05-54-14.770964", 0), ("checkpoint_2026-11-23_05-54-57.790161", 1),
                        ("checkpoint_2026-11-23_05-50-00.000000", 2)):
        (run / name).mkdir(parents=True)
        (run / name / "meta.json").write_text(json.dumps({"epoch": epoch, "saved_at": 1.0e9 + epoch}))
    (run / "checkpoint_2026-11-23_06-00-00.000000").mkdir()  # an upload cut short: no meta.json
    (run / "checkpoint_manager_snapshot.json").write_text("{}")  # a file, not a checkpoint
    assert checkpoint.latest_checkpoint(str(run)) == f"{run}/checkpoint_2026-11-23_05-50-00.000000"
    assert checkpoint.latest_checkpoint(f"file://{run}") == f"file://{run}/checkpoint_2026-11-23_05-50-00.000000"


def test_history_drops_orphaned_epochs_of_a_crashed_attempt(tmp_path):
    store = ResultsStore(str(tmp_path))
    # Attempt 1 reports epochs 0-3 but crashes before epoch 3's checkpoint persists; the restart
    # resumes from epoch 1's checkpoint and reports epoch 2 again: epoch 3 is an orphan.
    store.upsert_history([{"sweep": "s", "trial_id": "a", "epoch": e, "ap": 0.1 * e} for e in range(4)])
    store.upsert_history([{"sweep": "s", "trial_id": "b", "epoch": 0, "ap": 0.5}])
    store.upsert_history([{"sweep": "s", "trial_id": "a", "epoch": 2, "ap": 0.25, "resumed_from_epoch": 1}])
    rows = store.read_history().select(["trial_id", "epoch", "ap"]).to_pylist()
    assert [(r["trial_id"], r["epoch"], r["ap"]) for r in rows] == [
        ("a", 0, 0.0), ("a", 1, 0.1), ("a", 2, 0.25), ("b", 0, 0.5)]
    store.upsert_history([{"sweep": "s", "trial_id": "a", "epoch": 3, "ap": 0.35}])
    assert store.read_history().column("epoch").to_pylist() == [0, 1, 2, 3, 0]


@pytest.mark.parametrize("uri", [False, True])
def test_write_bytes_atomic_keeps_the_old_file_on_failure(tmp_path, monkeypatch, uri):
    target = tmp_path / "report.md"
    dest = f"file://{target}" if uri else str(target)
    storage.write_bytes_atomic(b"old", dest)
    assert target.read_bytes() == b"old"

    class FailingMoveFileSystem(pafs.LocalFileSystem):
        def move(self, src, dest):
            raise OSError("disk full")

    def crash(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", crash)  # local path: temp file + os.replace
    monkeypatch.setattr(storage, "filesystem", lambda u: (FailingMoveFileSystem(), u.removeprefix("file://")))
    with pytest.raises(OSError, match="disk full"):
        storage.write_bytes_atomic(b"new", dest)
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["report.md"]

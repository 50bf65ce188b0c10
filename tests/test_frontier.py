"""The `python -m detsweep.frontier` command: files written, report contents, one-line errors."""
import json
import subprocess
import sys

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from detsweep import frontier
from detsweep.results import rows_to_table, write_parquet_atomic


def _run(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "detsweep.frontier", *map(str, args)],
                          capture_output=True, text=True, timeout=120, cwd=cwd)


def _trial(trial_id, regime, ap, params, rss, ece, seed=0, lr=1e-4, **kw):
    return {"sweep": "smoke", "trial_id": trial_id, "status": "ok", "model": "detr_r50", "regime": regime,
            "lora_rank": 8 if regime == "lora_only" else None, "seed": seed, "lr": lr, "ap": ap,
            "trainable_params": params, "peak_rss_mb": rss, "ece": ece, **kw}


@pytest.fixture
def results_file(tmp_path):
    rows = [
        _trial("full-a", "full", 0.40, 41_000_000, 3000.0, 0.10),
        _trial("lora-a", "lora_only", 0.30, 200_000, 1500.0, 0.12),
        _trial("part-a", "partial", 0.35, 15_000_000, 2000.0, 0.08),
        _trial("full-b", "full", 0.25, 41_000_000, 3100.0, 0.15, lr=1e-3),  # dominated by all three above
        _trial("nan-ap", "lora_only", float("nan"), 200_000, 1500.0, 0.12, lr=1e-3),
        {"sweep": "smoke", "trial_id": "oom", "status": "error", "regime": "full", "error": "CUDA out of memory"},
        {"sweep": "smoke", "trial_id": "asha", "status": "stopped", "regime": "partial", "ap": 0.1},
    ]
    path = tmp_path / "smoke" / "results.parquet"
    write_parquet_atomic(rows_to_table(rows), str(path))
    return path


def test_cli_writes_frontier_report_and_plots(results_file):
    proc = _run(results_file)
    assert proc.returncode == 0, proc.stderr
    out_dir = results_file.parent
    for name in ("frontier.parquet", "report.md", "frontier_ap_vs_trainable_params.png",
                 "frontier_ap_vs_peak_rss_mb.png", "frontier_ap_vs_ece.png"):
        assert (out_dir / name).stat().st_size > 0, name
    assert (out_dir / "frontier_ap_vs_trainable_params.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (out_dir / "replicates.parquet").exists()  # every config has one seed

    table = pq.read_table(out_dir / "frontier.parquet")
    ranks = dict(zip(table.column("trial_id").to_pylist(), table.column("pareto_rank").to_pylist()))
    assert ranks == {"full-a": 1, "lora-a": 1, "part-a": 1, "full-b": 2, "nan-ap": None, "oom": None, "asha": None}
    dominated = dict(zip(table.column("trial_id").to_pylist(), table.column("dominated_by").to_pylist()))
    assert dominated["full-b"] == ["full-a", "lora-a", "part-a"] and dominated["full-a"] == [] and dominated["oom"] is None
    assert table.schema.field("lora_rank").type == pa.int32()

    meta = json.loads(table.schema.metadata[frontier.METADATA_KEY])
    assert meta["objectives"] == ["ap:max", "trainable_params:min", "peak_rss_mb:min", "ece:min"]
    assert meta["reference_point"] == [1.1, 1.1, 1.1, 1.1]
    assert meta["hypervolume"] > 0
    front_sql = duckdb.sql(f"select trial_id from '{out_dir / 'frontier.parquet'}' "
                           f"where pareto_rank = 1 order by ap desc").fetchall()
    assert front_sql == [("full-a",), ("part-a",), ("lora-a",)]

    assert "peak_vram_train_mb is null in every row (no CUDA): peak_rss_mb stands in for it" in proc.stdout
    assert "Pareto front (3 trials):" in proc.stdout
    assert "excluded oom (error): CUDA out of memory" in proc.stdout
    assert "excluded nan-ap (ok): missing ap" in proc.stdout
    assert "excluded asha (stopped)" in proc.stdout

    report = (out_dir / "report.md").read_text()
    assert report.startswith("# Pareto front: smoke\n")
    assert "> **Note:** peak_vram_train_mb is null in every row (no CUDA): peak_rss_mb stands in for it." in report
    assert "| full-a | full | 0.4 | 41,000,000 | 3000 | 0.1 |" in report
    assert "![frontier_ap_vs_ece.png](frontier_ap_vs_ece.png)" in report
    assert f"hypervolume of the front: {meta['hypervolume']:.6g}" in report
    assert "| trainable_params:min | log10(trainable_params) / log10(4.1e+07) | 1.1 |" in report
    assert "| oom | error | CUDA out of memory |" in report
    assert "| lora_only | lora-a | 0.3 | 1 |" in report  # best per regime by ap


def test_cli_replicates_and_out_dir(tmp_path):
    rows = [_trial(f"lora-s{s}", "lora_only", ap, 200_000, 1500.0 + s, 0.1, seed=s) for s, ap in enumerate([0.3, 0.34])]
    rows += [_trial(f"full-s{s}", "full", ap, 41_000_000, 3000.0 + s, 0.1, seed=s) for s, ap in enumerate([0.2, 0.5])]
    src = tmp_path / "results.parquet"
    write_parquet_atomic(rows_to_table(rows), str(src))
    out = tmp_path / "report-dir"
    proc = _run(src, "--objectives", "ap:max,trainable_params:min", "--out", out, "--no-plots")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["frontier.parquet", "replicates.parquet", "report.md"]
    rep = pq.read_table(out / "replicates.parquet").to_pylist()
    assert [(r["config_id"], r["n"], r["pareto_rank"]) for r in rep] == [("lora-s0", 2, 1), ("full-s0", 2, 1)]
    assert rep[0]["ap_mean"] == pytest.approx(0.32) and rep[1]["ap_mean"] == pytest.approx(0.35)
    assert "## Seed replicates" in (out / "report.md").read_text()
    assert "![" not in (out / "report.md").read_text()


@pytest.mark.parametrize("args, message", [
    (["--objectives", "ap:up"], "objective 'ap': direction 'up' is not one of ['max', 'min']"),
    (["--objectives", "bogus:min"], "objective column 'bogus' is not a numeric column of the results; "
                                    "numeric columns: ['lora_rank', "),
    (["--objectives", "model:min"], "objective column 'model' is not a numeric column"),
    (["--objectives", "peak_vram_eval_mb:min,peak_rss_mb:min"], "objective column 'peak_vram_eval_mb' is null in every row"),
])
def test_cli_bad_objectives_one_line_exit_2(results_file, args, message, capsys):
    # in-process for speed; the subprocess tests below cover the real exit path
    assert frontier.main([str(results_file), *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("detsweep.frontier: error: ")
    assert message in err
    assert not (results_file.parent / "frontier.parquet").exists()


def test_cli_missing_or_unreadable_file(tmp_path):
    proc = _run(tmp_path / "nope.parquet")
    assert (proc.returncode, proc.stderr) == (2, f"detsweep.frontier: error: results file not found: "
                                                 f"{tmp_path / 'nope.parquet'}\n")
    bad = tmp_path / "bad.parquet"
    bad.write_text("not parquet")
    proc = _run(bad)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert proc.stderr.startswith(f"detsweep.frontier: error: cannot read {bad} as Parquet")


def test_cli_help():
    proc = _run("--help")
    assert proc.returncode == 0
    assert "--objectives" in proc.stdout and "COLUMN:DIRECTION" in proc.stdout and "--no-plots" in proc.stdout


def test_all_failed_sweep_still_reports(tmp_path, capsys):
    rows = [{"sweep": "s", "trial_id": "x", "status": "error", "error": "boom", "ap": None, "ece": 0.1}]
    src = tmp_path / "results.parquet"
    write_parquet_atomic(rows_to_table(rows), str(src))
    assert frontier.main([str(src), "--objectives", "ece:min"]) == 0
    assert "Pareto front (0 trials):" in capsys.readouterr().out
    assert "| x | error | boom |" in (tmp_path / "report.md").read_text()


def test_library_modules_never_import_ray_or_torch():
    code = ("import sys, detsweep.frontier, detsweep.pareto, detsweep.results; "
            "bad = [m for m in ('ray', 'torch') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_rerun_without_replicates_removes_stale_file(tmp_path, capsys):
    src = tmp_path / "results.parquet"
    rows = [_trial(f"s{s}", "full", 0.3 + s / 100, 1000, 10.0, 0.1, seed=s) for s in range(2)]
    write_parquet_atomic(rows_to_table(rows), str(src))
    assert frontier.main([str(src), "--objectives", "ap:max,ece:min", "--no-plots"]) == 0
    assert (tmp_path / "replicates.parquet").exists()
    write_parquet_atomic(rows_to_table(rows[:1]), str(src))
    assert frontier.main([str(src), "--objectives", "ap:max,ece:min", "--no-plots"]) == 0
    assert not (tmp_path / "replicates.parquet").exists()



def test_cli_reads_results_through_a_filesystem_uri(results_file, tmp_path):
    """s3:// and gs:// go through pyarrow.fs; file:// takes the same path on this machine."""
    out = tmp_path / "out"
    proc = _run(f"file://{results_file}", "--out", out, "--no-plots")
    assert proc.returncode == 0, proc.stderr
    front = pq.read_table(out / "frontier.parquet").to_pylist()
    assert {r["trial_id"] for r in front if r["pareto_rank"] == 1} == {"full-a", "lora-a", "part-a"}
    assert (out / "report.md").exists()

"""The `python -m detsweep.frontier` command: files written, report contents, one-line errors."""
import datetime as dt
import io
import json
import math
import os
import subprocess
import sys

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from detsweep import frontier
from detsweep.frontier import pareto
from detsweep.frontier import plots as frontier_plots
from detsweep.frontier import report as frontier_report
from detsweep.frontier.front import _STATUS_REASONS
from detsweep.results import rows_to_table
from detsweep.storage import write_parquet_atomic

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _run(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "detsweep.frontier", *map(str, args)],
                          capture_output=True, text=True, timeout=120, cwd=cwd)


def _trial(trial_id, regime, ap, params, rss, ece, seed=0, lr=1e-4, **kw):
    return {"sweep": "smoke", "trial_id": trial_id, "status": "ok", "model": "detr_r50", "regime": regime,
            "lora_rank": 8 if regime == "lora_only" else None, "seed": seed, "lr": lr, "ap": ap,
            "trainable_params": params, "peak_rss_mb": rss, "ece": ece, **kw}


def _assert_png(path):
    """A non-empty file that decodes as a PNG image with pixels."""
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, path
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "PNG" and image.width > 100 and image.height > 100
        image.verify()


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
    _assert_png(out_dir / "frontier_ap_vs_trainable_params.png")
    assert sorted(os.listdir(out_dir)) == [  # no temporary files left behind
        "frontier.parquet", "frontier_ap_vs_ece.png", "frontier_ap_vs_peak_rss_mb.png",
        "frontier_ap_vs_trainable_params.png", "report.html", "report.md", "results.parquet"]
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

    assert "peak_vram_train_mb is null in every finished trial (no CUDA): peak_rss_mb stands in for it" in proc.stdout
    assert "Pareto front (3 trials):" in proc.stdout
    assert "excluded oom (error): CUDA out of memory" in proc.stdout
    assert "excluded nan-ap (ok): missing ap" in proc.stdout
    assert "excluded asha (stopped): stopped early by the scheduler" in proc.stdout

    report = (out_dir / "report.md").read_text()
    assert report.startswith("# Pareto front: smoke\n")
    assert ("> **Note:** peak_vram_train_mb is null in every finished trial (no CUDA): "
            "peak_rss_mb stands in for it.") in report
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
    assert sorted(p.name for p in out.iterdir()) == ["frontier.parquet", "replicates.parquet", "report.html",
                                                     "report.md"]
    rep = pq.read_table(out / "replicates.parquet").to_pylist()
    assert [(r["config_id"], r["n"], r["pareto_rank"]) for r in rep] == [("lora-s0", 2, 1), ("full-s0", 2, 1)]
    assert rep[0]["ap_mean"] == pytest.approx(0.32) and rep[1]["ap_mean"] == pytest.approx(0.35)
    assert "## Seed replicates" in (out / "report.md").read_text()
    # The console and report.md name each config without its seed, as the plots do.
    printed = proc.stdout[proc.stdout.index("seed replicates"):]
    assert printed.splitlines()[1].split()[0] == "config"
    assert [line.split()[0] for line in printed.splitlines()[2:4]] == ["lora", "full"]
    assert "| lora | 2 | 1 |" in (out / "report.md").read_text()
    assert "![" not in (out / "report.md").read_text()


@pytest.mark.parametrize("args, message", [
    (["--objectives", "ap:up"], "objective 'ap': direction 'up' is not one of ['max', 'min']"),
    (["--objectives", "bogus:min"], "objective column 'bogus' is not a numeric column of the results; "
                                    "numeric columns: ['lora_rank', "),
    (["--objectives", "model:min"], "objective column 'model' is not a numeric column"),
    (["--objectives", "peak_vram_eval_mb:min,peak_rss_mb:min"],
     "objective column 'peak_vram_eval_mb' is null in every finished trial (status ok)"),
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


@pytest.mark.parametrize("statuses, message", [
    (["error", "error", "stopped"], "No trial finished (status ok): nothing to rank."),
    (["running", "running", "running"], "No trial finished (status ok): nothing to rank."),
])
def test_all_failed_sweep_still_reports(tmp_path, capsys, statuses, message):
    """Default objectives; trials that never finished have no metrics at all, yet the report is written."""
    errors = {"error": "CUDA out of memory", "stopped": None, "running": None}
    rows = [{"sweep": "s", "trial_id": f"t{i}", "status": status, "regime": "full", "error": errors[status]}
            for i, status in enumerate(statuses)]
    rows[1]["error"] = None  # an error row without a message
    src = tmp_path / "results.parquet"
    write_parquet_atomic(rows_to_table(rows), str(src))
    assert frontier.main([str(src)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"sweep s: 3 trials, 0 ranked, 3 excluded\nobjectives: {frontier.DEFAULT_OBJECTIVES.replace(',', ', ')}\n"
                          f"{message}\n")
    assert "Pareto front" not in out and "hypervolume" not in out

    assert sorted(os.listdir(tmp_path)) == ["frontier.parquet", "report.html", "report.md", "results.parquet"]  # no PNGs
    table = pq.read_table(tmp_path / "frontier.parquet")
    assert table.column("pareto_rank").to_pylist() == [None, None, None]
    assert table.column("trial_id").to_pylist() == ["t0", "t1", "t2"]
    report = (tmp_path / "report.md").read_text()
    assert f"## Front\n\n{message}\n" in report
    assert "## Hypervolume" not in report and "## Best trial per regime" not in report
    reasons = {"error": "CUDA out of memory", "stopped": "stopped early by the scheduler",
               "running": "unfinished (running)"}
    expected = [f"| t{i} | {st} | {reasons[st] if i != 1 else _STATUS_REASONS[st]} |"
                for i, st in enumerate(statuses)]
    assert report.endswith("## Excluded trials\n\n| trial_id | status | reason |\n|---|---|---|\n"
                           + "\n".join(expected) + "\n")


def test_finished_trials_without_every_objective_still_report(tmp_path, capsys):
    rows = [_trial("a", "full", None, 1000, 10.0, 0.1), _trial("b", "full", 0.3, 1000, 10.0, None, seed=1),
            {"sweep": "smoke", "trial_id": "c", "status": "error", "error": "boom"}]
    src = tmp_path / "results.parquet"
    write_parquet_atomic(rows_to_table(rows), str(src))
    assert frontier.main([str(src), "--objectives", "ap:max,ece:min", "--no-plots"]) == 0
    assert "No finished trial has a value for every objective: nothing to rank.\n" in capsys.readouterr().out
    report = (tmp_path / "report.md").read_text()
    assert "| a | ok | missing ap |\n| b | ok | missing ece |\n| c | error | boom |\n" in report


def test_excluded_reasons_by_status():
    rows = [_trial("ok", "full", 0.3, 1000, 10.0, 0.1),
            _trial("nan", "full", math.nan, 1000, 10.0, None),
            {"trial_id": "asha", "status": "stopped", "ap": 0.1},
            {"trial_id": "live", "status": "running"},
            {"trial_id": "crash", "status": "error"},
            {"trial_id": "oom", "status": "error", "error": "CUDA out of memory"},
            {"trial_id": "noted", "status": "stopped", "error": "stopped by a user"}]
    fr = frontier.compute_frontier(rows_to_table(rows), pareto.parse_objectives("ap:max,ece:min"))
    assert [(e["trial_id"], e["status"], e["reason"]) for e in fr.excluded] == [
        ("nan", "ok", "missing ap, ece"),
        ("asha", "stopped", "stopped early by the scheduler"),
        ("live", "running", "unfinished (running)"),
        ("crash", "error", "no error message"),
        ("oom", "error", "CUDA out of memory"),
        ("noted", "stopped", "stopped by a user"),
    ]


def test_report_sweep_section(tmp_path):
    t0 = dt.datetime(2025, 3, 1, 9, 0, tzinfo=dt.timezone.utc)
    prov = {"data": "synthetic:/data/syn", "epochs": 2, "device": "cuda", "gpu_name": "NVIDIA H100",
            "git_sha": "abc123", "detsweep_version": "0.1.0", "torch_version": "2.5.1", "ray_version": "2.60.0",
            "backbone": "resnet50"}
    rows = [_trial("full-a", "full", 0.4, 41_000_000, 3000.0, 0.1, started_at=t0,
                   finished_at=t0 + dt.timedelta(minutes=30), wall_s=1800.0, gpu_hours=0.5, **prov),
            _trial("lora-a", "lora_only", 0.3, 200_000, 1500.0, 0.1, lr=1e-3, started_at=t0 + dt.timedelta(minutes=5),
                   finished_at=t0 + dt.timedelta(hours=1, seconds=7), wall_s=3607.0, gpu_hours=1.0, **prov),
            {"sweep": "smoke", "trial_id": "rcnn", "status": "error", "model": "fasterrcnn_r50_fpn",
             "regime": "full", "seed": 0, "lr": 1e-4, "error": "boom", "started_at": t0, "wall_s": 20.0, **prov}]
    fr = frontier.compute_frontier(rows_to_table(rows), pareto.parse_objectives("ap:max,trainable_params:min"))
    report = frontier_report.render_markdown(fr, [])
    assert ("## Sweep\n\n"
            "- trials: 3 (2 ok, 1 error)\n"
            "- models: detr_r50, fasterrcnn_r50_fpn; backbones: resnet50\n"
            "- regimes: full, lora_only\n"
            "- grid axes that vary: `lr` (0.0001, 0.001)\n"
            "- data: synthetic:/data/syn\n"
            "- epochs: 2\n"
            "- device: cuda; GPU: NVIDIA H100\n"
            "- git sha: abc123\n"
            "- versions: detsweep 0.1.0; torch 2.5.1; ray 2.60.0\n"
            "- time: 2025-03-01 09:00:00 .. 2025-03-01 10:00:07 UTC\n"
            "- total wall time: 5,427 s (1.51 h); GPU-hours: 1.50\n") in report

    bare = frontier_report.render_markdown(frontier.compute_frontier(
        rows_to_table([_trial("a", "full", 0.4, 1000, 10.0, 0.1)]), pareto.parse_objectives("ap:max,ece:min")), [])
    assert ("- grid axes that vary: none\n- data: -\n- epochs: -\n- device: -; GPU: -\n- git sha: -\n"
            "- versions: detsweep -; torch -; ray -\n- time: - .. - UTC\n"
            "- total wall time: 0 s (0.00 h); GPU-hours: -\n") in bare


def test_one_trial_is_singular(tmp_path, capsys):
    src = tmp_path / "results.parquet"
    write_parquet_atomic(rows_to_table([_trial("only", "full", 0.4, 1000, 10.0, 0.1)]), str(src))
    assert frontier.main([str(src), "--objectives", "ap:max,ece:min", "--no-plots"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("sweep smoke: 1 trial, 1 ranked, 0 excluded\n")
    assert "Pareto front (1 trial):\n" in out
    report = (tmp_path / "report.md").read_text()
    assert "1 trial: 1 ranked, 0 excluded." in report and "## Front (1 of 1 ranked trial)" in report


def test_library_modules_never_import_ray_or_torch():
    code = ("import sys, detsweep.frontier, detsweep.frontier.pareto, detsweep.results; "
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



def test_cli_reads_and_writes_through_a_filesystem_uri(results_file, tmp_path):
    """s3:// and gs:// go through pyarrow.fs; file:// takes the same path on this machine. The default
    output folder is the results file's folder, and a URI --out never becomes a local folder."""
    proc = _run(f"file://{results_file}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    sweep_dir = results_file.parent
    assert f"wrote file://{sweep_dir}/report.md" in proc.stdout
    front = pq.read_table(sweep_dir / "frontier.parquet").to_pylist()
    assert {r["trial_id"] for r in front if r["pareto_rank"] == 1} == {"full-a", "lora-a", "part-a"}
    _assert_png(sweep_dir / "frontier_ap_vs_ece.png")
    assert (sweep_dir / "report.md").read_text().startswith("# Pareto front: smoke\n")

    out = tmp_path / "elsewhere" / "nested"
    proc = _run(f"file://{results_file}", "--out", f"file://{out}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert sorted(os.listdir(out)) == ["frontier.parquet", "frontier_ap_vs_ece.png", "frontier_ap_vs_peak_rss_mb.png",
                                       "frontier_ap_vs_trainable_params.png", "report.html", "report.md"]
    assert not (tmp_path / "file:").exists()


def test_write_outputs_replaces_stale_replicates_through_a_uri(tmp_path):
    rows = [_trial(f"s{s}", "full", 0.3 + s / 100, 1000, 10.0, 0.1, seed=s) for s in range(2)]
    objectives = pareto.parse_objectives("ap:max,ece:min")
    written = frontier.write_outputs(frontier.compute_frontier(rows_to_table(rows), objectives),
                                     f"file://{tmp_path}/out", plots=False)
    assert written == [f"file://{tmp_path}/out/{name}" for name in ("frontier.parquet", "replicates.parquet", "report.md")]
    frontier.write_outputs(frontier.compute_frontier(rows_to_table(rows[:1]), objectives),
                           f"file://{tmp_path}/out", plots=False)
    assert sorted(os.listdir(tmp_path / "out")) == ["frontier.parquet", "report.md"]


def test_replicate_plots_are_written_as_png(tmp_path):
    rows = [_trial(f"lora-s{s}", "lora_only", ap, 200_000, 1500.0 + 40 * s, 0.1 + s / 50, seed=s)
            for s, ap in enumerate([0.02, 0.06, 0.04])]
    rows += [_trial(f"full-s{s}", "full", ap, 41_000_000, 3000.0 + 40 * s, 0.2, seed=s)
             for s, ap in enumerate([0.2, 0.5])]
    src = tmp_path / "results.parquet"
    write_parquet_atomic(rows_to_table(rows), str(src))
    proc = _run(src, "--objectives", "ap:max,trainable_params:min,peak_rss_mb:min")
    assert proc.returncode == 0, proc.stderr
    names = ["frontier_ap_vs_trainable_params.png", "frontier_ap_vs_peak_rss_mb.png"]
    for name in names:
        _assert_png(tmp_path / name)
    assert sorted(os.listdir(tmp_path)) == sorted(names + ["frontier.parquet", "replicates.parquet", "report.html",
                                                           "report.md", "results.parquet"])
    report = (tmp_path / "report.md").read_text()
    assert "## Seed replicates" in report and all(f"![{n}]({n})" in report for n in names)


def test_ci_error_bars_are_clipped_to_the_value_range():
    norms = [pareto.Normalisation("ap", "max", "unit", 0.0, 1.0),
             pareto.Normalisation("peak_rss_mb", "min", "scale", 0.0, 3000.0),
             pareto.Normalisation("delta", "min", "minmax", -5.0, 5.0)]
    means = np.array([[0.04, 100.0, -1.0], [0.5, 2000.0, 0.0]])
    low = np.array([[-0.06, -50.0, -9.0], [math.nan, math.nan, math.nan]])
    high = np.array([[0.14, 250.0, 7.0], [math.nan, math.nan, math.nan]])
    below, above = frontier_plots.ci_error_bars(means, low, high, norms)
    # AP bar stops at 0, memory at 0; the unbounded column keeps its CI; no CI -> no bar.
    np.testing.assert_allclose(below, [[0.04, 100.0, 8.0], [0.0, 0.0, 0.0]])
    np.testing.assert_allclose(above, [[0.10, 150.0, 8.0], [0.0, 0.0, 0.0]])


def test_every_front_point_is_labelled_above_the_label_limit():
    """40 trials on 3 objectives: some front members are not on the 2-D trade-off of a view, yet labelled."""
    rng = np.random.default_rng(0)
    rows = [_trial(f"t{i:02d}", "full", float(rng.uniform(0.1, 0.5)), int(rng.integers(1e5, 4e7)),
                   float(rng.uniform(1000, 3000)), 0.1, lr=float(i)) for i in range(40)]
    fr = frontier.compute_frontier(rows_to_table(rows), pareto.parse_objectives("ap:max,trainable_params:min,peak_rss_mb:min"))
    front = {t for t, r in zip(fr.table.column("trial_id").to_pylist(), fr.ranks) if r == 1}
    assert len(fr.table) > frontier_plots.LABEL_ALL_MAX
    for x in (1, 2):
        labels = {t.get_text() for t in frontier_plots.scatter_figure(fr, x).axes[0].texts}
        assert labels == front
    view = fr.values[np.array(fr.ranks) == 1][:, [0, 1]]
    assert (pareto.pareto_ranks(view, [True, False]) > 1).any()  # the case that used to go unlabelled


def test_the_front_uses_each_trials_best_evaluation_unless_told_final():
    from detsweep.frontier.front import with_epoch

    table = rows_to_table([
        {"sweep": "s", "trial_id": "a", "status": "ok", "ap": 0.30, "best_ap": 0.42, "best_epoch": 3},
        {"sweep": "s", "trial_id": "b", "status": "ok", "ap": 0.35, "best_ap": None},  # from before best_*
    ])
    assert with_epoch(table, "best").column("ap").to_pylist() == [0.42, 0.35]
    assert with_epoch(table, "final").column("ap").to_pylist() == [0.30, 0.35]

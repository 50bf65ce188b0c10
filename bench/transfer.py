"""Benchmark: the demo's transfer task with seed replicates, long enough to see whether AP has plateaued.

Run: .venv/bin/python bench/transfer.py [--sweep sweeps/demo.yaml] [--seeds 0,1,2] [--epochs 8]
[--max-concurrent 2] [--storage DIR] [--no-write]. It runs sweeps/demo.yaml, or the `--sweep` given
(sweeps/demo_long.yaml: the long demo's DETR, whose base takes hours on 2 cores the first time; pass the
`--storage` that holds its cached `_bases/`, `runs` after `make demo-long`): the bases pretrained on the synthetic
source domain, reused when cached; each trial fine-tunes one on the target domain under full, partial and LoRA;
through the real pipeline,
`python -m detsweep.run` on a local Ray, with `train.seed` as one more grid axis and `train.epochs` raised;
then `python -m detsweep.frontier` on its results (frontier.parquet, replicates.parquet, plots, report).
Writes the section "## Transfer benchmark, ... (bench/transfer.py)" of bench/RESULTS.md: per config AP and AP50
as mean and 95 % Student-t interval over the seeds, AP at half the epochs (has it plateaued?), AP as a share of
the same model's full fine-tuning (the literature's reference: LoRA reaches about 95 % of full AP at a few
percent of the trainable parameters on small datasets), trainable parameters, peak memory, images/s and wall;
and copies the AP-vs-trainable-parameters front to docs/transfer_front.png.
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import yaml

from detsweep.frontier.pareto import confidence_interval

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "sweeps" / "demo.yaml"
PLOT = "frontier_ap_vs_trainable_params.png"
CONFIG = ("model", "regime", "lora_placement", "lora_rank")


def bench_name(source: Path) -> str:
    """The benchmark's sweep name (its results folder): `transfer-bench` for the demo, else with the file's stem."""
    return "transfer-bench" if source.resolve() == DEMO else f"transfer-bench-{source.stem}"


def sweep_file(args, folder: Path) -> Path:
    """The sweep file with seed replicates and more epochs, under another name (its own results folder)."""
    sweep = yaml.safe_load(args.sweep.read_text())
    sweep["name"] = bench_name(args.sweep)
    sweep["train"]["epochs"] = args.epochs
    sweep["grid"]["train.seed"] = [int(s) for s in args.seeds.split(",")]
    if args.storage:
        sweep["storage"] = args.storage
    path = folder / "transfer-bench.yaml"
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    return path


def _mean_ci(values: list[float]) -> str:
    """`mean ± half-width` of the frontier's 95 % Student-t interval (`mean` alone for one value)."""
    mean, _, low, high = confidence_interval(values)
    return f"{mean:.3f}" if len(values) < 2 else f"{mean:.3f} ± {(high - low) / 2:.3f}"


def _label(r: dict) -> str:
    lora = f" r{r['lora_rank']} {r['lora_placement']}" if r["regime"] == "lora_only" else ""
    return f"{r['model']} {r['regime']}{lora}"


def table(results: Path, epochs: int) -> tuple[str, list[str]]:
    """The markdown table of `results.parquet` (and its history), one row per config; and the failures."""
    rows = pq.read_table(results).to_pylist()
    history = pq.read_table(results.with_name("history.parquet")).to_pylist()
    half = {(h["trial_id"]): h["ap"] for h in history if h["epoch"] == epochs // 2 - 1}
    failed = [f"{r['trial_id']}: {r['status']} ({r['error']})" for r in rows if r["status"] != "ok"]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["status"] == "ok":
            groups.setdefault(tuple(r[c] for c in CONFIG), []).append(r)
    full = {key[0]: rs for key, rs in groups.items() if key[1] == "full"}
    full_ap = {model: statistics.mean(r["ap"] for r in rs) for model, rs in full.items()}
    lines = [f"| config | seeds | AP | AP50 | AP at epoch {epochs // 2} | AP / full | trainable params | "
             "peak memory MiB | train images/s | wall s |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for key, rs in sorted(groups.items(), key=lambda kv: (kv[0][0], -statistics.mean(r["ap"] for r in kv[1]))):
        ap = [r["ap"] for r in rs]
        share = f"{statistics.mean(ap) / full_ap[key[0]]:.0%}" if full_ap.get(key[0]) else "–"
        mem = [r["peak_vram_train_mb"] or r["peak_rss_mb"] for r in rs]
        at_half = [half[r["trial_id"]] for r in rs if r["trial_id"] in half]
        lines.append(f"| {_label(rs[0])} | {len(rs)} | {_mean_ci(ap)} | {_mean_ci([r['ap50'] for r in rs])} | "
                     f"{_mean_ci(at_half) if at_half else '–'} | {share} | {rs[0]['trainable_params']:,} | "
                     f"{statistics.mean(mem):.0f} | {statistics.mean(r['train_images_per_s'] for r in rs):.1f} | "
                     f"{statistics.mean(r['wall_s'] for r in rs):.0f} |")
    return "\n".join(lines) + "\n\n" + _reference(groups, full, full_ap), failed


def _reference(groups: dict[tuple, list[dict]], full: dict[str, list[dict]], full_ap: dict[str, float]) -> str:
    """The literature's line against ours: each model's best LoRA config, its share of full AP and of full's
    trainable parameters."""
    out = ["Against the reference (LoRA reaches about 95 % of full fine-tuning AP at a few percent of the trainable "
           "parameters on small datasets):"]
    for model, ap_full in sorted(full_ap.items()):
        lora = [rs for key, rs in groups.items() if key[0] == model and key[1] == "lora_only"]
        if not lora:
            continue
        best = max(lora, key=lambda rs: statistics.mean(r["ap"] for r in rs))
        params = best[0]["trainable_params"] / full[model][0]["trainable_params"]
        share = (f"{statistics.mean(r['ap'] for r in best) / ap_full:.0%} of full's AP" if ap_full > 0
                 else "no AP to compare (full fine-tuning scores 0 too)")
        out.append(f"- {model}, best LoRA ({_label(best[0])}): {share}, with {params:.1%} of full's trainable "
                   "parameters.")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", type=Path, default=DEMO,
                        help="the sweep file to replicate (default sweeps/demo.yaml)")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds (default 0,1,2)")
    parser.add_argument("--epochs", type=int, default=None,
                        help="fine-tuning epochs per trial (default: 8 for the demo, which runs 4; else the file's)")
    parser.add_argument("--max-concurrent", type=int, default=2, help="trials at once (default 2: one per core)")
    parser.add_argument("--storage", help="results root (default: the demo's, ~/detsweep_results)")
    parser.add_argument("--no-write", action="store_true", help="print the section instead of writing RESULTS.md")
    parser.add_argument("--table-only", action="store_true",
                        help="no run: the table (and plot) of the results an earlier run left")
    args = parser.parse_args()
    if not args.sweep.is_file():
        parser.error(f"--sweep: {args.sweep}: no such file")
    own, demo = yaml.safe_load(args.sweep.read_text()), args.sweep.resolve() == DEMO
    if args.epochs is None:
        args.epochs = 8 if demo else int(own["train"]["epochs"])
    if args.epochs < 2:
        parser.error(f"--epochs must be >= 2 (AP at half the epochs is reported), got {args.epochs}")

    load_before, t0 = os.getloadavg()[0], time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        path = sweep_file(args, Path(tmp))
        run = [sys.executable, "-m", "detsweep.run", str(path), "-q", "--max-concurrent", str(args.max_concurrent)]
        code = 0 if args.table_only else subprocess.run(run, cwd=ROOT).returncode
        if code not in (0, 1):  # 1: some trial failed; the table lists it
            sys.exit(f"detsweep.run exited {code}")
        storage = Path(yaml.safe_load(path.read_text())["storage"]).expanduser()
    results = storage / bench_name(args.sweep) / "results.parquet"
    if not args.table_only:
        subprocess.run([sys.executable, "-m", "detsweep.frontier", str(results)], cwd=ROOT, check=True)
    elapsed = time.perf_counter() - t0
    if args.table_only:  # the run's own span: its trials' first start to last finish (the bases not counted)
        rows = pq.read_table(results, columns=["started_at", "finished_at"]).to_pylist()
        elapsed = (max(r["finished_at"] for r in rows) - min(r["started_at"] for r in rows)).total_seconds()
    plot = "transfer_front.png" if demo else f"transfer_front_{args.sweep.stem}.png"
    shutil.copyfile(results.with_name(PLOT), ROOT / "docs" / plot)
    shown = args.sweep.resolve().relative_to(ROOT) if args.sweep.resolve().is_relative_to(ROOT) else args.sweep

    import torch

    body, failed = table(results, args.epochs)
    title = (f"Transfer benchmark{'' if demo else f' of {shown}'}, {len(args.seeds.split(','))} seeds x {args.epochs} "
             "epochs (bench/transfer.py)")
    text = "\n".join([
        f"## {title}", "",
        f"{shown} with `train.seed` in [{args.seeds}] as a grid axis and `train.epochs: {args.epochs}` "
        f"(the file: {own['train']['epochs']}), through `python -m detsweep.run` on a local Ray, "
        f"{args.max_concurrent} trials at once, one worker of 1 CPU each; the bases (sweeps/bases/) pretrained on "
        f"the synthetic source domain, cached. AP / AP50 on the {own['data']['val_images']} target-domain val images "
        "after the last epoch: mean ± the half-width of the 95 % Student-t interval over the seeds. AP / full: the config's "
        "mean AP over that of the same model's full fine-tuning. Peak memory: the train worker's peak RSS (GPU: peak VRAM).",
        f"Machine: 2-core {platform.machine()} CPU" + ("" if args.table_only else
        f" (1-min load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after)") +
        f", torch {torch.__version__}, no GPU; " + (f"the trials took {elapsed / 60:.0f} min (table re-rendered "
        "with --table-only)." if args.table_only else f"whole run {elapsed / 60:.0f} min."), "",
        body, "",
        *([f"Not ok: {'; '.join(failed)}.", ""] if failed else []),
        f"The front (AP against trainable parameters, all trials): docs/{plot}.", "",
        f"![AP against trainable parameters, every trial and seed](../docs/{plot})", "",
    ])
    if args.no_write:
        print(text)
    else:
        sys.path.insert(0, str(Path(__file__).parent))
        from results_md import write_section

        write_section(title, text)
        print(text)


if __name__ == "__main__":
    main()

"""Benchmark: Pareto ranking and hypervolume of 10,000 synthetic trials on 4 objectives.

Run: .venv/bin/python bench/frontier.py [--trials 10000] [--repeats 3] [--no-write]
Times, side by side in one run: all Pareto ranks with moocore (C) and with our block-wise numpy
reference; dominated_by for every row; the hypervolume of the normalised front; and compute_frontier
end to end (results table -> ranks, dominated_by, hypervolume), and writing the outputs. Goal: front + all ranks <= 1 s.
Writes the section "## Frontier (bench/frontier.py)" of bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import logging
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from detsweep import frontier
from detsweep.frontier import pareto
from detsweep.results import rows_to_table

TITLE = "Frontier (bench/frontier.py)"
OBJECTIVES = "ap:max,trainable_params:min,peak_vram_train_mb:min,ece:min"
GOAL_S = 1.0
logger = logging.getLogger("bench.frontier")


def synthetic_rows(n: int, seed: int = 0) -> list[dict]:
    """Trials whose AP grows with log(params) and memory with params, plus noise: a realistic trade-off."""
    rng = np.random.default_rng(seed)
    log_params = rng.uniform(5.0, 7.6, n)  # LoRA ~1e5 .. full DETR ~4e7
    ap = np.clip(0.05 + 0.12 * (log_params - 5.0) + rng.normal(0, 0.05, n), 0, 1)
    vram = 2000 + 4e-4 * 10 ** log_params + rng.normal(0, 300, n)
    ece = np.clip(rng.beta(2, 12, n) + 0.02 * (log_params - 5.0), 0, 1)
    regimes = np.array(["full", "lora_only", "partial"])[rng.integers(0, 3, n)]
    lr = 10 ** rng.uniform(-5, -3, n)  # distinct configs, so no seed-replicate groups form
    return [{"sweep": "bench", "trial_id": f"t{i:05d}", "status": "ok", "regime": str(regimes[i]), "seed": 0, "lr": float(lr[i]),
             "ap": float(ap[i]), "trainable_params": int(10 ** log_params[i]),
             "peak_vram_train_mb": float(vram[i]), "ece": float(ece[i])} for i in range(n)]


def best_of(repeats: int, fn, *args, **kwargs):
    """(result, min seconds over repeats): the minimum is the least disturbed by other load on the box."""
    times, result = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn(*args, **kwargs)
        times.append(time.perf_counter() - t0)
    return result, min(times)



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per step; the minimum is kept")
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    table = rows_to_table(synthetic_rows(args.trials))
    objectives = pareto.parse_objectives(OBJECTIVES)
    maximise = [o.maximise for o in objectives]
    values = np.column_stack([table.column(o.column).to_numpy().astype(np.float64) for o in objectives])
    load_before = os.getloadavg()[0]

    ranks, t_moo = best_of(args.repeats, pareto.pareto_ranks, values, maximise, method="moocore")
    ranks_np, t_np = best_of(args.repeats, pareto.pareto_ranks, values, maximise, method="numpy")
    assert (ranks == ranks_np).all(), "moocore and numpy ranks disagree"
    _, t_dom = best_of(args.repeats, pareto.front_dominators, values, maximise, ranks)
    norms = pareto.fit_normalisation(values, objectives)
    front_norm = pareto.normalise(values[ranks == 1], norms)
    hv, t_hv = best_of(args.repeats, pareto.hypervolume, front_norm, pareto.REFERENCE_POINT)
    fr, t_all = best_of(args.repeats, frontier.compute_frontier, table, objectives)
    assert fr.hypervolume == hv
    with tempfile.TemporaryDirectory() as tmp:
        _, t_write = best_of(1, frontier.write_outputs, fr, Path(tmp))
    load_after = os.getloadavg()[0]

    n_front, n_layers = int((ranks == 1).sum()), int(ranks.max())
    logger.info("ranks: moocore %.3fs, numpy %.3fs (%.0fx); dominated_by %.3fs; hypervolume %.4fs; "
                "compute_frontier %.3fs; front %d, layers %d, HV %.4f",
                t_moo, t_np, t_np / t_moo, t_dom, t_hv, t_all, n_front, n_layers, hv)
    verdict = "meets" if t_moo + t_dom <= GOAL_S else "misses"
    text = (
        f"## {TITLE}\n\n"
        f"{args.trials:,} synthetic trials (AP rising with log params, memory with params, plus noise), "
        f"4 objectives `{OBJECTIVES}`; best of {args.repeats} runs. Machine: 2-core {platform.machine()} CPU "
        f"(shared; 1-min load average {load_before:.1f} before, {load_after:.1f} after), Python "
        f"{platform.python_version()}.\n\n"
        "| step | seconds | note |\n|---|---|---|\n"
        f"| all Pareto ranks, moocore (used) | {t_moo:.3f} | {n_front} on the front, {n_layers} layers |\n"
        f"| all Pareto ranks, numpy reference | {t_np:.3f} | {t_np / t_moo:.0f}x moocore; same ranks |\n"
        f"| dominated_by (front members dominating each row) | {t_dom:.3f} | |\n"
        f"| hypervolume of the normalised front (moocore) | {t_hv:.4f} | HV {hv:.4f} of max {1.1 ** 4:.4f} |\n"
        f"| compute_frontier end to end (table in, ranks + dominated_by + HV out) | {t_all:.3f} | |\n"
        f"| write_outputs: frontier.parquet + 3 PNG plots + report.md | {t_write:.3f} | one run |\n\n"
        f"Front + all ranks + dominated_by: {t_moo + t_dom:.3f} s, which {verdict} the {GOAL_S:.0f} s goal.\n"
    )
    print(text)
    if not args.no_write:
        from results_md import write_section  # bench/ is on sys.path when run as a script

        write_section(TITLE, text)


if __name__ == "__main__":
    main()

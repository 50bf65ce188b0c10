"""`python -m detsweep.run SWEEP.yaml`: load → expand → plan → Tuner.fit (or restore) → results.

Every error in the sweep file is reported in one line, with exit status 2, before Ray starts.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import shutil
import subprocess
import sys

from detsweep.config import Sweep, SweepError, TrialConfig, expand, load_sweep, trial_table
from detsweep.grid import fits, max_concurrent, storage_root, trial_resources

log = logging.getLogger("detsweep.run")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m detsweep.run",
        description="Run a detection fine-tuning sweep on the Ray cluster it finds (RAY_ADDRESS, or a "
                    "running cluster), or on a local Ray it starts. Results: <storage>/<sweep>/results.parquet.")
    p.add_argument("sweep", help="the sweep file (YAML), e.g. sweeps/smoke.yaml")
    p.add_argument("--dry-run", action="store_true", help="print the expanded trial plan and exit; starts nothing")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted sweep: finished trials are kept, unfinished ones resume "
                        "from their last checkpoint")
    p.add_argument("--fresh", action="store_true",
                   help="delete an earlier run of this sweep in the output folder and start over")
    p.add_argument("--output-dir", metavar="DIR", help="override the sweep file's `storage`")
    p.add_argument("--assume-resources", metavar="CPU=N,GPU=M",
                   help="with --dry-run: plan concurrency for this cluster instead of this machine "
                        "(e.g. CPU=48,GPU=4 for one g5.12xlarge)")
    p.add_argument("--max-concurrent", type=int, metavar="N",
                   help="trials at once (default: the sweep's max_concurrent_trials, else as many as the "
                        "cluster's current resources fit; set it on an autoscaling cluster)")
    p.add_argument("-q", "--quiet", action="store_true", help="less Tune output")
    return p.parse_args(argv)


def _parse_resources(spec: str) -> dict[str, float]:
    out = {}
    for part in spec.split(","):
        key, _, value = part.partition("=")
        try:
            if key.strip() not in ("CPU", "GPU"):
                raise ValueError
            out[key.strip()] = float(value)
        except ValueError:
            raise SweepError(f"--assume-resources: {part!r} is not CPU=N or GPU=M (e.g. CPU=48,GPU=4)") from None
    return out


def _local_resources() -> dict[str, float]:
    """This machine, without importing torch: CPUs, and GPUs as nvidia-smi sees them."""
    gpus = 0
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10).stdout
            gpus = sum(1 for ln in out.splitlines() if ln.startswith("GPU "))
        except (OSError, subprocess.SubprocessError):
            gpus = 0
    return {"CPU": float(os.cpu_count() or 1), "GPU": float(gpus)}


def prepare_data(trials: list[TrialConfig]) -> None:
    """Generate synthetic datasets once on the driver, before workers race to do it."""
    from detsweep.data.synthetic import ensure_synthetic

    seen = set()
    for t in trials:
        d = t.data
        key = (d.root, d.train_images, d.val_images, d.image_size, d.num_classes, d.seed)
        if d.kind == "synthetic" and key not in seen:
            seen.add(key)
            ensure_synthetic(d.root, train_images=d.train_images, val_images=d.val_images,
                             image_size=d.image_size, seed=d.seed, num_classes=d.num_classes)


def plan(sweep: Sweep, args: argparse.Namespace) -> tuple[list[TrialConfig], str]:
    if args.output_dir:
        sweep = dataclasses.replace(sweep, storage=args.output_dir)
    trials = expand(sweep)
    return trials, storage_root(sweep)


def concurrency_for(sweep: Sweep, trials: list[TrialConfig], cluster: dict[str, float], override: int | None) -> int:
    """--max-concurrent, else the sweep's `max_concurrent_trials`, else what `cluster` holds."""
    return override or sweep.max_concurrent_trials or max_concurrent(trials, cluster)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        sweep = load_sweep(args.sweep, check_paths=not args.dry_run)
        trials, root = plan(sweep, args)
        if args.resume and args.fresh:
            raise SweepError("--resume and --fresh exclude each other")
        assumed = _parse_resources(args.assume_resources) if args.assume_resources else None
    except SweepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    if args.dry_run:
        cluster = assumed or _local_resources()
        n = concurrency_for(sweep, trials, cluster, args.max_concurrent)
        print(f"sweep {sweep.name!r} from {args.sweep} -> {root}")
        print(f"cluster: {', '.join(f'{k}={v:g}' for k, v in cluster.items())}"
              f"{' (assumed)' if assumed else ' (this machine)'}")
        print(trial_table(trials, n, cluster))
        return 0

    from detsweep.results import delete_dir, exists

    had_run = exists(f"{root}/tune")
    if had_run and not (args.resume or args.fresh):
        print(f"error: {root} already holds a run of sweep {sweep.name!r}; pass --resume to continue it, "
              f"--fresh to start over, or --output-dir for another folder", file=sys.stderr)
        return 2
    if args.resume and not had_run:
        print(f"error: --resume: no earlier run of sweep {sweep.name!r} in {root}", file=sys.stderr)
        return 2
    if args.fresh and exists(root):
        delete_dir(root)

    prepare_data(trials)
    import ray

    from detsweep import sweep as sweep_mod

    # Ray's own rule: RAY_ADDRESS, else a running cluster on this node, else a new local one.
    # Save Tune's experiment state at every step (not every ~10 s): a driver killed right after a
    # trial ends must find that trial finished when it resumes.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "0")
    # The dashboard's Train tab shows each trial's run, workers and restarts (a local Ray started
    # here inherits it; cluster.yaml sets it on every node).
    os.environ.setdefault("RAY_TRAIN_ENABLE_STATE_TRACKING", "1")
    if not ray.is_initialized():
        ray.init(log_to_driver=not args.quiet)
    cluster = {k: float(v) for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")}
    explicit = args.max_concurrent or sweep.max_concurrent_trials
    too_big = [t for t in trials if fits(t, cluster) == 0]
    if too_big and not explicit:  # Train would wait for its workers forever
        need = trial_resources(too_big[0])
        print(f"error: trial {too_big[0].trial_id!r} needs {', '.join(f'{k}={v:g}' for k, v in need.items())} "
              f"but the cluster has {', '.join(f'{k}={v:g}' for k, v in cluster.items())}; lower "
              f"resources in {args.sweep}, or set max_concurrent_trials for a cluster that autoscales",
              file=sys.stderr)
        return 2
    n = concurrency_for(sweep, trials, cluster, args.max_concurrent)
    print(f"sweep {sweep.name!r}: {len(trials)} trials, {n} at once on "
          f"{', '.join(f'{k}={v:g}' for k, v in cluster.items())} -> {root}")
    print(trial_table(trials, n, cluster), flush=True)

    if args.resume:
        tuner = sweep_mod.restore_tuner(sweep, trials, root=root)
    else:
        tuner = sweep_mod.build_tuner(sweep, trials, root=root, concurrency=n)
    tuner.fit()
    return summarize(root)


def summarize(root: str) -> int:
    from detsweep.results import ResultsStore

    store = ResultsStore(root)
    table = store.read_results()
    if table is None:
        print(f"no results were written under {root}", file=sys.stderr)
        return 1
    rows = table.select(["trial_id", "status", "ap", "error"]).to_pylist()
    ok = sum(r["status"] == "ok" for r in rows)
    print(f"\nresults: {store.results_uri}")
    for r in rows:
        ap = "-" if r["ap"] is None else f"{r['ap']:.4f}"
        extra = f"  {r['error']}" if r["error"] else ""
        print(f"  {r['status']:8s} ap={ap:7s} {r['trial_id']}{extra}")
    print(f"{ok} of {len(rows)} trials ok")
    print(f"next: python -m detsweep.frontier {store.results_uri}")
    return 0 if ok else 1  # a sweep where every trial failed is a failed command


if __name__ == "__main__":
    sys.exit(main())

"""`python -m detsweep.run SWEEP.yaml`, the CLI only: flags → `sweep.load_sweep` → `expand` → plan →
`cluster.tuner.fit_sweep` → summary. Imports no ray itself (the cluster package does, once a run starts).

Every error in the sweep file or the flags, and a --resume of a sweep whose trials changed, is
reported in one line, with exit status 2, before Ray starts.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import shutil
import subprocess
import sys
from typing import NoReturn

from detsweep.results import ResultsStore
from detsweep.storage import TUNE_DIR, delete_dir, exists, join, sweep_root
from detsweep.sweep import Sweep, SweepError, TrialConfig, expand, load_sweep
from detsweep.sweep import search, study
from detsweep.sweep.bases import base_trials, describe
from detsweep.sweep.cost import check_trials, estimate_line, pricing
from detsweep.sweep.grid import root_of
from detsweep.sweep.plan import (concurrency_for, concurrency_line, configured_concurrency, resources_text,
                                 trial_resources, trial_table, unfit, unfit_warning)
from detsweep.sweep.resume import check_resume, cut_short_tune_state, save_trials


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line on stderr with exit status 2, like every error here."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see --help)\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = _Parser(
        prog="python -m detsweep.run",
        description="Run a detection fine-tuning sweep on the Ray cluster it finds (RAY_ADDRESS, or a "
                    "running cluster), or on a local Ray it starts. Results: <storage>/<sweep>/results.parquet.")
    p.add_argument("sweep", help="the sweep file (YAML), e.g. sweeps/smoke.yaml")
    p.add_argument("--dry-run", action="store_true", help="print the expanded trial plan and exit; starts nothing")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted sweep: finished trials are kept, unfinished ones resume "
                        "from their last checkpoint; refused if the sweep's trials changed since it started")
    p.add_argument("--fresh", action="store_true",
                   help="delete an earlier run of this sweep in the output folder and start over")
    p.add_argument("--output-dir", metavar="DIR", help="override the sweep file's `storage`")
    p.add_argument("--assume-resources", metavar="CPU=N,GPU=M",
                   help="only with --dry-run: plan concurrency for this cluster instead of this machine "
                        "(e.g. CPU=48,GPU=4 for one g5.12xlarge)")
    p.add_argument("--max-concurrent", type=int, metavar="N",
                   help="trials at once, N >= 1 (default: the sweep's max_concurrent_trials, else as many as "
                        "the cluster's current resources fit; set it on an autoscaling cluster). Not with "
                        "--resume: Tune keeps the earlier run's value")
    p.add_argument("--skip-image-check", action="store_true",
                   help="read no image header, on the driver or in the trials (data.image_check: none; the "
                        "annotations are always checked); `python -m detsweep.data check` decodes every image. "
                        "A --resume takes the setting the run started with")
    p.add_argument("-q", "--quiet", action="store_true", help="less Tune output")
    return p.parse_args(argv)


def check_flags(args: argparse.Namespace) -> dict[str, float] | None:
    """The flags' own rules, checked before the sweep file is read. Returns the assumed cluster."""
    if args.resume and args.fresh:
        raise SweepError("--resume and --fresh exclude each other")
    if args.max_concurrent is not None and args.max_concurrent < 1:
        raise SweepError(f"--max-concurrent: {args.max_concurrent} must be >= 1 (trials at once)")
    if args.max_concurrent is not None and args.resume and not args.dry_run:
        raise SweepError("--max-concurrent does not apply with --resume: Tune keeps the earlier run's value "
                         "(--fresh starts over with a new one)")
    if args.assume_resources is None:
        return None
    if not args.dry_run:
        raise SweepError("--assume-resources only applies with --dry-run; a run uses the resources of the "
                         "cluster Ray finds")
    return _parse_resources(args.assume_resources)


def _parse_resources(spec: str) -> dict[str, float]:
    """`CPU=48,GPU=4` -> {"CPU": 48.0, "GPU": 4.0}; CPU > 0 is required, GPU >= 0 defaults to 0."""
    out: dict[str, float] = {}
    for part in spec.split(","):
        key, sep, text = (s.strip() for s in part.partition("="))
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not sep or key not in ("CPU", "GPU") or not math.isfinite(value):
            raise SweepError(f"--assume-resources: {part!r} is not CPU=N or GPU=M (e.g. CPU=48,GPU=4)")
        if key in out:
            raise SweepError(f"--assume-resources: {spec!r} gives {key} twice")
        if value < 0 or (key == "CPU" and value == 0):
            bound = "> 0" if key == "CPU" else ">= 0"
            raise SweepError(f"--assume-resources: {part!r}: {key} must be {bound} (e.g. CPU=48,GPU=4)")
        out[key] = value
    if "CPU" not in out:
        raise SweepError(f"--assume-resources: {spec!r} gives no CPU; a cluster needs CPU=N with N > 0 "
                         f"(e.g. CPU=48,GPU=4)")
    return {"CPU": out["CPU"], "GPU": out.get("GPU", 0.0)}


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
    """Before Ray starts, on the driver: generate synthetic datasets once (before workers race to do
    it), and check each coco dataset the trials use once (`detsweep.data.prepare`: annotations, and
    image headers where this machine sees the images). An unusable file, or a problem under
    `data.on_invalid: error`, raises SweepError with its one line; `skip` logs what it drops. The
    trials' `data.image_check: none` (`--skip-image-check`) reads no image header."""
    from detsweep.data.check import DataError
    from detsweep.data.prepare import prepare
    from detsweep.data.sources import SourceError, resolve
    from detsweep.data.synthetic import ensure_synthetic

    seen = set()
    for t in trials:
        d = t.data
        key = (d.root, d.train_images, d.val_images, d.image_size, d.num_classes, d.seed, d.domain)
        if d.kind == "synthetic" and key not in seen:
            seen.add(key)
            ensure_synthetic(d.root, train_images=d.train_images, val_images=d.val_images,
                             image_size=d.image_size, seed=d.seed, num_classes=d.num_classes, domain=d.domain)
        coco_key = (d.root, d.format, d.train, d.val, d.on_invalid, d.image_check)
        if d.kind == "coco" and coco_key not in seen:
            seen.add(coco_key)
            try:
                # refresh: the workers of this machine reuse these image results (an image fixed
                # in place would leave a stale cache behind otherwise)
                prepare(resolve(d.root, d.format, d.train, d.val), on_invalid=d.on_invalid,
                        image_check=d.image_check, cache="refresh")
            except DataError as e:
                raise SweepError(str(e)) from None
            except SourceError as e:
                raise SweepError(f"{e.key}: {e}") from None


def effective_sweep(sweep: Sweep, args: argparse.Namespace) -> Sweep:
    """The sweep as the flags change it (--output-dir, --skip-image-check): a search builds its trials
    from it as they are sampled."""
    if args.output_dir:
        sweep = dataclasses.replace(sweep, storage=args.output_dir)
    if getattr(args, "skip_image_check", False):  # in every trial: its workers check no image either
        sweep = dataclasses.replace(sweep, data=dataclasses.replace(sweep.data, image_check="none"))
    return sweep


def plan(sweep: Sweep, args: argparse.Namespace) -> tuple[list[TrialConfig], str]:
    """The grid's trials, or a search's cells (one trial per model and regime it can pick: what its
    sampled trials hold), and the sweep's folder. The search space is checked here, before Ray."""
    sweep = effective_sweep(sweep, args)
    if sweep.search is None:
        trials = expand(sweep)
    else:
        trials = search.cells(search.parse_space(sweep, check_paths=not getattr(args, "dry_run", False)))
    check_trials(pricing(sweep.cost, sweep.source), trials, sweep.source)
    return trials, sweep_root(sweep.storage, sweep.name)


def dry_run(sweep: Sweep, trials: list[TrialConfig], root: str, args: argparse.Namespace,
            assumed: dict[str, float] | None) -> int:
    """Print the plan for the assumed cluster, else this machine; start nothing."""
    cluster = assumed or _local_resources()
    where = f"{resources_text(cluster)} ({'assumed' if assumed else 'this machine'})"
    print(f"sweep {sweep.name!r} from {args.sweep} -> {root}")
    print(f"cluster: {where}")
    n = concurrency_for(sweep, trials, cluster, args.max_concurrent)
    if sweep.search is not None:
        print(search.describe(search.parse_space(sweep, check_paths=False), n))
        print("each sampled trial holds the resources of its model and regime:")
    _print_plan(sweep, trials, cluster, args, n, concurrency_line(sweep, trials, cluster, args.max_concurrent), where)
    estimate = estimate_line(pricing(sweep.cost, sweep.source), sweep.cost.expected_minutes, trials,
                             sweep.search.num_samples if sweep.search is not None else None)
    if estimate:
        print(estimate)
    for base in base_trials(trials, sweep, root_of(root)):
        print(describe(base))
    return 0


def _print_plan(sweep: Sweep, trials: list[TrialConfig], cluster: dict[str, float], args: argparse.Namespace,
                n: int | None, line: str, where: str) -> None:
    """The trial table with `n` at once, the concurrency `line`, and a warning on stderr when some
    trial fits 0 times on `cluster` (described by `where`): the same for --dry-run and a run."""
    table = trial_table(trials, n, cluster)
    if sweep.search is not None:  # the rows are its cells, not the trials it samples
        table = table.replace(f"\n{len(trials)} trials", f"\n{len(trials)} cells (model and regime)")
    print(table)
    print(line, flush=True)
    warning = unfit_warning(sweep, trials, cluster, args.max_concurrent, where)
    if warning:
        print(warning, file=sys.stderr, flush=True)


def guard_earlier_run(sweep: Sweep, trials: list[TrialConfig], root: str, args: argparse.Namespace) -> int | None:
    """Before Ray starts: an earlier run needs --resume (with unchanged trials) or --fresh. Returns
    the earlier run's concurrency on --resume."""
    had_run = exists(join(root, TUNE_DIR))
    if had_run and not (args.resume or args.fresh):
        raise SweepError(f"{root} already holds a run of sweep {sweep.name!r}; pass --resume to continue it, "
                         f"--fresh to start over, or --output-dir for another folder")
    if args.resume and not had_run:
        raise SweepError(f"--resume: no earlier run of sweep {sweep.name!r} in {root}")
    if args.fresh and exists(root):
        delete_dir(root)
    if not args.resume:
        return None
    if sweep.search is not None:
        study.check_search_resume(root, sweep)
    concurrency = check_resume(root, trials)
    cut = cut_short_tune_state(root)
    if cut is not None and cut.tuner:
        raise SweepError(f"--resume: {cut.path} is cut short: the driver stopped while Ray was writing it, and Tune "
                         f"cannot restore the run (the finished trials are in results.parquet); pass --fresh to "
                         f"start over, or --output-dir for another folder")
    if cut is not None:  # a grid: Tune starts its trials again, each from its own Train run
        print(f"warning: --resume: {cut.path} is cut short (the driver stopped while Ray was writing it): Tune "
              f"starts the sweep's trials again, and each continues from its last Train checkpoint (a finished "
              f"trial reports its final metrics again)", file=sys.stderr, flush=True)
    return concurrency


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        assumed = check_flags(args)
        sweep = load_sweep(args.sweep, check_paths=not args.dry_run)
        sweep = effective_sweep(sweep, args)
        trials, root = plan(sweep, args)
        if args.dry_run:
            return dry_run(sweep, trials, root, args, assumed)
        resumed_concurrency = guard_earlier_run(sweep, trials, root, args)
    except SweepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return run_sweep(sweep, trials, root, args, resumed_concurrency)


def _unfit_reason(trial: TrialConfig, cluster: dict[str, float], nodes: list[dict[str, float]]) -> str:
    if unfit([trial], cluster):
        return (f"trial {trial.trial_id!r} needs {resources_text(trial_resources(trial))} but the cluster has "
                f"{resources_text(cluster)}")
    r = trial.resources
    worker = {"CPU": r.cpus_per_worker, "GPU": r.gpus_per_worker}
    largest = {k: max(n.get(k, 0.0) for n in nodes) for k in ("CPU", "GPU")}
    return (f"trial {trial.trial_id!r}: one DDP worker needs {resources_text(worker)} on one node, but the "
            f"largest node has CPU={largest['CPU']:g}, GPU={largest['GPU']:g}")


def run_sweep(sweep: Sweep, trials: list[TrialConfig], root: str, args: argparse.Namespace,
              resumed: int | None) -> int:
    """Start (or connect to) Ray, print the plan for the cluster it finds, and run the sweep.
    `resumed`: on --resume, the concurrency the run started with (None: unknown)."""
    try:
        prepare_data(trials)
    except SweepError as e:  # an unusable dataset, or bad data under data.on_invalid: error
        print(f"error: {e}", file=sys.stderr)
        return 2
    from detsweep.cluster import tuner  # imports ray: only once a run really starts

    cluster, nodes = tuner.connect(quiet=args.quiet)
    too_big = unfit(trials, cluster, nodes)
    # Train would wait forever. Not checked on --resume: the run passed this check when it started,
    # and an autoscaling cluster that has shrunk since grows back for the pending trials.
    if too_big and not args.resume and configured_concurrency(sweep, args.max_concurrent)[0] is None:
        print(f"error: {_unfit_reason(too_big[0], cluster, nodes)}; lower resources in {args.sweep}, or set "
              f"max_concurrent_trials for a cluster that autoscales", file=sys.stderr)
        return 2
    if args.resume:  # Tuner.restore keeps the TuneConfig, max_concurrent_trials included
        n, line = resumed, f"concurrency: Tune keeps {resumed or 'the value'} the run started with (Tuner.restore)"
    else:
        n, line = (concurrency_for(sweep, trials, cluster, args.max_concurrent),
                   concurrency_line(sweep, trials, cluster, args.max_concurrent))
    bases = base_trials(trials, sweep, root_of(root))
    for base in bases:
        print(describe(base), flush=True)
    prepare_data(bases)
    from detsweep.cluster.bases import BaseFailed, build_bases

    try:
        build_bases(bases, quiet=args.quiet)
    except BaseFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"sweep {sweep.name!r}: {len(trials)} trials on {resources_text(cluster)} -> {root}")
    _print_plan(sweep, trials, cluster, args, n, line, f"the cluster ({resources_text(cluster)})")
    if not args.resume or resumed is None:
        save_trials(root, trials, n)  # before the Tuner writes <root>/tune: every run has its trial list
    if sweep.search is not None and not args.resume:
        study.save_search(root, sweep)  # --resume checks it: the restored study must be this search's
    tuner.fit_sweep(sweep, trials, root=root, concurrency=n, resume=args.resume, quiet=args.quiet)
    return summarize(root)


def summarize(root: str) -> int:
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

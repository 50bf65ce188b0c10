"""A sweep's plan on a cluster: what each trial holds, how many copies fit, how many trials Tune runs
at once (computed or set), and the plan table printed by `--dry-run` and at the start of a run."""
from __future__ import annotations

from typing import Any

from detsweep.sweep.spec import Sweep, TrialConfig


def _fmt(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def trial_resources(trial: TrialConfig) -> dict[str, float]:
    """What one trial holds while it runs: its DDP workers' CPUs and GPUs."""
    r = trial.resources
    return {"CPU": r.ddp_workers * r.cpus_per_worker, "GPU": r.ddp_workers * r.gpus_per_worker}


def fits(trial: TrialConfig, cluster: dict[str, float]) -> int:
    """How many copies of `trial` the cluster ({"CPU": n, "GPU": m}) holds at once."""
    need = trial_resources(trial)
    return min((int(cluster.get(k, 0.0) // v + 1e-9) if v > 0 else 10**6) for k, v in need.items())


def most_at_once(trials: list[TrialConfig], cluster: dict[str, float]) -> int:
    """How many trials the cluster runs at once: as many as the least demanding trial allows,
    at most all of them; 0 when no trial fits."""
    return min(max(fits(t, cluster) for t in trials), len(trials))


# cluster.yaml gives the head node this custom resource, and only the head: a trial actor takes one unit,
# which keeps it (and Ray Train's controller, placed beside it) off the GPU nodes (docs/cluster.md).
HEAD_RESOURCE = "detsweep_trial"


def max_concurrent(trials: list[TrialConfig], cluster: dict[str, float]) -> int:
    """Tune's `max_concurrent_trials` computed from `cluster`: `most_at_once`, at least 1, and at most
    the head's `detsweep_trial` units where the cluster has them (each trial actor holds one).
    Ray's scheduler still keeps bigger trials waiting for their workers' resources, and the
    trial actors hold almost nothing else, so a mixed grid never over-subscribes."""
    n = max(1, most_at_once(trials, cluster))
    head = int(cluster.get(HEAD_RESOURCE, 0))
    return min(n, head) if head > 0 else n


def unfit(trials: list[TrialConfig], cluster: dict[str, float],
          nodes: list[dict[str, float]] | None = None) -> list[TrialConfig]:
    """The trials that `cluster` (its total resources) cannot run even once, or, given its `nodes`'
    resources, whose DDP worker is bigger than every node: Train would wait for their workers."""
    return [t for t in trials if fits(t, cluster) == 0 or (nodes is not None and not worker_fits_a_node(t, nodes))]


def worker_fits_a_node(trial: TrialConfig, nodes: list[dict[str, float]]) -> bool:
    """Whether one DDP worker of `trial` (one placement-group bundle) fits on some node."""
    r = trial.resources
    return any(node.get("CPU", 0.0) >= r.cpus_per_worker and node.get("GPU", 0.0) >= r.gpus_per_worker
               for node in nodes)


def trial_table(trials: list[TrialConfig], concurrency: int | None = None,
                cluster: dict[str, float] | None = None) -> str:
    """The plan as a fixed-width table, for `--dry-run` and the start of a run. With `cluster`,
    column `fit` says how many copies of each trial the cluster holds at once."""
    rows = [("trial_id", "model", "regime", "backbone", "workers", "cpu/w", "gpu/w", "epochs")
            + (("fit",) if cluster else ())]
    for t in trials:
        backbone = t.detector.backbone
        r = t.resources
        rows.append((t.trial_id, t.model, t.regime, backbone, str(r.ddp_workers),
                     _fmt(r.cpus_per_worker), _fmt(r.gpus_per_worker), str(t.train.epochs))
                    + ((str(fits(t, cluster)),) if cluster else ()))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    footer = f"{len(trials)} trials"
    if concurrency is not None:
        footer += f", up to {concurrency} at once"
    return "\n".join(lines + [footer])


def resources_text(resources: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:g}" for k, v in resources.items())


def configured_concurrency(sweep: Sweep, override: int | None) -> tuple[int | None, str]:
    """The set value of Tune's `max_concurrent_trials` (None: not set) and where it comes from."""
    in_file = f"max_concurrent_trials in {sweep.source}"
    if override is not None:
        also = f" (over {sweep.max_concurrent_trials} from {in_file})" if sweep.max_concurrent_trials else ""
        return override, f"--max-concurrent sets {override}{also}"
    if sweep.max_concurrent_trials is not None:
        return sweep.max_concurrent_trials, f"{in_file} sets {sweep.max_concurrent_trials}"
    return None, "max_concurrent_trials is not set"


def concurrency_for(sweep: Sweep, trials: list[TrialConfig], cluster: dict[str, float], override: int | None) -> int:
    """What Tune uses: --max-concurrent, else the sweep's `max_concurrent_trials`, else what `cluster` holds."""
    configured, _ = configured_concurrency(sweep, override)
    return configured if configured is not None else max_concurrent(trials, cluster)


def concurrency_line(sweep: Sweep, trials: list[TrialConfig], cluster: dict[str, float], override: int | None) -> str:
    """Both values, computed and set, and which one Tune uses."""
    computed = most_at_once(trials, cluster)
    configured, setting = configured_concurrency(sweep, override)
    if configured is not None:
        which = "the set value"
    else:
        which = "the computed value" if computed else "at least 1"
    return (f"concurrency: the cluster fits {computed} at once; {setting}; "
            f"Tune uses {concurrency_for(sweep, trials, cluster, override)} ({which})")


def unfit_warning(sweep: Sweep, trials: list[TrialConfig], cluster: dict[str, float], override: int | None,
                  where: str) -> str | None:
    """One line when some trial fits 0 times on `cluster` (described by `where`), else None."""
    too_big = unfit(trials, cluster)
    if not too_big:
        return None
    if configured_concurrency(sweep, override)[0] is not None:
        then = "Ray queues them until the cluster has room for their workers (an autoscaling cluster adds nodes)"
    else:
        then = (f"a run on this cluster stops with an error; lower resources in {sweep.source}, or set "
                f"max_concurrent_trials (or --max-concurrent) for a cluster that autoscales")
    return (f"warning: {len(too_big)} of {len(trials)} trials fit 0 times on {where}, first {too_big[0].trial_id!r} "
            f"(needs {resources_text(trial_resources(too_big[0]))}); {then}")




def placement_strategy(trial: dict[str, Any], nodes: list[dict[str, float]]) -> str:
    """Ray's placement strategy for a trial's DDP workers (`trial`: `TrialConfig.to_dict()`): all on one
    node (STRICT_PACK) when some node can hold the whole trial, so a 2-GPU trial never straddles two
    nodes and pays for cross-node NCCL; else PACK, Ray's best effort."""
    r = trial["resources"]
    need = {"CPU": r["ddp_workers"] * r["cpus_per_worker"], "GPU": r["ddp_workers"] * r["gpus_per_worker"]}
    whole = any(all(node.get(k, 0.0) + 1e-9 >= v for k, v in need.items()) for node in nodes)
    return "STRICT_PACK" if whole and r["ddp_workers"] > 1 else "PACK"


def process_group_backend(trial: dict[str, Any]) -> str:
    """`resources.backend`, with `auto` resolved: NCCL only for a multi-GPU trial. A world-size-1 trial
    uses gloo: it never all-reduces gradients, and an NCCL communicator on a GPU that fractional trials
    share would cost memory and can hang."""
    r = trial["resources"]
    if r["backend"] != "auto":
        return r["backend"]
    return "nccl" if r["gpus_per_worker"] > 0 and r["ddp_workers"] > 1 else "gloo"


def loader_workers(trial: TrialConfig) -> int:
    """DataLoader worker processes per DDP worker: `data.loader_workers`, or by default (null) one per
    CPU the worker holds beyond its own, at most 8, when it holds a GPU (JPEG decoding then overlaps the
    GPU's work instead of idling it), and none on a CPU-only trial, whose cores are busy training."""
    if trial.data.loader_workers is not None:
        return trial.data.loader_workers
    r = trial.resources
    return min(8, max(0, int(r.cpus_per_worker) - 1)) if r.gpus_per_worker > 0 else 0

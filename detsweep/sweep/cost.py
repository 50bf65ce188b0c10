"""A trial's cost in dollars, from the user's prices: the workers' own time (`worker_s`, summed over
attempts, from each worker group's start to its last report), times what they hold, times a price that
is either flat (`cost.usd_per_gpu_hour`, `cost.usd_per_cpu_hour`) or per node type of cluster.yaml
(`cost.node_types: {gpu: 5.672}`, USD per node-hour).

A node type's price is charged by the trial's share of its nodes: the larger of its GPUs' and its CPUs'
share (a trial holding 1 of 4 GPUs but 40 of 48 CPUs keeps most of the node from other trials), so a
trial on two whole nodes pays two node-hours an hour. Torch-free and Ray-free.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import yaml

from detsweep.sweep.spec import CostConfig, ResourcesConfig, TrialConfig
from detsweep.sweep.typed import SweepError


@dataclass(frozen=True)
class NodeType:
    """A priced node type of cluster.yaml and the resources one node of it has."""

    name: str
    usd_per_hour: float
    cpus: float
    gpus: float


@dataclass(frozen=True)
class Pricing:
    """What an hour of a trial's workers costs: flat prices per GPU and per CPU, or the node types."""

    usd_per_gpu_hour: float = 0.0
    usd_per_cpu_hour: float = 0.0
    node_types: tuple[NodeType, ...] = ()

    def node_type(self, res: ResourcesConfig) -> NodeType | None:
        """The priced node type a trial's workers run on (None with flat prices). ValueError when
        none or several could hold one of its workers: the price would be a guess."""
        if not self.node_types:
            return None
        fit = [n for n in self.node_types if n.cpus >= res.cpus_per_worker and n.gpus >= res.gpus_per_worker
               and n.cpus > 0]
        if res.gpus_per_worker == 0 and any(n.gpus == 0 for n in fit):
            fit = [n for n in fit if n.gpus == 0]  # a CPU-only trial on a CPU node, if one is priced
        need = f"{res.cpus_per_worker:g} CPU and {res.gpus_per_worker:g} GPU per worker"
        if not fit:
            priced = {n.name: f"CPU={n.cpus:g}, GPU={n.gpus:g}" for n in self.node_types}
            raise ValueError(f"no priced node type holds one worker of {need}; priced are {priced}")
        if len(fit) > 1:
            raise ValueError(f"{need} fits node types {[n.name for n in fit]}, so its price is ambiguous; price "
                             f"only the node type these trials run on, or give flat usd_per_gpu_hour/usd_per_cpu_hour")
        return fit[0]

    def usd_per_hour(self, res: ResourcesConfig) -> float:
        """What one hour of the trial's workers costs (every DDP worker, fractional GPUs by their share)."""
        gpus, cpus = res.ddp_workers * res.gpus_per_worker, res.ddp_workers * res.cpus_per_worker
        node = self.node_type(res)
        if node is None:
            return gpus * self.usd_per_gpu_hour + cpus * self.usd_per_cpu_hour
        share = max(gpus / node.gpus if node.gpus else 0.0, cpus / node.cpus)
        return share * node.usd_per_hour

    def trial_usd(self, res: ResourcesConfig, worker_s: float) -> float:
        """USD of a trial whose workers ran `worker_s` seconds (summed over attempts)."""
        if not worker_s >= 0:
            raise ValueError(f"worker_s must be >= 0, got {worker_s!r}")
        return worker_s / 3600.0 * self.usd_per_hour(res)


def _cluster_file(cost: CostConfig, source: str) -> Path:
    """`cost.cluster`: as given (relative to the working directory), else beside the sweep file or one
    folder above it (the repository's cluster.yaml for a file in sweeps/)."""
    given = Path(cost.cluster).expanduser()
    tries = [given] if given.is_absolute() else [given, Path(source).parent / given, Path(source).parent.parent / given]
    found = next((p for p in tries if p.is_file()), None)
    if found is None:
        raise SweepError(f"{source}: cost.cluster: {cost.cluster!r} is not a file (cost.node_types needs the node "
                         f"types' resources from cluster.yaml's available_node_types)")
    return found


def node_resources(path: Path, source: str) -> dict[str, dict[str, float]]:
    """cluster.yaml's node types: name -> {"CPU": n, "GPU": m} (`resources`, 0 when left out)."""
    try:
        types = (yaml.safe_load(path.read_text()) or {}).get("available_node_types")
    except (yaml.YAMLError, AttributeError) as e:
        raise SweepError(f"{source}: cost.cluster: {path} is not a Ray cluster file ({e})") from None
    if not isinstance(types, dict) or not types:
        raise SweepError(f"{source}: cost.cluster: {path} has no available_node_types")
    out = {}
    for name, spec in types.items():
        res = (spec or {}).get("resources") or {}
        out[str(name)] = {k: float(res.get(k, 0) or 0) for k in ("CPU", "GPU")}
    return out


def pricing(cost: CostConfig, source: str) -> Pricing | None:
    """The sweep's prices, checked (one line naming `cost.<key>` for a bad entry); None when it gives none."""
    flat = {"usd_per_gpu_hour": cost.usd_per_gpu_hour, "usd_per_cpu_hour": cost.usd_per_cpu_hour}
    prices = {**{f"cost.{k}": v for k, v in flat.items()},
              **{f"cost.node_types.{k}": v for k, v in cost.node_types.items()}}
    for key, value in prices.items():
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise SweepError(f"{source}: {key}: {value!r} must be a price >= 0 (USD per hour)")
    if cost.expected_minutes is not None and not cost.expected_minutes > 0:
        raise SweepError(f"{source}: cost.expected_minutes: {cost.expected_minutes!r} must be > 0")
    if cost.node_types and any(v is not None for v in flat.values()):
        raise SweepError(f"{source}: cost.node_types: give either node_types or the flat usd_per_gpu_hour/"
                         f"usd_per_cpu_hour, not both (a trial would have two prices)")
    if cost.node_types:
        path = _cluster_file(cost, source)
        known = node_resources(path, source)
        nodes = []
        for name, usd in cost.node_types.items():
            if name not in known:
                raise SweepError(f"{source}: cost.node_types.{name}: not a node type of {path}; its node types are "
                                 f"{list(known)}")
            nodes.append(NodeType(name, usd, known[name]["CPU"], known[name]["GPU"]))
        return Pricing(node_types=tuple(nodes))
    if all(v is None for v in flat.values()):
        return None
    return Pricing(usd_per_gpu_hour=cost.usd_per_gpu_hour or 0.0, usd_per_cpu_hour=cost.usd_per_cpu_hour or 0.0)


def check_trials(prices: Pricing | None, trials: list[TrialConfig], source: str) -> None:
    """Every trial has one price: with node types, exactly one priced type holds its workers."""
    if prices is None:
        return
    for t in trials:
        try:
            prices.node_type(t.resources)
        except ValueError as e:
            raise SweepError(f"{source}: cost.node_types: trial {t.trial_id!r}: {e}") from None


def usd(value: float) -> str:
    """Dollars as a reader wants them: in cents, or to two significant digits below a cent."""
    return f"${value:,.2f}" if value >= 0.005 or value == 0 else f"${value:.2g}"


def estimate_line(prices: Pricing | None, minutes: float | None, trials: list[TrialConfig],
                  num_samples: int | None = None) -> str | None:
    """--dry-run's cost estimate, or None without prices and `cost.expected_minutes`. For a grid, the sum
    over its trials; for a search (`num_samples`, `trials` its cells), the range from all samples landing
    in the cheapest cell to all in the dearest."""
    if prices is None or minutes is None:
        return None
    each = {t.trial_id: prices.usd_per_hour(t.resources) * minutes / 60.0 for t in trials}
    per = ", ".join(f"{tid} {usd(dollars)}" for tid, dollars in each.items())
    if num_samples is None:
        return f"cost estimate: {usd(sum(each.values()))} for {len(each)} trials of {minutes:g} min each ({per})"
    low, high = min(each.values()) * num_samples, max(each.values()) * num_samples
    span = usd(low) if math.isclose(low, high) else f"{usd(low)} to {usd(high)}"
    return f"cost estimate: {span} for {num_samples} trials of {minutes:g} min each (per trial: {per})"


def resources_of(trial: dict) -> ResourcesConfig:
    """A trial config dict's (`TrialConfig.to_dict()`) resources."""
    names = {f.name for f in dataclasses.fields(ResourcesConfig)}
    return ResourcesConfig(**{k: v for k, v in trial["resources"].items() if k in names})

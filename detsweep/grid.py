"""Grid expansion in Python, not inside Tune: `expand(sweep)` gives the deduplicated list of
complete trial configs, with meaningless combinations pruned and stable, readable trial ids."""
from __future__ import annotations

import itertools
import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from detsweep.config import Sweep, TrialConfig

# Axes that only mean something for one model family or one regime.
_FAMILY_PREFIX = {"model.detr.": "detr", "model.faster_rcnn.": "faster_rcnn"}
_ALWAYS_IN_ID = ("lora.rank", "lora.placement")  # a LoRA trial's id always names its rank and placement


def storage_root(sweep: "Sweep") -> str:
    """`<storage>/<sweep name>`: a local absolute path, or a URI left as it is."""
    if "://" in sweep.storage:
        return sweep.storage.rstrip("/") + "/" + sweep.name
    return os.path.join(os.path.abspath(os.path.expanduser(sweep.storage)), sweep.name)


def _relevant(key: str, family: str, regime: str) -> bool:
    if key.startswith("lora."):
        return regime == "lora_only"
    for prefix, fam in _FAMILY_PREFIX.items():
        if key.startswith(prefix):
            return family == fam
    return True


def model_label(model: str, backbone: str) -> str:
    """The model's name as it runs: `detr_r50` with a resnet18 backbone is `detr_r18`."""
    return model.replace("r50", "r" + backbone.removeprefix("resnet"))


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def expand(sweep: "Sweep") -> list["TrialConfig"]:
    """Every complete trial of the sweep, in grid order, deduplicated by trial id.

    Pruned: LoRA keys outside `lora_only`; model keys of the other family; regimes a model
    family does not list in `model.<family>.regimes` (Faster R-CNN has no LoRA at all).
    """
    from detsweep.config import MODELS, SweepError, TrialConfig, _apply_axis, check_resources, resources_for

    models = sweep.grid.get("model", ("detr_r50",))
    regimes = sweep.grid.get("regime", ("full",))
    axes = [(k, v) for k, v in sweep.grid.items() if k not in ("model", "regime")]
    varying = {k for k, v in axes if len(v) > 1}
    root = storage_root(sweep)

    trials: dict[str, TrialConfig] = {}
    for model, regime, *values in itertools.product(models, regimes, *(v for _, v in axes)):
        family = MODELS[model]
        fam_cfg = getattr(sweep.model, family)
        if regime not in fam_cfg.regimes:
            continue
        cfg = sweep
        id_parts = [model, regime]  # the model label is set below, once the axes are applied
        chosen: dict[str, Any] = {}
        for (key, _), value in zip(axes, values):
            if not _relevant(key, family, regime):
                continue
            cfg = _apply_axis(cfg, key, value, where=f"grid.{key}")
            chosen[key] = value
            if key in varying and key not in _ALWAYS_IN_ID:
                id_parts.append(f"{key.rsplit('.', 1)[-1]}{_fmt(value)}")
        if regime == "lora_only":
            id_parts[2:2] = [f"r{cfg.lora.rank}", cfg.lora.placement]
        id_parts[0] = model_label(model, getattr(cfg.model, family).backbone)
        trial_id = "-".join(id_parts)
        if trial_id in trials:
            if any(trials[trial_id].axes.get(k) != v for k, v in chosen.items()):
                raise SweepError(f"{sweep.source}: grid: two different trials would share the id {trial_id!r} "
                                 f"({trials[trial_id].axes} vs {chosen}); make the values distinguishable")
            continue  # the same trial again: an axis that does not apply here
        resources = resources_for(cfg, regime) if regime in cfg.resources_by_regime else cfg.resources
        check_resources(resources, f"resources (trial {trial_id})", sweep.source)
        if family == "faster_rcnn" and regime == "lora_only":  # guarded by regimes, kept as invariant
            raise SweepError(f"{sweep.source}: grid.regime: Faster R-CNN has no LoRA")
        trials[trial_id] = TrialConfig(
            sweep=sweep.name, trial_id=trial_id, model=model, family=family, regime=regime,
            data=cfg.data, detr=cfg.model.detr, faster_rcnn=cfg.model.faster_rcnn,
            lora=cfg.lora if regime == "lora_only" else None, train=cfg.train, eval=cfg.eval,
            resources=resources, fault_tolerance=cfg.fault_tolerance, storage=root, axes=chosen,
        )
    if not trials:
        raise SweepError(f"{sweep.source}: grid: no trial is left after pruning; check grid.regime "
                         f"against model.<family>.regimes")
    return list(trials.values())


def trial_resources(trial: "TrialConfig") -> dict[str, float]:
    """What one trial holds while it runs: its DDP workers' CPUs and GPUs."""
    r = trial.resources
    return {"CPU": r.ddp_workers * r.cpus_per_worker, "GPU": r.ddp_workers * r.gpus_per_worker}


def fits(trial: "TrialConfig", cluster: dict[str, float]) -> int:
    """How many copies of `trial` the cluster ({"CPU": n, "GPU": m}) holds at once."""
    need = trial_resources(trial)
    return min((int(cluster.get(k, 0.0) // v + 1e-9) if v > 0 else 10**6) for k, v in need.items())


def max_concurrent(trials: list["TrialConfig"], cluster: dict[str, float]) -> int:
    """Tune's `max_concurrent_trials`: as many trials as the least demanding trial allows, at
    least 1. Ray's scheduler still keeps bigger trials waiting for their workers' resources,
    and the trial actors hold almost nothing, so a mixed grid never over-subscribes."""
    return max(1, min(max(fits(t, cluster) for t in trials), len(trials)))


def trial_table(trials: list["TrialConfig"], concurrency: int | None = None,
                cluster: dict[str, float] | None = None) -> str:
    """The plan as a fixed-width table, for `--dry-run` and the start of a run. With `cluster`,
    column `fit` says how many copies of each trial the cluster holds at once."""
    rows = [("trial_id", "model", "regime", "backbone", "workers", "cpu/w", "gpu/w", "epochs")
            + (("fit",) if cluster else ())]
    for t in trials:
        backbone = (t.detr if t.family == "detr" else t.faster_rcnn).backbone
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

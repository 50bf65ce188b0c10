"""Grid expansion in Python, not inside Tune: `expand(sweep)` gives the deduplicated list of
complete trial configs, with meaningless combinations pruned and stable, readable trial ids;
what each trial needs from a cluster; and how an expansion differs from a saved one (--resume)."""
from __future__ import annotations

import itertools
import json
import os
import re
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from detsweep.config import Sweep, SweepError, TrialConfig

# Axes that only mean something for one model family or one regime.
_FAMILY_PREFIX = {"model.detr.": "detr", "model.faster_rcnn.": "faster_rcnn"}
_ALWAYS_IN_ID = ("lora.rank", "lora.placement")  # a LoRA trial's id always names its rank and placement
_NOT_IN_ID = re.compile(r"[^A-Za-z0-9._=-]+")  # trial ids name folders: these runs become `_`


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


def id_value(value: Any) -> str:
    """`value` as it reads in a trial id, which names folders: only [A-Za-z0-9._=-] are kept and
    each run of other characters becomes `_`. A string with a `/` is a path and reads as its file
    stem: `/ckpt/detr-r50-e132384.pth` -> `detr-r50-e132384`."""
    text = _fmt(value)
    if isinstance(value, str) and "/" in value:
        text = PurePosixPath(value.rstrip("/")).stem or text
    return _NOT_IN_ID.sub("_", text)


def _collision(source: str, trial_id: str, first: dict[str, Any], second: dict[str, Any]) -> "SweepError":
    """The error for two different trials that would get the same id, naming the values."""
    from detsweep.config import SweepError

    key = next(k for k, v in second.items() if first.get(k) != v)
    a, b = first.get(key), second[key]
    hint = " (a path reads as its file stem)" if "/" in f"{a}{b}" else ""
    return SweepError(f"{source}: grid: two different trials would share the id {trial_id!r}: grid.{key} values "
                      f"{a!r} and {b!r} both read {id_value(b)!r} in a trial id{hint}; make the values "
                      f"distinguishable")


def expand(sweep: "Sweep") -> list["TrialConfig"]:
    """Every complete trial of the sweep, in grid order, deduplicated by trial id.

    Pruned: LoRA keys outside `lora_only`; model keys of the other family; regimes a model
    family does not list in `model.<family>.regimes` (Faster R-CNN has no LoRA at all).
    Trial id: `<model label>-<regime>[-r<rank>-<placement>]`, then one part per other varying
    axis, sorted by dotted key so that the YAML's key order never changes an id (`--resume`).
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
        extra: dict[str, str] = {}  # dotted key -> id part, for the varying axes
        chosen: dict[str, Any] = {}
        for (key, _), value in zip(axes, values):
            if not _relevant(key, family, regime):
                continue
            cfg = _apply_axis(cfg, key, value, where=f"grid.{key}")
            chosen[key] = value
            if key in varying and key not in _ALWAYS_IN_ID:
                extra[key] = f"{key.rsplit('.', 1)[-1]}{id_value(value)}"
        id_parts = [model_label(model, getattr(cfg.model, family).backbone), regime]
        if regime == "lora_only":
            id_parts += [f"r{cfg.lora.rank}", cfg.lora.placement]
        trial_id = "-".join(id_parts + [extra[k] for k in sorted(extra)])
        if trial_id in trials:
            if any(trials[trial_id].axes.get(k) != v for k, v in chosen.items()):
                raise _collision(sweep.source, trial_id, trials[trial_id].axes, chosen)
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


def most_at_once(trials: list["TrialConfig"], cluster: dict[str, float]) -> int:
    """How many trials the cluster runs at once: as many as the least demanding trial allows,
    at most all of them; 0 when no trial fits."""
    return min(max(fits(t, cluster) for t in trials), len(trials))


def max_concurrent(trials: list["TrialConfig"], cluster: dict[str, float]) -> int:
    """Tune's `max_concurrent_trials` computed from `cluster`: `most_at_once`, at least 1.
    Ray's scheduler still keeps bigger trials waiting for their workers' resources, and the
    trial actors hold almost nothing, so a mixed grid never over-subscribes."""
    return max(1, most_at_once(trials, cluster))


def unfit(trials: list["TrialConfig"], cluster: dict[str, float],
          nodes: list[dict[str, float]] | None = None) -> list["TrialConfig"]:
    """The trials that `cluster` (its total resources) cannot run even once, or, given its `nodes`'
    resources, whose DDP worker is bigger than every node: Train would wait for their workers."""
    return [t for t in trials if fits(t, cluster) == 0 or (nodes is not None and not worker_fits_a_node(t, nodes))]


def worker_fits_a_node(trial: "TrialConfig", nodes: list[dict[str, float]]) -> bool:
    """Whether one DDP worker of `trial` (one placement-group bundle) fits on some node."""
    r = trial.resources
    return any(node.get("CPU", 0.0) >= r.cpus_per_worker and node.get("GPU", 0.0) >= r.gpus_per_worker
               for node in nodes)


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


def plain_trials(trials: list["TrialConfig"]) -> list[dict[str, Any]]:
    """Each trial's id and config as plain JSON values (tuples become lists)."""
    return json.loads(json.dumps([{"trial_id": t.trial_id, "config": t.to_dict()} for t in trials]))


_ABSENT = object()  # a key one of two configs lacks


def _shown(value: Any) -> str:
    return "absent" if value is _ABSENT else repr(value)


def _first_difference(old: Any, new: Any, key: str = "") -> tuple[str, Any, Any] | None:
    """(dotted key, old value, new value) of the first place where two JSON values differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        for k in [*new, *(k for k in old if k not in new)]:
            found = _first_difference(old.get(k, _ABSENT), new.get(k, _ABSENT), f"{key}.{k}" if key else k)
            if found:
                return found
        return None
    return None if old == new else (key, old, new)


# Trial config sections a resumed run may change: how failures are handled, not what a trial is.
RESUME_MAY_CHANGE = ("fault_tolerance",)


def trials_change(saved: list[dict[str, Any]], trials: list["TrialConfig"]) -> str | None:
    """How `trials` differ from a saved trial list (order aside, `RESUME_MAY_CHANGE` sections
    aside), in a few words; None if they don't."""

    def what(config: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in config.items() if k not in RESUME_MAY_CHANGE}

    old = {t["trial_id"]: what(t["config"]) for t in saved}
    new = {t["trial_id"]: what(t["config"]) for t in plain_trials(trials)}
    gone = [tid for tid in old if tid not in new]
    if gone:
        return f"trial {gone[0]!r} is no longer in it"
    added = [tid for tid in new if tid not in old]
    if added:
        return f"trial {added[0]!r} is new"
    for tid, config in new.items():
        found = _first_difference(old[tid], config)
        if found:
            key, was, now = found
            return f"trial {tid!r}: {key} was {_shown(was)}, is now {_shown(now)}"
    return None

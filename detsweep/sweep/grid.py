"""Grid expansion in Python, not inside Tune: `expand(sweep)` gives the deduplicated list of
complete trial configs, with meaningless combinations pruned and stable, readable trial ids."""
from __future__ import annotations

import dataclasses
import itertools
import re
from pathlib import PurePosixPath
from typing import Any

from detsweep.models import registry
from detsweep.storage import sweep_root
from detsweep.sweep.bases import base_chain, train_run
from detsweep.sweep.load import apply_axis
from detsweep.sweep.rules import check_resources, lora_targets_violation
from detsweep.sweep.spec import Sweep, TrialConfig, has_adapters, resources_for
from detsweep.sweep.typed import SweepError

# Axes that only mean something for one model family or one regime.
_FAMILY_PREFIX = {f"model.{family}.": family for family in registry.FAMILIES}
_ALWAYS_IN_ID = ("lora.rank", "lora.placement")  # a LoRA trial's id always names its rank and placement
_NOT_IN_ID = re.compile(r"[^A-Za-z0-9._=-]+")  # trial ids name folders: these runs become `_`


def _relevant(key: str, family: str, regime: str, adapters: bool | None = None) -> bool:
    """Whether axis `key` means something for a trial; `adapters`: the trial has LoRA adapters (None: it is
    lora_only)."""
    if key.startswith("lora."):
        return regime == "lora_only" if adapters is None else adapters
    if key.startswith("two_stage."):
        return regime == "two_stage"
    for prefix, fam in _FAMILY_PREFIX.items():
        if key.startswith(prefix):
            return family == fam
    return True


def model_label(model: str, backbone: str) -> str:
    """The model's name as it runs: `detr_r50` with a resnet18 backbone is `detr_r18`, with a ViT one
    `detr_dinov2_vits14`."""
    if not backbone.startswith("resnet"):
        return model.replace("r50", backbone)
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


def _collision(source: str, trial_id: str, first: dict[str, Any], second: dict[str, Any]) -> SweepError:
    """The error for two different trials that would get the same id, naming the values."""
    key = next(k for k, v in second.items() if first.get(k) != v)
    a, b = first.get(key), second[key]
    hint = " (a path reads as its file stem)" if "/" in f"{a}{b}" else ""
    return SweepError(f"{source}: grid: two different trials would share the id {trial_id!r}: grid.{key} values "
                      f"{a!r} and {b!r} both read {id_value(b)!r} in a trial id{hint}; make the values "
                      f"distinguishable")


def expand(sweep: Sweep) -> list[TrialConfig]:
    """Every complete trial of the sweep, in grid order and then `extra_trials`, deduplicated by trial id.

    Pruned: LoRA keys outside `lora_only` (and a two_stage into it); `two_stage.*` outside two_stage;
    model keys of the other family; regimes a model family does not list in `model.<family>.regimes`;
    LoRA placements that adapt nothing in the trial's model (`registry.placement_fits`: `box_head` is
    Faster R-CNN's, `backbone_attention` needs a ViT backbone). `lora.targets` patterns are checked on
    each trial's real model. An extra trial that would be pruned is an error.
    Trial id: `<model label>-<regime>[-r<rank>-<placement>]`, then one part per other varying
    axis, sorted by dotted key so that the YAML's key order never changes an id (`--resume`).
    """
    root = sweep_root(sweep.storage, sweep.name)
    trials: dict[str, TrialConfig] = {}
    _add_grid(sweep, sweep.grid, "grid", root, trials)
    for i, point in enumerate(sweep.extra_trials):
        where = f"extra_trials[{i}]"
        if not _add_grid(sweep, {k: (v,) for k, v in point.items()}, where, root, trials, name_every_key=True):
            raise SweepError(f"{sweep.source}: {where}: this trial is pruned: its regime is not in "
                             f"model.<family>.regimes, or its lora.placement adapts nothing in its model")
    if not trials:
        raise SweepError(f"{sweep.source}: grid: no trial is left after pruning; check grid.regime "
                         f"against model.<family>.regimes")
    return [_with_base(t, sweep, root) for t in trials.values()]


def _add_grid(sweep: Sweep, grid: dict[str, tuple[Any, ...]], where: str, root: str,
              trials: dict[str, TrialConfig], name_every_key: bool = False) -> int:
    """Add the trials of `grid`'s product to `trials` (by id); returns how many of its points made a trial.
    `name_every_key`: an extra trial's id names every key it sets (its backbone is in the model label), so it
    never takes the id of a grid trial it differs from."""
    models = grid.get("model", ("detr_r50",))
    regimes = grid.get("regime", ("full",))
    axes = [(k, v) for k, v in grid.items() if k not in ("model", "regime")]
    varying = ({k for k, _ in axes if not k.endswith(".backbone")} if name_every_key
               else {k for k, v in axes if len(v) > 1})
    made = 0
    for model, regime, *values in itertools.product(models, regimes, *(v for _, v in axes)):
        if regime not in getattr(sweep.model, registry.MODELS[model]).regimes:
            continue
        # LoRA axes last: whether a two_stage trial has adapters depends on its two_stage.stage2.regime axis
        point = sorted(zip((k for k, _ in axes), values), key=lambda kv: kv[0].startswith("lora."))
        trial = _trial(sweep, model, regime, point, varying, where, root)
        if trial is None:
            continue
        made += 1
        if trial.trial_id in trials:
            first = trials[trial.trial_id]
            if any(first.axes.get(k) != v for k, v in trial.axes.items()):
                raise _collision(sweep.source, trial.trial_id, first.axes, trial.axes)
            continue  # the same trial again: an axis that does not apply here
        trials[trial.trial_id] = trial
    return made


def _trial(sweep: Sweep, model: str, regime: str, point: list[tuple[str, Any]], varying: set[str], where: str,
           root: str) -> TrialConfig | None:
    """The trial of one grid point, or None when it is pruned; its rules between keys are checked."""
    family = registry.MODELS[model]
    cfg, chosen, extra = sweep, {}, {}  # extra: dotted key -> id part, for the varying axes
    for key, value in point:
        if not _relevant(key, family, regime, has_adapters(regime, cfg.two_stage)):
            continue
        cfg = apply_axis(cfg, key, value, where=f"{where}.{key}")
        chosen[key] = value
        if key in varying and key not in _ALWAYS_IN_ID:
            extra[key] = f"{key.rsplit('.', 1)[-1]}{id_value(value)}"
    backbone = getattr(cfg.model, family).backbone
    adapters = has_adapters(regime, cfg.two_stage)
    if adapters and not (cfg.lora.targets or registry.placement_fits(cfg.lora.placement, family, backbone)):
        return None  # e.g. box_head on DETR, backbone_attention on a ResNet: the placement adapts nothing there
    id_parts = [model_label(model, backbone), regime]
    if adapters:
        id_parts += [f"r{cfg.lora.rank}", "targets" if cfg.lora.targets else id_value(cfg.lora.placement)]
    trial_id = "-".join(id_parts + [extra[k] for k in sorted(extra)])
    _check_trial(sweep, cfg, model, regime, adapters, trial_id, where)
    resources = resources_for(cfg, regime) if regime in cfg.resources_by_regime else cfg.resources
    check_resources(resources, f"resources (trial {trial_id})", sweep.source)
    assert regime in registry.FAMILY_REGIMES[family], (family, regime)  # the loader's `regimes` rule
    return TrialConfig(
        sweep=sweep.name, trial_id=trial_id, model=model, family=family, regime=regime,
        data=cfg.data, detector=getattr(cfg.model, family),
        lora=cfg.lora if adapters else None, train=cfg.train, eval=cfg.eval,
        resources=resources, fault_tolerance=cfg.fault_tolerance, storage=root, axes=chosen,
        two_stage=cfg.two_stage if regime == "two_stage" else None,
    )


def _check_trial(sweep: Sweep, cfg: Sweep, model: str, regime: str, adapters: bool, trial_id: str,
                 where: str) -> None:
    """Rules of one trial that need its regime: two_stage's epochs, `lora.targets` on its real model."""
    grid_keys = sweep.grid if where == "grid" else ()

    def key_of(key: str) -> str:
        return f"grid.{key}" if key in grid_keys else key

    if regime == "two_stage" and cfg.two_stage.stage1.epochs >= cfg.train.epochs:
        raise SweepError(f"{sweep.source}: {key_of('two_stage.stage1.epochs')}: {cfg.two_stage.stage1.epochs!r} "
                         f"must be < train.epochs ({cfg.train.epochs}): the second stage needs an epoch "
                         f"(trial {trial_id})")
    if adapters and cfg.lora.targets:
        why = lora_targets_violation(model, getattr(cfg.model, registry.MODELS[model]), cfg.lora.targets)
        if why is not None:
            raise SweepError(f"{sweep.source}: {key_of('lora.targets')}: {why} (trial {trial_id})")


def _with_base(trial: TrialConfig, sweep: Sweep, root: str) -> TrialConfig:
    """`trial` with `base_run` set when its weights are `base:NAME`: the Train run of that base."""
    chain = base_chain(sweep, trial.model, trial.detector, f"model.{trial.family}.weights", root_of(root))
    return dataclasses.replace(trial, base_run=train_run(chain[-1])) if chain else trial


def root_of(sweep_root: str) -> str:
    """The storage folder that holds a sweep's folder (`<storage>/<name>` -> `<storage>`)."""
    return sweep_root.rstrip("/").rsplit("/", 1)[0]



"""Pretrained bases: `model.<family>.weights: base:NAME` fine-tunes from a detector that detsweep first
pretrains on its own data (the synthetic source domain, say) and caches. NAME is a section of the sweep
file's `bases:` or a file `sweeps/bases/NAME.yaml`; the architecture is the trial's own, so a base is
keyed by its section, the trial's model settings and the synthetic generator's version. A base may start
from another (`weights: base:OTHER`), which is built first and whose key is part of its own.

The pretraining is a trial like any other (`base_trial`): the same worker, engine and Ray path, under
`<storage>/_bases/<NAME>-<key>/`, which `--fresh` of a sweep leaves alone. Torch-free and Ray-free.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import yaml

from detsweep.data.synthetic import GENERATOR_VERSION
from detsweep.models import registry
from detsweep.storage import join, train_run_name
from detsweep.sweep.resume import tune_restorable
from detsweep.sweep.spec import BaseConfig, EvalConfig, FaultToleranceConfig, Sweep, TrialConfig, data_defaults
from detsweep.sweep.typed import SweepError, build

PREFIX = "base:"
BASES_DIR = "_bases"  # under the sweep's storage, beside the sweeps' own folders
BASE_EVAL_EVERY = 10  # a long base (the long demo's: 100 epochs) still shows its progress every 10 epochs
SHIPPED = Path(__file__).resolve().parents[2] / "sweeps" / "bases"  # sweeps/bases/NAME.yaml


def base_name(weights: str) -> str | None:
    """NAME of `base:NAME`, else None."""
    return weights[len(PREFIX):] if weights.startswith(PREFIX) else None


def find_base(sweep: Sweep, name: str, key: str) -> BaseConfig:
    """The base NAME: the sweep file's `bases.NAME`, else `sweeps/bases/NAME.yaml`; `key` names the
    sweep key that uses it in errors."""
    if name in sweep.bases:
        base, where = sweep.bases[name], f"{sweep.source}: bases.{name}"
    else:
        path = SHIPPED / f"{name}.yaml"
        if not path.is_file():
            known = sorted({*sweep.bases, *(p.stem for p in SHIPPED.glob("*.yaml"))})
            raise SweepError(f"{sweep.source}: {key}: base {name!r} is neither in the sweep's `bases:` nor a file "
                             f"sweeps/bases/{name}.yaml; known bases are {known}")
        try:
            raw = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise SweepError(f"{path}: not valid YAML: {getattr(e, 'problem', e)}") from None
        base, where = build(BaseConfig, raw, "", str(path)), str(path)
        base = dataclasses.replace(base, data=data_defaults(base.data))
    if base.model is not None and base.model not in registry.MODELS:
        raise SweepError(f"{where}: model: {base.model!r} is not one of {list(registry.MODELS)}")
    return base


def base_key(base: BaseConfig, model: str, detector: Any, upstream: TrialConfig | None = None) -> str:
    """12 hex digits naming what the pretraining depends on: the base's section, the architecture it
    trains (the trial's model settings, whatever it starts from), the synthetic generator version and,
    when it starts from another base, that base's own key (in its trial id)."""
    arch = {k: v for k, v in dataclasses.asdict(detector).items() if k not in ("weights", "regimes")}
    section = {k: v for k, v in dataclasses.asdict(base).items() if not (k == "model" and v is None)}
    parts = {"base": section, "model": model, "arch": arch, "generator": GENERATOR_VERSION}
    if upstream is not None:  # only then: the keys of bases without one stay what they were (their caches)
        parts["upstream"] = upstream.trial_id
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def base_root(storage_root: str, name: str, key: str) -> str:
    """`<storage>/_bases/<NAME>-<key>`: the base's own sweep folder (results, Tune and Train runs)."""
    return join(storage_root, BASES_DIR, f"{name}-{key}")


def base_trial(model: str, detector: Any, base: BaseConfig, name: str, key: str, storage_root: str,
               upstream: TrialConfig | None = None) -> TrialConfig:
    """The pretraining trial of base `name` for `model` with the settings `detector`: regime `full`, the
    base's data, training and resources, starting from the base's own `weights` (`upstream`'s latest
    checkpoint when those are another base's)."""
    return TrialConfig(
        sweep=f"{BASES_DIR}/{name}", trial_id=f"base-{name}-{key}", model=model, family=registry.MODELS[model],
        regime="full", data=base.data, detector=dataclasses.replace(detector, weights=base.weights),
        # Evaluated four times, and at least every BASE_EVAL_EVERY epochs (progress you can watch: the console
        # prints at evaluations): the base is a means, its AP a log line.
        lora=None, train=base.train,
        eval=EvalConfig(visuals=False, every=max(1, min(BASE_EVAL_EVERY, base.train.epochs // 4))),
        resources=base.resources, fault_tolerance=FaultToleranceConfig(), storage=base_root(storage_root, name, key),
        axes={}, base_run=None if upstream is None else train_run(upstream))


def base_chain(sweep: Sweep, model: str, detector: Any, key: str, storage_root: str) -> list[TrialConfig]:
    """The pretraining trials that weights `detector.weights` = `base:NAME` of `model` need, the one to build
    first first: NAME's, after those of the base its own `weights: base:OTHER` names. OTHER is built as its
    `model:` (default: `model`) with the sweep's `model.<family>` settings; e.g. the demo's DETR base starts
    from the Faster R-CNN base's backbone. `key` names the sweep key that uses NAME in errors. [] without a base."""
    name = base_name(detector.weights)
    return [] if name is None else _chain(sweep, name, find_base(sweep, name, key), model, detector, key,
                                          storage_root, ())


def _chain(sweep: Sweep, name: str, base: BaseConfig, model: str, detector: Any, key: str, storage_root: str,
           seen: tuple[str, ...]) -> list[TrialConfig]:
    """`base_chain` of base `name` (its section `base`, already read), `seen` the bases that start from it."""
    if base.model is not None and base.model != model:
        raise SweepError(f"{sweep.source}: {key}: base {name!r} is a {base.model} (its `model:`), but a {model} "
                         f"starts from it; name a base of {model}")
    chain: list[TrialConfig] = []
    up_name = base_name(base.weights)
    if up_name is not None:
        up_key = f"bases.{name}.weights"
        if up_name in (*seen, name):
            raise SweepError(f"{sweep.source}: {up_key}: base {up_name!r} starts from itself "
                             f"({' -> '.join((*seen, name, up_name))}); one of these bases needs other weights")
        up = find_base(sweep, up_name, up_key)
        up_model = up.model or model
        up_detector = detector if up_model == model else getattr(sweep.model, registry.MODELS[up_model])
        chain = _chain(sweep, up_name, up, up_model, dataclasses.replace(up_detector, weights=base.weights), up_key,
                       storage_root, (*seen, name))
    upstream = chain[-1] if chain else None
    own = base_trial(model, detector, base, name, base_key(base, model, detector, upstream), storage_root, upstream)
    return [*chain, own]


def name_of(base: TrialConfig) -> str:
    """NAME of a pretraining trial made by `base_trial` (its `sweep` is `_bases/NAME`)."""
    return base.sweep[len(BASES_DIR) + 1:]


def base_trials(trials: list[TrialConfig], sweep: Sweep, storage_root: str) -> list[TrialConfig]:
    """The distinct pretraining trials that `trials` need, in the order to build them (a base after the base
    it starts from, otherwise by first use)."""
    out: dict[str, TrialConfig] = {}
    for t in trials:
        for base in base_chain(sweep, t.model, t.detector, f"model.{t.family}.weights", storage_root):
            out.setdefault(base.trial_id, base)
    return list(out.values())


def train_run(base: TrialConfig) -> str:
    """The base's Ray Train run folder: its checkpoints, the latest of which holds the weights."""
    return join(base.storage, train_run_name(base.trial_id))


def is_built(base: TrialConfig) -> bool:
    """Whether the base's pretraining finished (`ok` in its results.parquet) and left a checkpoint."""
    from detsweep.checkpoint import latest_checkpoint
    from detsweep.results import ResultsStore

    return base.trial_id in ResultsStore(base.storage).trial_ids("ok") and latest_checkpoint(train_run(base)) is not None


def interrupted(base: TrialConfig) -> bool:
    """Whether an earlier pretraining of the base, not built, left a Tune run that `Tuner.restore` can take up
    (a killed driver, a stopped session): the next run resumes it (cluster/bases.py). A folder without a whole
    tuner.pkl (killed in the moment Tune was starting) starts over."""
    return tune_restorable(base.storage)


def describe(base: TrialConfig) -> str:
    """One line for the plan: what the base is and whether it is cached."""
    d, t = base.data, base.train
    what = (f"{base.model} ({base.detector.backbone}) from weights {base.detector.weights!r}, {t.epochs} epochs on "
            f"{d.kind} data ({getattr(d, 'domain', 'default')} domain, {d.train_images} images)")
    if is_built(base):
        state = f"cached in {base.storage}"
    elif interrupted(base):
        state = f"interrupted earlier, resumed from its last checkpoint in {base.storage}"
    else:
        state = f"pretrained first, into {base.storage}"
    return f"base {base.trial_id}: {what}; {state}"

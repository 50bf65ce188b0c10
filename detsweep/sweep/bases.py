"""Pretrained bases: `model.<family>.weights: base:NAME` fine-tunes from a detector that detsweep first
pretrains on its own data (the synthetic source domain, say) and caches. NAME is a section of the sweep
file's `bases:` or a file `sweeps/bases/NAME.yaml`; the architecture is the trial's own, so a base is
keyed by its section, the trial's model settings and the synthetic generator's version.

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
from detsweep.storage import join
from detsweep.storage import train_run_name
from detsweep.sweep.spec import BaseConfig, EvalConfig, FaultToleranceConfig, Sweep, TrialConfig, data_defaults
from detsweep.sweep.typed import SweepError, build

PREFIX = "base:"
BASES_DIR = "_bases"  # under the sweep's storage, beside the sweeps' own folders
SHIPPED = Path(__file__).resolve().parents[2] / "sweeps" / "bases"  # sweeps/bases/NAME.yaml


def base_name(weights: str) -> str | None:
    """NAME of `base:NAME`, else None."""
    return weights[len(PREFIX):] if weights.startswith(PREFIX) else None


def find_base(sweep: Sweep, name: str, key: str) -> BaseConfig:
    """The base NAME: the sweep file's `bases.NAME`, else `sweeps/bases/NAME.yaml`; `key` names the
    sweep key that uses it in errors."""
    if name in sweep.bases:
        return sweep.bases[name]
    path = SHIPPED / f"{name}.yaml"
    if not path.is_file():
        known = sorted({*sweep.bases, *(p.stem for p in SHIPPED.glob("*.yaml"))})
        raise SweepError(f"{sweep.source}: {key}: base {name!r} is neither in the sweep's `bases:` nor a file "
                         f"sweeps/bases/{name}.yaml; known bases are {known}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise SweepError(f"{path}: not valid YAML: {getattr(e, 'problem', e)}") from None
    base = build(BaseConfig, raw, "", str(path))
    return dataclasses.replace(base, data=data_defaults(base.data))


def base_key(base: BaseConfig, model: str, detector: Any) -> str:
    """12 hex digits naming what the pretraining depends on: the base's section, the architecture it
    trains (the trial's model settings, whatever it starts from) and the synthetic generator version."""
    arch = {k: v for k, v in dataclasses.asdict(detector).items() if k not in ("weights", "regimes")}
    text = json.dumps({"base": dataclasses.asdict(base), "model": model, "arch": arch,
                       "generator": GENERATOR_VERSION}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def base_root(storage_root: str, name: str, key: str) -> str:
    """`<storage>/_bases/<NAME>-<key>`: the base's own sweep folder (results, Tune and Train runs)."""
    return join(storage_root, BASES_DIR, f"{name}-{key}")


def base_trial(trial: TrialConfig, base: BaseConfig, name: str, key: str, storage_root: str) -> TrialConfig:
    """The pretraining trial of the base that `trial` fine-tunes from: the same model, regime `full`,
    the base's data, training and resources, starting from the base's own `weights`."""
    return TrialConfig(
        sweep=f"{BASES_DIR}/{name}", trial_id=f"base-{name}-{key}", model=trial.model, family=trial.family,
        regime="full", data=base.data, detector=dataclasses.replace(trial.detector, weights=base.weights),
        # Evaluated four times (progress you can watch): the base is a means, its AP a log line.
        lora=None, train=base.train, eval=EvalConfig(visuals=False, every=max(1, base.train.epochs // 4)),
        resources=base.resources,
        fault_tolerance=FaultToleranceConfig(), storage=base_root(storage_root, name, key), axes={}, base_run=None)


def base_trials(trials: list[TrialConfig], sweep: Sweep, storage_root: str) -> list[TrialConfig]:
    """The distinct pretraining trials that `trials` need, in first-use order."""
    out: dict[str, TrialConfig] = {}
    for t in trials:
        name = base_name(t.detector.weights)
        if name is None:
            continue
        base = find_base(sweep, name, f"model.{t.family}.weights")
        key = base_key(base, t.model, t.detector)
        out.setdefault(key, base_trial(t, base, name, key, storage_root))
    return list(out.values())


def train_run(base: TrialConfig) -> str:
    """The base's Ray Train run folder: its checkpoints, the latest of which holds the weights."""
    return join(base.storage, train_run_name(base.trial_id))


def is_built(base: TrialConfig) -> bool:
    """Whether the base's pretraining finished (`ok` in its results.parquet) and left a checkpoint."""
    from detsweep.checkpoint import latest_checkpoint
    from detsweep.results import ResultsStore

    return base.trial_id in ResultsStore(base.storage).trial_ids("ok") and latest_checkpoint(train_run(base)) is not None


def describe(base: TrialConfig) -> str:
    """One line for the plan: what the base is and whether it is cached."""
    d, t = base.data, base.train
    what = (f"{base.model} ({base.detector.backbone}) from weights {base.detector.weights!r}, {t.epochs} epochs on "
            f"{d.kind} data ({getattr(d, 'domain', 'default')} domain, {d.train_images} images)")
    state = f"cached in {base.storage}" if is_built(base) else f"pretrained first, into {base.storage}"
    return f"base {base.trial_id}: {what}; {state}"

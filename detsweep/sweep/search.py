"""The search space of `search:`: its entries parsed and checked before Ray starts, the conditional space
as Optuna's define-by-run function (handed to Ray Tune's `OptunaSearch`), and a sampled point turned
into its `TrialConfig` with a readable, stable id such as `s007-detr_r18-lora_only-r8-a16-lr3.2e-05`.

The space is conditional the way grid pruning is (`grid._relevant`): `lora.*` is sampled only under
`lora_only`, `model.<family>.*` only for that family, a regime only where `model.<family>.regimes` has
it. Imports neither optuna, torch nor ray: the define-by-run function only calls the `suggest_*`
methods of the trial object it is given, and the Tune trainable and the driver both turn the sampled
point into a trial with `sampled_trial`.
"""
from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass
from typing import Any

from detsweep.models import registry
from detsweep.storage import sweep_root
from detsweep.sweep.grid import _relevant, _with_base, id_value, model_label
from detsweep.sweep.load import apply_axis, check_combinations
from detsweep.sweep.rules import check_resources, check_values
from detsweep.sweep.spec import Sweep, TrialConfig, has_adapters, resources_for
from detsweep.sweep.typed import SweepError

DISTRIBUTIONS = ("choice", "uniform", "loguniform", "int")
# What a search samples: what a trial trains. Not the data or the weights (prepared before Ray starts),
# nor the resources (they decide what fits on the cluster).
SEARCHABLE_PREFIXES = ("lora.", "train.", "model.detr.", "model.faster_rcnn.")
NOT_SEARCHABLE = ("model.detr.weights", "model.faster_rcnn.weights", "model.detr.regimes",
                  "model.faster_rcnn.regimes", "train.seed")
_ID_NAMES = {"lora.rank": "r", "lora.alpha": "a", "lora.dropout": "do", "lora.placement": ""}
_ID_FIRST = ("lora.rank", "lora.alpha", "lora.placement")  # after model and regime, as grid ids read


@dataclass(frozen=True)
class Dimension:
    """One entry of `search.space`: `choice` values, or the bounds (low, high) of a range."""

    key: str
    kind: str  # one of DISTRIBUTIONS
    values: tuple[Any, ...]

    def suggest(self, trial: Any, name: str | None = None) -> Any:
        """A value from Optuna's `trial` (define-by-run), under `name` (default: the key)."""
        name = name or self.key
        if self.kind == "choice":
            return trial.suggest_categorical(name, list(self.values))
        low, high = self.values
        if self.kind == "int":
            return trial.suggest_int(name, low, high)
        return trial.suggest_float(name, low, high, log=self.kind == "loguniform")

    def id_text(self, value: Any) -> str:
        """`value` in a trial id: ranges at two significant digits (`lr3.2e-05`), choices as grid ids write them."""
        name = _ID_NAMES.get(self.key, self.key.rsplit(".", 1)[-1])
        text = id_value(f"{value:.2g}") if self.kind in ("uniform", "loguniform") else id_value(value)
        return f"{name}{text}"

    def describe(self) -> str:
        shown = ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in self.values)
        return f"{self.kind} [{shown}]"


def _renamed(err: SweepError, source: str, key: str) -> SweepError:
    """`check_values` names a checked grid value `grid.<key>`; here the value is a search entry's."""
    text = str(err)
    return SweepError(text.replace(f"{source}: grid.{key}:", f"{source}: search.space.{key}:", 1))


def _field_type(sweep: Sweep, key: str) -> Any:
    """The annotation of the dotted `key`'s field (float, int, a Literal, ...); None for an unknown key."""
    obj: Any = sweep
    *parents, last = key.split(".")
    for part in parents:
        obj = getattr(obj, part, None)
        if not dataclasses.is_dataclass(obj):
            return None
    return typing.get_type_hints(type(obj)).get(last)


def _dimension(sweep: Sweep, key: str, entry: Any, check_paths: bool) -> Dimension:
    """One space entry parsed and checked: its distribution, bounds, values and type."""
    src, where = sweep.source, f"search.space.{key}"
    if key not in ("model", "regime") and (not key.startswith(SEARCHABLE_PREFIXES) or key in NOT_SEARCHABLE):
        raise SweepError(f"{src}: {where}: not a key a search samples; use 'model', 'regime' or a dotted key under "
                         f"{list(SEARCHABLE_PREFIXES)} (not {list(NOT_SEARCHABLE)}); data, weights and resources "
                         f"are fixed in the sweep file or the grid")
    if not isinstance(entry, dict) or len(entry) != 1 or next(iter(entry)) not in DISTRIBUTIONS:
        raise SweepError(f"{src}: {where}: {entry!r} is not a distribution; use one of "
                         f"{[f'{{{d}: [...]}}' for d in DISTRIBUTIONS]}")
    ((kind, values),) = entry.items()
    if not isinstance(values, list) or not values:
        raise SweepError(f"{src}: {where}.{kind}: {values!r} must be a non-empty list")
    if kind == "choice":
        bad = [v for v in values if not isinstance(v, (str, int, float, bool)) and v is not None]
        if bad:
            raise SweepError(f"{src}: {where}.choice: {bad[0]!r} must be a number, a string, a bool or null")
        if len(set(map(repr, values))) != len(values):
            raise SweepError(f"{src}: {where}.choice: {values!r} has repeated values")
        allowed = {"model": registry.MODELS, "regime": registry.REGIMES}.get(key)
        for v in values:
            if allowed is not None and v not in allowed:
                raise SweepError(f"{src}: {where}.choice: {v!r} is not one of {list(allowed)}")
        dim = Dimension(key, kind, tuple(values))
    else:
        dim = _range(sweep, key, kind, values)
    if key not in ("model", "regime"):
        for v in dim.values:  # every value valid where it lands: type and value rules, as grid values are
            try:
                check_values(apply_axis(sweep, key, v, where=where), check_paths, grid_key=key)
            except SweepError as e:
                raise _renamed(e, src, key) from None
    return dim


def _range(sweep: Sweep, key: str, kind: str, values: list[Any]) -> Dimension:
    """A `uniform` / `loguniform` / `int` entry: two numbers, low < high, on a field of the right type."""
    src, where = sweep.source, f"search.space.{key}.{kind}"
    if key in ("model", "regime"):
        raise SweepError(f"{src}: {where}: {key} takes only {{choice: [...]}}")
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    if len(values) != 2 or not numbers or not all(math.isfinite(v) for v in values):
        raise SweepError(f"{src}: {where}: {values!r} must be [low, high], two finite numbers")
    low, high = values
    if low >= high:
        raise SweepError(f"{src}: {where}: low {low!r} must be < high {high!r}")
    if kind == "loguniform" and low <= 0:
        raise SweepError(f"{src}: {where}: low {low!r} must be > 0 for a log scale")
    field = _field_type(sweep, key)
    if field is None:
        apply_axis(sweep, key, low, where=f"search.space.{key}")  # raises: the unknown key, and the known ones
    inner = [a for a in typing.get_args(field) if a is not type(None)] or [field]
    if kind == "int" and (int not in inner or not all(isinstance(v, int) for v in values)):
        raise SweepError(f"{src}: {where}: {{int: [low, high]}} needs whole numbers on a whole-number key, got "
                         f"{values!r} for a key of type {field}")
    if kind != "int" and float not in inner:
        hint = "; use {int: [low, high]}" if int in inner else "; use {choice: [...]}"
        raise SweepError(f"{src}: {where}: {kind} samples real numbers, but {key} is of type {field}{hint}")
    return Dimension(key, kind, (low, high) if kind == "int" else (float(low), float(high)))


@dataclass(frozen=True)
class Space:
    """A sweep's checked search space; calling it is the define-by-run function (`OptunaSearch(space=...)`)."""

    sweep: Sweep
    dims: tuple[Dimension, ...]  # sorted by key; model and regime are the first when sampled
    model: str  # the model when the search does not sample it (the grid's, else detr_r50)
    regime: str  # likewise (the grid's, else full)
    regimes: dict[str, tuple[str, ...]]  # the regimes the search picks for each family it can pick

    @property
    def by_key(self) -> dict[str, Dimension]:
        return {d.key: d for d in self.dims}

    @property
    def models(self) -> tuple[str, ...]:
        return self.by_key["model"].values if "model" in self.by_key else (self.model,)

    def regime_param(self, family: str) -> str:
        """Optuna's name for the regime of `family`: one categorical keeps its choices in every trial, so
        families that pick from different regimes get one each (`regime@faster_rcnn`)."""
        families = {registry.MODELS[m] for m in self.models}
        return "regime" if len({self.regimes[f] for f in families}) == 1 else f"regime@{family}"

    def __call__(self, trial: Any) -> dict[str, Any]:
        """Define-by-run: suggest the trial's values (recorded by name); the returned constants join its
        Tune config, so the config is the point plus its sample number and trial id."""
        point = self.sample(trial)
        return {"sample": trial.number, "trial_id": self.trial_id(trial.number, point)}

    def sample(self, trial: Any) -> dict[str, Any]:
        """The sampled point: model and regime first, then each key that applies to them."""
        dims, point = self.by_key, {}
        model = dims["model"].suggest(trial) if "model" in dims else self.model
        if "model" in dims:
            point["model"] = model
        family = registry.MODELS[model]
        regime = self.regime
        if "regime" in dims:
            name = self.regime_param(family)
            regime = point[name] = Dimension("regime", "choice", self.regimes[family]).suggest(trial, name)
        for d in self.dims:
            if d.key not in ("model", "regime") and _relevant(d.key, family, regime):
                point[d.key] = d.suggest(trial)
        return point

    def _resolve(self, point: dict[str, Any]) -> tuple[str, str, str, Sweep, dict[str, Any]]:
        """(model, family, regime, the sweep with the grid's and the point's values, the trial's axes)."""
        model = point.get("model", self.model)
        family = registry.MODELS[model]
        regime = point.get(self.regime_param(family), point.get("regime", self.regime))
        cfg, axes = self.sweep, {}
        fixed = [(k, v[0]) for k, v in self.sweep.grid.items() if k not in ("model", "regime")]
        sampled = [(d.key, point[d.key]) for d in self.dims if d.key in point and d.key not in ("model", "regime")]
        for key, value in fixed + sampled:
            if _relevant(key, family, regime):
                cfg = apply_axis(cfg, key, value, where=f"search.space.{key}")
                axes[key] = value
        return model, family, regime, cfg, axes

    def trial_id(self, number: int, point: dict[str, Any]) -> str:
        """`s<number>-<model label>-<regime>[-r<rank>]`, then each sampled value: LoRA's first, the others
        by dotted key, so the YAML's order never changes an id."""
        model, family, regime, cfg, _ = self._resolve(point)
        parts = [f"s{number:03d}", model_label(model, getattr(cfg.model, family).backbone), regime]
        dims = self.by_key
        keys = [k for k in point if k in dims and k not in ("model", "regime")]
        if regime == "lora_only" and "lora.rank" not in keys:
            parts.append(f"r{cfg.lora.rank}")  # a LoRA trial's id always names its rank
        keys.sort(key=lambda k: (_ID_FIRST.index(k) if k in _ID_FIRST else len(_ID_FIRST), k))
        return "-".join(parts + [dims[k].id_text(point[k]) for k in keys])

    def trial(self, point: dict[str, Any], trial_id: str) -> TrialConfig:
        """The complete trial of `point` under `trial_id`: what `expand` gives a grid trial."""
        model, family, regime, cfg, axes = self._resolve(point)
        resources = resources_for(cfg, regime) if regime in cfg.resources_by_regime else cfg.resources
        check_resources(resources, f"resources (trial {trial_id})", cfg.source)
        root = sweep_root(cfg.storage, cfg.name)
        trial = TrialConfig(
            sweep=cfg.name, trial_id=trial_id, model=model, family=family, regime=regime, data=cfg.data,
            detector=getattr(cfg.model, family), lora=cfg.lora if has_adapters(regime, cfg.two_stage) else None,
            train=cfg.train, eval=cfg.eval, resources=resources, fault_tolerance=cfg.fault_tolerance, storage=root,
            axes=axes, two_stage=cfg.two_stage if regime == "two_stage" else None)
        return _with_base(trial, cfg, root)


def sampled_trial(space: Space, config: dict[str, Any]) -> TrialConfig:
    """The trial of a sampled Tune config (the point, `sample` and `trial_id`), on the driver or in the
    trainable. The id is recomputed from the point, so both sides agree on it."""
    trial_id = space.trial_id(config["sample"], config)
    assert trial_id == config["trial_id"], (trial_id, config["trial_id"])  # the same function made both
    return space.trial(config, trial_id)


def cells(space: Space) -> list[TrialConfig]:
    """One trial per model and regime the search can pick, every other key at the sweep's value: what a
    sampled trial holds (its resources), for the plan, the concurrency and trials.json."""
    out = []
    for model in space.models:
        for regime in space.regimes[registry.MODELS[model]]:
            point = {"model": model, space.regime_param(registry.MODELS[model]): regime}
            _, family, _, cfg, _ = space._resolve(point)
            out.append(space.trial(point, f"{model_label(model, getattr(cfg.model, family).backbone)}-{regime}"))
    return out


def parse_space(sweep: Sweep, *, check_paths: bool = True) -> Space:
    """`sweep.search.space`, checked: one SweepError line for the first bad entry (unknown key, bad
    distribution, low >= high, a choice the key does not allow, a key the search never samples)."""
    search, src = sweep.search, sweep.source
    if not isinstance(search.space, dict) or not search.space:
        raise SweepError(f"{src}: search.space: must map at least one key to a distribution, e.g. "
                         f"train.lr: {{loguniform: [1.0e-5, 3.0e-4]}}")
    for key, values in sweep.grid.items():
        if len(values) > 1:
            raise SweepError(f"{src}: grid.{key}: {len(values)} values with search: the grid fixes a search's keys "
                             f"(one value each); to search over them, use search.space.{key}: {{choice: [...]}}")
        if key in search.space:
            raise SweepError(f"{src}: search.space.{key}: also fixed by grid.{key}; keep one of them")
    dims = [_dimension(sweep, k, search.space[k], check_paths) for k in sorted(search.space)]
    dims.sort(key=lambda d: (("model", "regime").index(d.key) if d.key in ("model", "regime") else 2, d.key))
    model = sweep.grid.get("model", ("detr_r50",))[0]
    regime = sweep.grid.get("regime", ("full",))[0]
    space = Space(sweep, tuple(dims), model, regime, {})
    wanted = space.by_key["regime"].values if "regime" in space.by_key else (regime,)
    regimes = {}
    for m in space.models:
        family = registry.MODELS[m]
        regimes[family] = tuple(r for r in wanted if r in getattr(sweep.model, family).regimes)
        if not regimes[family]:
            key = "search.space.model" if "model" in space.by_key else "grid.model"
            raise SweepError(f"{src}: {key}: {m!r} runs none of the regimes the search picks ({list(wanted)}); "
                             f"model.{family}.regimes is {list(getattr(sweep.model, family).regimes)}")
    space = dataclasses.replace(space, regimes=regimes)
    _check_reachable(space)
    _check_combinations(space)
    return space


def _check_reachable(space: Space) -> None:
    """Every regime choice runs on some model the search picks, and every key is sampled somewhere."""
    src = space.sweep.source
    picked = {(registry.MODELS[m], r) for m in space.models for r in space.regimes[registry.MODELS[m]]}
    for r in space.by_key["regime"].values if "regime" in space.by_key else ():
        if not any(r == rr for _, rr in picked):
            raise SweepError(f"{src}: search.space.regime.choice: {r!r} is not a regime of any model the search "
                             f"picks ({list(space.models)}; see model.<family>.regimes)")
    for d in space.dims:
        if d.key not in ("model", "regime") and not any(_relevant(d.key, f, r) for f, r in picked):
            raise SweepError(f"{src}: search.space.{d.key}: never sampled: it applies to no model and regime the "
                             f"search picks ({sorted(picked)}); LoRA keys need lora_only, model.<family> keys "
                             f"that family")


def _check_combinations(space: Space) -> None:
    """Rules between keys (lr_drop_epoch <= epochs, ...) on every combination of the choices and bounds."""
    check_combinations(space.sweep, {d.key: space.by_key[d.key].values for d in space.dims}, "search.space")


def axis_values(space: Space) -> dict[str, list[Any]]:
    """Each sampled or grid-fixed dotted key and its possible values (bounds for ranges): for the
    results columns of keys that have none."""
    out = {k: list(v) for k, v in space.sweep.grid.items() if k not in ("model", "regime")}
    out.update({d.key: list(d.values) for d in space.dims if d.key not in ("model", "regime")})
    return out


class _Example:
    """A stand-in for Optuna's trial: the middle of each range, LoRA where it can be, for --dry-run's example id."""

    number = 7

    def suggest_categorical(self, name: str, choices: list[Any]) -> Any:
        return "lora_only" if "lora_only" in choices else choices[len(choices) // 2]

    def suggest_float(self, name: str, low: float, high: float, log: bool = False) -> float:
        return math.sqrt(low * high) if log else (low + high) / 2

    def suggest_int(self, name: str, low: int, high: int) -> int:
        return (low + high) // 2


def describe(space: Space, concurrency: int | None = None) -> str:
    """The space for `--dry-run`: how many trials are sampled, by what, each entry and an example id."""
    s = space.sweep.search
    lines = [f"{s.num_samples} trials sampled from this space (Optuna {s.sampler} sampler, seed {s.seed}), "
             f"objectives {', '.join(s.objectives)}" + (f", up to {concurrency} at once" if concurrency else "") + ":"]
    rows = [(k, f"fixed {v[0]} (grid)") for k, v in space.sweep.grid.items()]
    if "model" not in space.by_key and "model" not in space.sweep.grid:
        rows.insert(0, ("model", f"fixed {space.model}"))
    if "regime" not in space.by_key and "regime" not in space.sweep.grid:
        rows.insert(1, ("regime", f"fixed {space.regime}"))
    for d in space.dims:
        where = (" (under lora_only)" if d.key.startswith("lora.") else
                 next((f" ({f} models)" for f in registry.FAMILIES if d.key.startswith(f"model.{f}.")), ""))
        rows.append((d.key, d.describe() + where))
    width = max(len(k) for k, _ in rows)
    lines += [f"  {k.ljust(width)}  {text}" for k, text in rows]
    example = _Example()
    lines.append(f"trial ids read like {space.trial_id(example.number, space.sample(example))}")
    return "\n".join(lines)

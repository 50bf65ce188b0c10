"""Reading a sweep file: `yaml.safe_load` once, then typed sections (`spec.py`), value rules
(`rules.py`) and every grid value checked where it lands, all before Ray starts. Each error is one
`SweepError` line naming the file, the dotted key, the value and what is allowed."""
from __future__ import annotations

import dataclasses
import itertools
import typing
from pathlib import Path
from typing import Any

import yaml

from detsweep.models import registry
from detsweep.sweep.bases import base_chain, name_of
from detsweep.sweep.rules import check_search_and_cost, check_values, combination_violation, in_combination_rules
from detsweep.sweep.spec import Sweep, data_defaults
from detsweep.sweep.typed import SweepError, build, coerce


def parse_sweep(raw: Any, source: str = "<memory>", *, check_paths: bool = True) -> Sweep:
    """Validate a parsed YAML document into a `Sweep`. Raises `SweepError`."""
    if not isinstance(raw, dict):
        raise SweepError(f"{source}: the sweep file must be a mapping, got {type(raw).__name__}")
    raw = dict(raw)
    sched = raw.get("scheduler")
    if isinstance(sched, str) or sched is None:
        raw["scheduler"] = {"kind": sched or "none"}
    grid = raw.get("grid") or {}
    if not isinstance(grid, dict):
        raise SweepError(f"{source}: grid: {grid!r} must be a mapping of dotted keys to lists")
    raw["grid"] = {}
    sweep = dataclasses.replace(build(Sweep, raw, "", source), source=source)
    sweep = dataclasses.replace(sweep, data=data_defaults(sweep.data), bases={
        name: dataclasses.replace(b, data=data_defaults(b.data)) for name, b in sweep.bases.items()})
    check_values(sweep, check_paths)
    check_search_and_cost(sweep)  # the search space itself: sweep/search.py, which sees the grid
    sweep = dataclasses.replace(sweep, grid=_check_grid(grid, sweep, check_paths))
    for i, point in enumerate(sweep.extra_trials):  # each value checked where it lands, as a grid value is
        try:
            _check_grid({key: [value] for key, value in point.items()}, sweep, check_paths)
        except SweepError as e:  # the rules name grid keys; here they are this extra trial's
            raise SweepError(str(e).replace(f"{sweep.source}: grid.", f"{sweep.source}: extra_trials[{i}].", 1)
                             ) from None
    _check_bases(sweep, check_paths)
    return sweep


def _check_bases(sweep: Sweep, check_paths: bool) -> None:
    """Every `base:NAME` the sweep uses (as a value or a grid value of `model.<family>.weights`, or as a base's
    own `weights`) names a base, the chain has no cycle and no base of another model, and each base's own
    sections follow the rules (errors read `<file>: bases.NAME: <key>: ...`)."""
    for model, family in registry.MODELS.items():
        key = f"model.{family}.weights"
        detector = getattr(sweep.model, family)
        for where, weights in [(key, detector.weights), *((f"grid.{key}", w) for w in sweep.grid.get(key, ()))]:
            for base in base_chain(sweep, model, dataclasses.replace(detector, weights=weights), where, ""):
                check_values(dataclasses.replace(sweep, data=base.data, train=base.train, resources=base.resources,
                                                 source=f"{sweep.source}: bases.{name_of(base)}"),
                             check_paths)


def _check_grid(grid: dict[str, Any], sweep: Sweep, check_paths: bool) -> dict[str, tuple[Any, ...]]:
    out = {}
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise SweepError(f"{sweep.source}: grid.{key}: {values!r} must be a non-empty list")
        if key == "model":
            for v in values:
                if v not in registry.MODELS:
                    raise SweepError(f"{sweep.source}: grid.model: {v!r} is not one of {list(registry.MODELS)}")
        elif key == "regime":
            for v in values:
                if v not in registry.REGIMES:
                    raise SweepError(f"{sweep.source}: grid.regime: {v!r} is not one of {list(registry.REGIMES)}")
        else:
            for v in values:  # each value must be valid where it lands, by type and by value
                check_values(apply_axis(sweep, key, v, where=f"grid.{key}"), check_paths, grid_key=key)
        if len(set(map(repr, values))) != len(values):
            raise SweepError(f"{sweep.source}: grid.{key}: {values!r} has repeated values")
        out[key] = tuple(values)
    _check_combinations(sweep, out)
    return out


def _check_combinations(sweep: Sweep, grid: dict[str, tuple[Any, ...]]) -> None:
    """Each grid value above was checked alone; rules between keys (`train.lr_drop_epoch` <=
    `train.epochs`, the official checkpoint's DETR shape, ...) must hold for every trial, so check
    every combination of the grid values of their keys (the sweep's own values without such axes)."""
    check_combinations(sweep, grid, "grid")


def check_combinations(sweep: Sweep, values: dict[str, Any], where: str) -> None:
    """Every combination of the candidate `values` (dotted key -> values; `where` is `grid` or
    `search.space`) of the keys that take part in rules between keys must keep those rules."""
    keys = [k for k in values if in_combination_rules(k)]
    for combo in itertools.product(*(values[k] for k in keys)):
        combined = sweep
        for key, value in zip(keys, combo):
            combined = apply_axis(combined, key, value, where=f"{where}.{key}")
        violation = combination_violation(combined, keys)
        if violation is not None:
            key, message = violation
            raise SweepError(f"{sweep.source}: {where + '.' + key if key in keys else key}: {message}")


def apply_axis(sweep: Sweep, key: str, value: Any, *, where: str) -> Sweep:
    """Return `sweep` with the dotted `key` set to `value`, type-checked."""
    parts = key.split(".")
    settable = ("data", "model", "lora", "two_stage", "train", "eval", "resources", "fault_tolerance")
    if parts[0] not in settable or len(parts) < 2:
        raise SweepError(f"{sweep.source}: {where}: unknown grid key; use 'model', 'regime' or a "
                         f"dotted key under one of {list(settable)}")

    def set_in(obj: Any, path: list[str], prefix: str) -> Any:
        names = [f.name for f in dataclasses.fields(obj)]
        if path[0] not in names:
            raise SweepError(f"{sweep.source}: {where}: unknown key '{prefix}{path[0]}'; allowed keys are {names}")
        cur = getattr(obj, path[0])
        if len(path) == 1:
            new = coerce(value, typing.get_type_hints(type(obj))[path[0]], where, sweep.source)
        elif dataclasses.is_dataclass(cur):
            new = set_in(cur, path[1:], f"{prefix}{path[0]}.")
        else:
            raise SweepError(f"{sweep.source}: {where}: {prefix}{path[0]} has no sub-keys")
        return dataclasses.replace(obj, **{path[0]: new})

    return set_in(sweep, parts, "")


def load_sweep(path: str | Path, *, check_paths: bool = True) -> Sweep:
    """Read and validate a sweep file. Raises `SweepError` with a one-line message."""
    p = Path(path)
    if not p.is_file():
        raise SweepError(f"{path}: no such sweep file")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" (line {mark.line + 1})" if mark else ""
        raise SweepError(f"{path}: not valid YAML{line}: {getattr(e, 'problem', e)}") from None
    return parse_sweep(raw, str(path), check_paths=check_paths)

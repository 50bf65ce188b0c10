"""Typed loading of YAML mappings into frozen dataclasses: the field annotations are the schema
(Literal = enum, `X | None` = optional, `tuple[X, ...]` = list). Every violation is one line."""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal, Union


class SweepError(ValueError):
    """A user error in a sweep file. `str(err)` is the one line shown to the user."""


def _type_name(tp: Any) -> str:
    if tp in (int, float, str, bool):
        return tp.__name__
    return str(tp).replace("typing.", "")


def coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check `value` against the annotation `tp`; return it converted (lists → tuples)."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return coerce(value, inner, key, source)
    if origin is Literal:
        allowed = list(typing.get_args(tp))
        if value not in allowed:
            raise SweepError(f"{source}: {key}: {value!r} is not one of {allowed}")
        return value
    if origin is tuple:
        (inner, _ellipsis) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise SweepError(f"{source}: {key}: {value!r} must be a list")
        return tuple(coerce(v, inner, f"{key}[{i}]", source) for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise SweepError(f"{source}: {key}: {value!r} must be a mapping")
        (_key_type, inner) = typing.get_args(tp)  # keys are checked where they are known (regimes, grid keys)
        return {k: coerce(v, inner, f"{key}.{k}", source) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return build(tp, value, key, source)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is Any or (isinstance(value, tp) and not (tp is int and isinstance(value, bool))):
        return value
    raise SweepError(f"{source}: {key}: {value!r} must be of type {_type_name(tp)}")


def build(cls: type, data: Any, key: str, source: str) -> Any:
    if isinstance(data, cls):
        return data
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SweepError(f"{source}: {key}: {data!r} must be a mapping")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.name != "source"]
    unknown = [k for k in data if k not in names]
    if unknown:
        where = f"{key}.{unknown[0]}" if key else unknown[0]
        raise SweepError(f"{source}: {where}: unknown key; allowed keys are {names}")
    kwargs = {k: coerce(v, hints[k], f"{key}.{k}" if key else k, source) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required field is missing
        missing = [f.name for f in dataclasses.fields(cls)
                   if f.name not in kwargs and f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING]
        raise SweepError(f"{source}: {key + '.' if key else ''}{missing[0] if missing else '?'}: "
                         f"required key is missing") from e

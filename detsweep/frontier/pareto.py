"""Pareto algorithms, the bottom of `detsweep.frontier`: objectives, non-dominated sorting,
normalised hypervolume, and seed-replicate aggregation with Student-t confidence intervals.
numpy (+ moocore, scipy) on arrays and results tables; no file IO, plots or Ray here.

Hypervolume normalisation (every objective is mapped to a *minimised* value in [0, 1]):

- ``unit`` columns, already in [0, 1] (AP/AR, ECE, Brier, trainable_frac): ``s = x``;
- ``log`` columns (parameter counts, ``*_params``): ``s = log10(max(x, 1)) / log10(max(x_max, 10))``,
  because parameter counts span decades (LoRA ~1e5 vs full ~4e7);
- ``scale`` columns (everything else: memory, seconds, ...): ``s = x / x_max`` when all x >= 0,
  else min-max ``(x - x_min) / (x_max - x_min)``;
- a ``max`` objective is then flipped, ``v = 1 - s``; a ``min`` objective keeps ``v = s``.

``x_max``/``x_min`` come from the valid trial rows. The reference point is 1.1 on every
normalised axis (10 % beyond the worst value, so the front's extreme points still add volume);
the largest possible hypervolume is therefore 1.1**k for k objectives.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import moocore
import numpy as np
import pyarrow as pa
from scipy import stats

from detsweep.results import REPLICATE_COLUMNS, RESULTS_SCHEMA

log = logging.getLogger(__name__)

DIRECTIONS = ("max", "min")
REFERENCE_POINT = 1.1
CI_LEVEL = 0.95
# Columns whose values are bounded in [0, 1] by definition (COCO AP/AR, calibration errors).
UNIT_COLUMNS = frozenset({
    "ap", "ap50", "ap75", "ap_small", "ap_medium", "ap_large",
    "ar1", "ar10", "ar100", "ar_small", "ar_medium", "ar_large",
    "ece", "brier", "trainable_frac",
})
ADDED_COLUMNS = ("pareto_rank", "dominated_by")  # what the frontier adds to a results table
# Rows per block in the numpy dominance checks: 512 x 10k bools per objective ~ 5 MB.
_BLOCK = 512


@dataclass(frozen=True)
class Objective:
    """One objective: a results column and whether it is maximised or minimised."""

    column: str
    direction: str

    def __post_init__(self) -> None:
        if self.direction not in DIRECTIONS:
            raise ValueError(
                f"objective {self.column!r}: direction {self.direction!r} is not one of {list(DIRECTIONS)}"
            )

    @property
    def maximise(self) -> bool:
        return self.direction == "max"

    def __str__(self) -> str:
        return f"{self.column}:{self.direction}"


def parse_objectives(spec: str) -> list[Objective]:
    """Parse ``"ap:max,trainable_params:min"`` into objectives; one-line ValueError on a bad spec."""
    objectives: list[Objective] = []
    for item in (part.strip() for part in spec.split(",")):
        column, sep, direction = item.partition(":")
        if not sep or not column:
            raise ValueError(
                f"objective {item!r} is not of the form COLUMN:DIRECTION with DIRECTION in {list(DIRECTIONS)}"
            )
        objectives.append(Objective(column.strip(), direction.strip()))
    columns = [o.column for o in objectives]
    duplicated = sorted({c for c in columns if columns.count(c) > 1})
    if duplicated:
        raise ValueError(f"objective columns repeated: {duplicated}")
    return objectives


def to_minimisation(values: np.ndarray, maximise: Sequence[bool]) -> np.ndarray:
    """[n, k] objective values -> [n, k] values where smaller is better (max columns negated)."""
    values = np.asarray(values, dtype=np.float64)
    sign = np.where(np.asarray(maximise, dtype=bool), -1.0, 1.0)
    return values * sign


def _dominance_block(points: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """dom[i, j] = candidates[j] dominates points[i] (minimisation). points [b, k], candidates [m, k] -> [b, m]."""
    weakly = np.ones((len(points), len(candidates)), dtype=bool)
    strictly = np.zeros_like(weakly)
    for d in range(points.shape[1]):
        p = points[:, d, None]
        c = candidates[None, :, d]
        weakly &= c <= p
        strictly |= c < p
    # Equal points are weakly but not strictly better, so duplicates never dominate each other.
    return weakly & strictly


def pareto_ranks(values: np.ndarray, maximise: Sequence[bool], method: str = "moocore") -> np.ndarray:
    """Non-dominated sorting of finite objective values.

    values: [n, k] raw objective values; maximise: k flags.
    Returns int64 [n]: 1 for the front, 2 for the next layer, ... Equal points share a rank.
    method: ``"moocore"`` (C; O(n log n) in 2-D) or ``"numpy"`` (reference implementation).
    """
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 2 or len(maximise) != values.shape[1]:
        raise ValueError(f"values must be [n, {len(maximise)}], got shape {values.shape}")
    points = to_minimisation(values, maximise)
    if not np.isfinite(points).all():
        raise ValueError("pareto_ranks needs finite values; drop rows with NaN/inf first")
    if len(points) == 0:
        return np.zeros(0, dtype=np.int64)
    if method == "moocore":
        return moocore.pareto_rank(points).astype(np.int64) + 1
    if method == "numpy":
        return _pareto_ranks_numpy(points)
    raise ValueError(f"method {method!r} is not one of ['moocore', 'numpy']")


def _pareto_ranks_numpy(points: np.ndarray) -> np.ndarray:
    """Rank = length of the longest chain of dominators ending at a point (dominance is transitive).

    After a lexicographic sort every dominator of a point precedes it, so one pass in sorted
    order fills the ranks; dominance is checked block-wise against all earlier points.
    """
    n = len(points)
    order = np.lexsort(points.T[::-1])
    sorted_points = points[order]
    ranks_sorted = np.zeros(n, dtype=np.int64)
    for start in range(0, n, _BLOCK):
        stop = min(start + _BLOCK, n)
        dom = _dominance_block(sorted_points[start:stop], sorted_points[:stop])
        for offset in range(stop - start):
            i = start + offset
            earlier = dom[offset, :i]
            ranks_sorted[i] = 1 + (ranks_sorted[:i][earlier].max() if earlier.any() else 0)
    ranks = np.empty(n, dtype=np.int64)
    ranks[order] = ranks_sorted
    return ranks


def front_dominators(values: np.ndarray, maximise: Sequence[bool], ranks: np.ndarray) -> list[list[int]]:
    """For every row, the indices of rank-1 rows that dominate it (empty for the front).

    values: [n, k] raw objective values, ranks: [n] from ``pareto_ranks``.
    """
    points = to_minimisation(values, maximise)
    front = np.flatnonzero(ranks == 1)
    result: list[list[int]] = []
    for start in range(0, len(points), _BLOCK):
        dom = _dominance_block(points[start:start + _BLOCK], points[front])
        result.extend(front[row].tolist() for row in dom)
    return result


@dataclass(frozen=True)
class Normalisation:
    """How one objective column is mapped to a minimised value in [0, 1] (see module docstring)."""

    column: str
    direction: str
    kind: str  # unit | log | scale | minmax
    low: float
    high: float

    def apply(self, x: np.ndarray) -> np.ndarray:
        """[n] raw values -> [n] minimised normalised values."""
        x = np.asarray(x, dtype=np.float64)
        if self.kind == "unit":
            s = x
        elif self.kind == "log":
            s = np.log10(np.maximum(x, 1.0)) / np.log10(self.high)
        elif self.kind == "scale":
            s = x / self.high
        else:
            s = (x - self.low) / (self.high - self.low)
        return 1.0 - s if self.direction == "max" else s

    def value_range(self) -> tuple[float, float]:
        """(low, high) bounds the raw values can take, as far as the kind tells: [0, 1] for unit
        columns, [0, inf) for counts and non-negative quantities (memory, seconds), else unbounded."""
        if self.kind == "unit":
            return 0.0, 1.0
        if self.kind in ("log", "scale"):
            return 0.0, math.inf
        return -math.inf, math.inf

    def describe(self) -> str:
        flip = "1 - " if self.direction == "max" else ""
        if self.kind == "unit":
            return f"{flip}{self.column}"
        if self.kind == "log":
            return f"{flip}log10({self.column}) / log10({self.high:.6g})"
        if self.kind == "scale":
            return f"{flip}{self.column} / {self.high:.6g}"
        return f"{flip}({self.column} - {self.low:.6g}) / {self.high - self.low:.6g}"


def fit_normalisation(values: np.ndarray, objectives: Sequence[Objective]) -> list[Normalisation]:
    """Choose each objective's mapping from the [n, k] finite raw values of the valid rows."""
    values = np.asarray(values, dtype=np.float64)
    result = []
    for j, obj in enumerate(objectives):
        col = values[:, j]
        lo = float(col.min()) if len(col) else 0.0
        hi = float(col.max()) if len(col) else 1.0
        if obj.column in UNIT_COLUMNS:
            result.append(Normalisation(obj.column, obj.direction, "unit", 0.0, 1.0))
        elif obj.column.endswith("_params"):
            # Floor at 10 so log10(high) > 0 even for a degenerate sweep.
            result.append(Normalisation(obj.column, obj.direction, "log", 1.0, max(hi, 10.0)))
        elif lo >= 0.0:
            result.append(Normalisation(obj.column, obj.direction, "scale", 0.0, hi if hi > 0 else 1.0))
        else:
            result.append(Normalisation(obj.column, obj.direction, "minmax", lo, hi if hi > lo else lo + 1.0))
    return result


def normalise(values: np.ndarray, norms: Sequence[Normalisation]) -> np.ndarray:
    """[n, k] raw values -> [n, k] minimised values in [0, 1] (for rows inside the fitted range)."""
    values = np.asarray(values, dtype=np.float64)
    return np.column_stack([norm.apply(values[:, j]) for j, norm in enumerate(norms)]) if len(norms) else values


def hypervolume(points_min: np.ndarray, reference: Sequence[float] | float) -> float:
    """Volume dominated by [n, k] minimised points and bounded by ``reference`` (moocore).

    Points not strictly better than the reference on every axis add nothing.
    """
    points_min = np.asarray(points_min, dtype=np.float64)
    if len(points_min) == 0:
        return 0.0
    ref = np.broadcast_to(np.asarray(reference, dtype=np.float64), (points_min.shape[1],))
    inside = np.all(points_min < ref, axis=1)
    if not inside.any():
        return 0.0
    return float(moocore.hypervolume(points_min[inside], ref=ref))


def confidence_interval(samples: np.ndarray) -> tuple[float, float, float, float]:
    """(mean, std, ci_low, ci_high) of [n] samples; std with ddof=1, two-sided 95 % Student-t CI.

    With n < 2 the std and CI are NaN: one seed says nothing about seed variance.
    """
    samples = np.asarray(samples, dtype=np.float64)
    n = len(samples)
    if n == 0:
        return (math.nan,) * 4
    mean = float(samples.mean())
    if n < 2:
        return mean, math.nan, math.nan, math.nan
    std = float(samples.std(ddof=1))
    half = float(stats.t.ppf(0.5 + CI_LEVEL / 2, df=n - 1)) * std / math.sqrt(n)
    return mean, std, mean - half, mean + half


def group_replicates(keys: Sequence[tuple]) -> list[list[int]]:
    """Row indices grouped by equal config key, groups and members in first-seen order.

    keys: one hashable tuple per row (config values without the seed); NaN must already be None.
    """
    groups: dict[tuple, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    return list(groups.values())


def seed_groups(keys: Sequence[tuple], seeds: Sequence[object], trial_ids: Sequence[str]) -> list[list[int]]:
    """Rows grouped into seed replicates; every row lands in exactly one group, in first-seen order.

    Rows with an equal config key form a replicate group only from their distinct non-null seeds,
    and only when there are at least two of them. The other rows of such a config (null or repeated
    seed) are duplicates, not replicates: they are ranked singly and logged as a warning.
    """
    groups: list[list[int]] = []
    for members in group_replicates(keys):
        first_of_seed: dict[object, int] = {}
        for i in members:
            if seeds[i] is not None:
                first_of_seed.setdefault(seeds[i], i)
        replicates = list(first_of_seed.values()) if len(first_of_seed) >= 2 else []
        chosen = set(replicates)
        singles = [i for i in members if i not in chosen]
        if len(members) > 1 and singles:
            log.warning("duplicate config: trials %s share every config column (seeds: %s); %s ranked singly, "
                        "not as seed replicates", ", ".join(trial_ids[i] for i in members),
                        ", ".join("null" if seeds[i] is None else str(seeds[i]) for i in members),
                        ", ".join(trial_ids[i] for i in singles))
        groups += ([replicates] if replicates else []) + [[i] for i in singles]
    return sorted(groups, key=min)


def intervals_overlap(low_a: np.ndarray, high_a: np.ndarray, low_b: np.ndarray, high_b: np.ndarray) -> bool:
    """True when the CIs overlap on every objective; a NaN interval (n < 2) overlaps anything."""
    unknown = np.isnan(low_a) | np.isnan(high_a) | np.isnan(low_b) | np.isnan(high_b)
    overlap = (low_a <= high_b) & (low_b <= high_a)
    return bool(np.all(unknown | overlap))


def not_separable(low: np.ndarray, high: np.ndarray, ranks: np.ndarray) -> list[list[int]]:
    """For each front member, the dominated rows whose CI overlaps its CI on every objective.

    low/high: [g, k] CI bounds per config; ranks: [g] Pareto ranks of the config means.
    Returns one list per row (empty for dominated rows and for separable front members).
    """
    dominated = np.flatnonzero(ranks > 1)
    result: list[list[int]] = [[] for _ in range(len(ranks))]
    for f in np.flatnonzero(ranks == 1):
        result[f] = [int(d) for d in dominated if intervals_overlap(low[f], high[f], low[d], high[d])]
    return result


def column_list(table: pa.Table, name: str) -> list:
    """A column's values as a list; all None when the table lacks it (older or partial results)."""
    return table.column(name).to_pylist() if name in table.column_names else [None] * len(table)


def extra_columns(table: pa.Table) -> list[str]:
    """The table's extra sweep-axis columns: neither results-schema columns nor added by the frontier."""
    return [c for c in table.column_names if c not in RESULTS_SCHEMA.names and c not in ADDED_COLUMNS]


def config_label(trial_ids: Sequence[str]) -> str:
    """A seed-replicate group's label: its trial ids' common "-"-separated parts (the seed part, where
    only it differs, dropped): detr_r18-full-seed0/-seed1 -> detr_r18-full. The first id if they differ
    in shape."""
    split = [t.split("-") for t in trial_ids]
    if len({len(s) for s in split}) != 1:
        return trial_ids[0]
    common = [parts[0] for parts in zip(*split) if len(set(parts)) == 1]
    return "-".join(common) or trial_ids[0]


def aggregate_replicates(table: pa.Table, values: np.ndarray, valid: np.ndarray, objectives: Sequence[Objective],
                         norms: Sequence[Normalisation]) -> tuple[pa.Table, float] | None:
    """Seed replicates: valid trials equal in every config column but ``seed``, with distinct
    non-null seeds, form one config (see ``seed_groups``).

    values: [n, k] raw objective values of ``table``'s rows; valid: [n] bool.
    Returns (one row per config: config columns, config_id (first trial id), trial_ids, n,
    ``<objective>_{mean,std,ci_low,ci_high}`` (95 % Student-t), pareto_rank / dominated_by of the means,
    not_separable / not_separable_from; hypervolume of the means' front), or None when every n is 1.
    """
    group_cols = [c for c in REPLICATE_COLUMNS if c in table.column_names] + extra_columns(table)
    idx = np.flatnonzero(valid)
    config_values = [column_list(table, c) for c in group_cols]

    def key_of(i: int) -> tuple:
        return tuple(None if isinstance(v, float) and math.isnan(v) else v for v in (col[i] for col in config_values))

    trial_ids = [str(t) for t in column_list(table, "trial_id")]
    seeds = column_list(table, "seed")
    groups = [[int(idx[j]) for j in members] for members in seed_groups(
        [key_of(i) for i in idx], [seeds[i] for i in idx], [trial_ids[i] for i in idx])]
    if not any(len(g) >= 2 for g in groups):
        return None
    k = len(objectives)
    summary = np.array([[confidence_interval(values[g, j]) for j in range(k)] for g in groups])  # [g, k, 4]
    means, low, high = summary[:, :, 0], summary[:, :, 2], summary[:, :, 3]
    maximise = [o.maximise for o in objectives]
    ranks = pareto_ranks(means, maximise)
    config_ids = [trial_ids[g[0]] for g in groups]
    dominators = front_dominators(means, maximise, ranks)
    overlaps = not_separable(low, high, ranks)

    out = table.take([g[0] for g in groups]).select(group_cols)
    columns: dict[str, pa.Array] = {
        "config_id": pa.array(config_ids, pa.string()),
        "trial_ids": pa.array([[trial_ids[i] for i in g] for g in groups], pa.list_(pa.string())),
        "n": pa.array([len(g) for g in groups], pa.int32()),
    }
    for j, obj in enumerate(objectives):
        for s, stat in enumerate(("mean", "std", "ci_low", "ci_high")):
            columns[f"{obj.column}_{stat}"] = pa.array(summary[:, j, s], pa.float64(), from_pandas=True)
    columns["pareto_rank"] = pa.array(ranks, pa.int32())
    columns["dominated_by"] = pa.array([[config_ids[d] for d in doms] for doms in dominators], pa.list_(pa.string()))
    columns["not_separable"] = pa.array(
        [f"not separable at n={len(groups[i])}" if overlaps[i] else None for i in range(len(groups))], pa.string())
    columns["not_separable_from"] = pa.array([[config_ids[d] for d in o] for o in overlaps], pa.list_(pa.string()))
    for name, array in columns.items():
        out = out.append_column(name, array)
    return out, hypervolume(normalise(means[ranks == 1], norms), REFERENCE_POINT)

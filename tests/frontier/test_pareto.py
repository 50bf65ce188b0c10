"""Non-dominated sorting (property tests), hypervolume by hand, replicate statistics."""
import math

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from detsweep.frontier import compute_frontier, pareto
from detsweep.frontier.pareto import Objective, parse_objectives
from detsweep.results import rows_to_table


def _dominates(a: np.ndarray, b: np.ndarray, maximise) -> bool:
    """Brute force: a dominates b (written independently of the library)."""
    better_or_equal = all((x >= y) if m else (x <= y) for x, y, m in zip(a, b, maximise))
    strictly = any((x > y) if m else (x < y) for x, y, m in zip(a, b, maximise))
    return better_or_equal and strictly


@st.composite
def point_sets(draw):
    k = draw(st.integers(2, 4))
    n = draw(st.integers(1, 40))
    # Few distinct values so ties and exact duplicates are common.
    values = draw(hnp.arrays(np.float64, (n, k), elements=st.integers(0, 4).map(float)))
    maximise = draw(st.lists(st.booleans(), min_size=k, max_size=k))
    return values, maximise


@settings(max_examples=150, deadline=None)
@given(point_sets(), st.sampled_from(["moocore", "numpy"]))
def test_front_and_layer_properties(data, method):
    values, maximise = data
    ranks = pareto.pareto_ranks(values, maximise, method=method)
    n = len(values)
    dom = np.array([[_dominates(values[i], values[j], maximise) for j in range(n)] for i in range(n)])
    # dom[i, j]: i dominates j
    front = ranks == 1
    assert front.any()
    assert not dom[:, front].any(), "a front member is dominated"
    for j in np.flatnonzero(~front):
        assert dom[front, j].any(), "a non-front row is not dominated by any front member"
    for j in range(n):
        dominators = np.flatnonzero(dom[:, j])
        assert (ranks[dominators] < ranks[j]).all(), "a rank-k row is dominated by a row of rank >= k"
        if ranks[j] > 1:  # layered: something of the layer just above dominates it
            assert (ranks[dominators] == ranks[j] - 1).any()
    # duplicates share a rank
    for i in range(n):
        same = np.flatnonzero((values == values[i]).all(axis=1))
        assert (ranks[same] == ranks[i]).all()
    doms = pareto.front_dominators(values, maximise, ranks)
    for j in range(n):
        assert doms[j] == [i for i in np.flatnonzero(front) if dom[i, j]]


@settings(max_examples=100, deadline=None)
@given(point_sets(), st.randoms(use_true_random=False))
def test_ranks_invariant_under_permutation_and_methods_agree(data, rnd):
    values, maximise = data
    perm = list(range(len(values)))
    rnd.shuffle(perm)
    ranks = pareto.pareto_ranks(values, maximise)
    assert (pareto.pareto_ranks(values[perm], maximise) == ranks[perm]).all()
    assert (pareto.pareto_ranks(values, maximise, method="numpy") == ranks).all()


@settings(max_examples=100, deadline=None)
@given(point_sets(), st.data())
def test_flipping_direction_equals_negating_column(data, draw):
    values, maximise = data
    j = draw.draw(st.integers(0, values.shape[1] - 1))
    flipped = list(maximise)
    flipped[j] = not flipped[j]
    negated = values.copy()
    negated[:, j] = -negated[:, j]
    assert (pareto.pareto_ranks(values, maximise) == pareto.pareto_ranks(negated, flipped)).all()


def test_ranks_small_example_with_duplicates():
    # ap (max), params (min)
    values = np.array([[0.5, 10], [0.5, 10], [0.4, 5], [0.3, 10], [0.2, 20], [0.5, 12]])
    ranks = pareto.pareto_ranks(values, [True, False])
    assert ranks.tolist() == [1, 1, 1, 2, 3, 2]
    assert pareto.front_dominators(values, [True, False], ranks) == [[], [], [], [0, 1, 2], [0, 1, 2], [0, 1]]


def test_ranks_reject_nan_and_bad_method():
    with pytest.raises(ValueError, match="finite"):
        pareto.pareto_ranks(np.array([[1.0, math.nan]]), [True, False])
    with pytest.raises(ValueError, match=r"method 'fast' is not one of \['moocore', 'numpy'\]"):
        pareto.pareto_ranks(np.ones((2, 2)), [True, False], method="fast")


def test_hypervolume_2d_by_hand():
    # minimisation, ref (4, 4): union of [1,4]x[3,4], [2,4]x[2,4], [3,4]x[1,4]
    # = 3*1 + 2*1 + 1*1 (slabs from the top) = 3 + 2 + 1 = 6
    points = np.array([[1.0, 3.0], [2.0, 2.0], [3.0, 1.0], [3.0, 3.0]])  # last one dominated
    assert pareto.hypervolume(points, [4.0, 4.0]) == pytest.approx(6.0)
    # a point outside the reference box adds nothing
    assert pareto.hypervolume(np.array([[5.0, 0.0], [1.0, 3.0]]), 4.0) == pytest.approx(3.0)
    assert pareto.hypervolume(np.zeros((0, 2)), 1.0) == 0.0


def test_hypervolume_3d_by_hand():
    # ref (2, 2, 2); boxes [0,2]x[1,2]x[1,2] (vol 2), [1,2]x[0,2]x[1,2] (vol 2), [1,2]x[1,2]x[0,2] (vol 2)
    # pairwise intersections are each the unit cube [1,2]^3 (vol 1), triple intersection too (vol 1)
    # union = 2+2+2 - 1-1-1 + 1 = 4
    points = np.array([[0.0, 1.0, 1.0], [1.0, 0.0, 1.0], [1.0, 1.0, 0.0]])
    assert pareto.hypervolume(points, [2.0, 2.0, 2.0]) == pytest.approx(4.0)
    # single point: 1 * 0.5 * 0.25
    assert pareto.hypervolume(np.array([[0.0, 0.5, 0.75]]), 1.0) == pytest.approx(0.125)


def test_normalised_hypervolume_of_results_by_hand():
    rows = [
        {"trial_id": "a", "status": "ok", "ap": 0.5, "ece": 0.2},
        {"trial_id": "b", "status": "ok", "ap": 0.3, "ece": 0.1},
        {"trial_id": "c", "status": "ok", "ap": 0.2, "ece": 0.3},  # dominated by both
    ]
    fr = compute_frontier(rows_to_table(rows), parse_objectives("ap:max,ece:min"))
    # minimised (1-ap, ece): a=(0.5, 0.2), b=(0.7, 0.1); ref (1.1, 1.1)
    # 0.6*0.9 + 0.4*1.0 - 0.4*0.9 = 0.54 + 0.40 - 0.36 = 0.58
    assert fr.hypervolume == pytest.approx(0.58)
    assert fr.ranks == [1, 1, 2]
    assert fr.table.column("dominated_by").to_pylist() == [[], [], ["a", "b"]]


def test_normalisation_kinds():
    values = np.array([[1e5, 1000.0, -1.0], [1e7, 4000.0, 3.0]])
    objs = [Objective("trainable_params", "min"), Objective("peak_rss_mb", "min"), Objective("score", "max")]
    norms = pareto.fit_normalisation(values, objs)
    assert [n.kind for n in norms] == ["log", "scale", "minmax"]
    got = pareto.normalise(values, norms)
    # log10(1e5)/log10(1e7) = 5/7; 1000/4000; max flipped: 1 - (x - (-1)) / 4
    np.testing.assert_allclose(got, [[5 / 7, 0.25, 1.0], [1.0, 1.0, 0.0]])
    assert norms[0].describe() == "log10(trainable_params) / log10(1e+07)"


def test_parse_objectives_errors():
    assert parse_objectives("ap:max, ece:min") == [Objective("ap", "max"), Objective("ece", "min")]
    with pytest.raises(ValueError, match=r"objective 'ap': direction 'up' is not one of \['max', 'min'\]"):
        parse_objectives("ap:up")
    with pytest.raises(ValueError, match=r"objective 'ap' is not of the form COLUMN:DIRECTION"):
        parse_objectives("ap")
    with pytest.raises(ValueError, match=r"objective columns repeated: \['ap'\]"):
        parse_objectives("ap:max,ap:min")


def test_confidence_interval_by_hand():
    # samples 1, 2, 3: mean 2, std (ddof 1) 1, t_{0.975, 2} = 4.302652729749464
    mean, std, low, high = pareto.confidence_interval(np.array([1.0, 2.0, 3.0]))
    half = 4.302652729749464 / math.sqrt(3)
    assert (mean, std) == (2.0, 1.0)
    assert (low, high) == pytest.approx((2 - half, 2 + half))
    mean, std, low, high = pareto.confidence_interval(np.array([0.7]))
    assert mean == 0.7 and math.isnan(std) and math.isnan(low) and math.isnan(high)


def test_intervals_overlap_and_separability():
    lo, hi = np.array([[0.0, 0.0], [0.5, 0.5], [2.0, 0.0], [math.nan, math.nan]]), np.array(
        [[1.0, 1.0], [1.5, 1.5], [3.0, 1.0], [math.nan, math.nan]])
    assert pareto.intervals_overlap(lo[0], hi[0], lo[1], hi[1])
    assert not pareto.intervals_overlap(lo[0], hi[0], lo[2], hi[2])  # apart on the first objective
    assert pareto.intervals_overlap(lo[0], hi[0], lo[3], hi[3])  # unknown CI overlaps everything
    ranks = np.array([1, 2, 2, 2])
    assert pareto.not_separable(lo, hi, ranks) == [[1, 3], [], [], []]


def _replicate_rows():
    rows = []
    # config A (lora_only r4): ap 0.30, 0.32, 0.34; config B (full): ap 0.20, 0.26; config C: one seed
    for seed, ap in enumerate([0.30, 0.32, 0.34]):
        rows.append({"trial_id": f"A{seed}", "status": "ok", "regime": "lora_only", "lora_rank": 4, "seed": seed,
                     "ap": ap, "trainable_params": 100_000})
    for seed, ap in enumerate([0.20, 0.26]):
        rows.append({"trial_id": f"B{seed}", "status": "ok", "regime": "full", "lora_rank": None, "seed": seed,
                     "ap": ap, "trainable_params": 40_000_000})
    rows.append({"trial_id": "C0", "status": "ok", "regime": "partial", "seed": 0, "ap": 0.1,
                 "trainable_params": 15_000_000})
    rows.append({"trial_id": "B9", "status": "error", "regime": "full", "seed": 9, "error": "OOM"})
    return rows


def test_replicate_aggregation_by_hand():
    fr = compute_frontier(rows_to_table(_replicate_rows()), parse_objectives("ap:max,trainable_params:min"))
    rep = fr.replicates.to_pylist()
    assert [r["config_id"] for r in rep] == ["A0", "B0", "C0"]
    assert [r["trial_ids"] for r in rep] == [["A0", "A1", "A2"], ["B0", "B1"], ["C0"]]
    assert [r["n"] for r in rep] == [3, 2, 1]
    assert fr.replicates.schema.field("lora_rank").type == pa.int32()
    a, b, c = rep
    # A: mean 0.32, std 0.02, half = t_{0.975,2} * 0.02 / sqrt(3) = 4.302652729749464 * 0.011547005 = 0.0496828
    assert a["ap_mean"] == pytest.approx(0.32) and a["ap_std"] == pytest.approx(0.02)
    assert (a["ap_ci_low"], a["ap_ci_high"]) == pytest.approx((0.32 - 0.0496828, 0.32 + 0.0496828), abs=1e-6)
    # B: mean 0.23, std sqrt(0.0018) = 0.0424264, half = t_{0.975,1} 12.7062047 * 0.03 = 0.3811861
    assert b["ap_mean"] == pytest.approx(0.23) and b["ap_std"] == pytest.approx(0.0424264, abs=1e-7)
    assert (b["ap_ci_low"], b["ap_ci_high"]) == pytest.approx((0.23 - 0.3811861, 0.23 + 0.3811861), abs=1e-6)
    assert c["ap_std"] is None and c["ap_ci_low"] is None
    assert [r["pareto_rank"] for r in rep] == [1, 2, 2]
    assert b["dominated_by"] == ["A0"] and c["dominated_by"] == ["A0"]
    # A's params CI [1e5, 1e5] is apart from B's [4e7, 4e7]; C has one seed, so it overlaps everything.
    assert a["not_separable"] == "not separable at n=3" and a["not_separable_from"] == ["C0"]
    assert b["not_separable"] is None


def test_no_replicates_without_repeated_seeds():
    rows = [r for r in _replicate_rows() if r["trial_id"] in ("A0", "B0", "C0")]
    fr = compute_frontier(rows_to_table(rows), parse_objectives("ap:max,trainable_params:min"))
    assert fr.replicates is None and fr.replicates_hypervolume is None


@pytest.mark.parametrize("seeds", [[None, None], [3, 3]])
def test_duplicate_configs_without_distinct_seeds_are_not_replicates(seeds, caplog):
    rows = [{"trial_id": f"D{i}", "status": "ok", "regime": "full", "seed": seed, "ap": 0.2 + i / 10,
             "trainable_params": 1000} for i, seed in enumerate(seeds)]
    with caplog.at_level("WARNING", logger="detsweep.frontier.pareto"):
        fr = compute_frontier(rows_to_table(rows), parse_objectives("ap:max,trainable_params:min"))
    assert fr.replicates is None
    shown = ", ".join("null" if s is None else str(s) for s in seeds)
    assert caplog.messages == [f"duplicate config: trials D0, D1 share every config column (seeds: {shown}); "
                               f"D0, D1 ranked singly, not as seed replicates"]


def test_repeated_seed_joins_no_replicate_group(caplog):
    rows = _replicate_rows() + [{"trial_id": "A9", "status": "ok", "regime": "lora_only", "lora_rank": 4, "seed": 1,
                                 "ap": 0.9, "trainable_params": 100_000}]
    with caplog.at_level("WARNING", logger="detsweep.frontier.pareto"):
        fr = compute_frontier(rows_to_table(rows), parse_objectives("ap:max,trainable_params:min"))
    rep = fr.replicates.to_pylist()
    assert [r["trial_ids"] for r in rep] == [["A0", "A1", "A2"], ["B0", "B1"], ["C0"], ["A9"]]
    assert rep[0]["ap_mean"] == pytest.approx(0.32)  # A9 (seed 1 again) is not averaged in
    assert caplog.messages == ["duplicate config: trials A0, A1, A2, A9 share every config column "
                               "(seeds: 0, 1, 2, 1); A9 ranked singly, not as seed replicates"]


def test_seed_groups_order_and_membership():
    keys = [("a",), ("b",), ("a",), ("a",), ("b",)]
    seeds = [None, 0, 1, 2, 0]
    # a: seeds null, 1, 2 -> replicates [2, 3], row 0 alone; b: seed 0 twice -> both alone
    assert pareto.seed_groups(keys, seeds, ["r0", "r1", "r2", "r3", "r4"]) == [[0], [1], [2, 3], [4]]


def test_value_range_by_normalisation_kind():
    objectives = parse_objectives("ap:max,trainable_params:min,peak_rss_mb:min,delta:min")
    norms = pareto.fit_normalisation(np.array([[0.3, 1e5, 100.0, -1.0], [0.4, 1e6, 200.0, 2.0]]), objectives)
    assert [n.kind for n in norms] == ["unit", "log", "scale", "minmax"]
    assert [n.value_range() for n in norms] == [(0.0, 1.0), (0.0, math.inf), (0.0, math.inf), (-math.inf, math.inf)]

"""Tests for tf_balancer.attention.balance: property tests of ``allocate`` and its errors.

The analysed models are built once per module; hypothesis draws scores, targets,
bounds, metrics and strategies. The oracle helpers below restate, independently
of the library's private helpers, which plans the bisection chooses between.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import residual_concat_cnn
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from tf_balancer._compat import keras
from tf_balancer.analysis import analyze
from tf_balancer.attention import coupled
from tf_balancer.attention.balance import STRATEGIES, Allocation, Bounds, allocate
from tf_balancer.attention.importance import group_scores
from tf_balancer.demo import build_digits_cnn
from tf_balancer.errors import BalanceError, ConfigError

L = keras.layers
PROPERTY = settings(max_examples=30, deadline=None)


def _small_cnn() -> keras.Model:
    return residual_concat_cnn()


@pytest.fixture(scope="module")
def analyses():
    return {"small": analyze(_small_cnn()), "digits": analyze(build_digits_cnn(seed=0))}


def _sizes(analysis) -> dict[int, int]:
    return {g.id: g.size for g in analysis.graph.prunable_groups}


def _cost(analysis, counts, metric: str) -> float:
    return analysis.coster.total(counts, metric)


def _lows(sizes, bounds: Bounds) -> dict[int, int]:
    return {g: bounds.lower(n) for g, n in sizes.items()}


def _reachable(analysis, sizes, bounds, target, metric) -> bool:
    full = _cost(analysis, None, metric)
    return _cost(analysis, _lows(sizes, bounds), metric) <= target * full * (1 + 1e-12)


def _threshold_oracle(analysis, scores, strategy, metric, bounds):
    """``(candidates, counts_at)`` of the threshold strategies, restated from the docstring.

    ``global`` ranks channels by ``s_gj`` in one order (ties broken by group id,
    then channel index) and keeps a prefix of it; counts are clipped to the lower
    bound and rounded up.
    ``uniform`` prunes the same fraction ``p`` of every group (``ceil(n (1 - p))``
    kept), ``p`` ranging over the fractions ``1 - k/n`` any group can realise.
    """
    sizes = {g: len(s) for g, s in scores.items()}
    if strategy == "uniform":

        def counts_at(p: float) -> dict[int, int]:
            return {
                g: bounds.round_up(max(math.ceil(n * (1.0 - p) - 1e-9), bounds.lower(n)), n)
                for g, n in sizes.items()
            }

        fractions = {1.0 - k / n for n in sizes.values() for k in range(n + 1)}
        return np.unique(np.array(sorted(fractions | {0.0, 1.0}))), counts_at
    # One global order: score descending, ties by group id then channel index;
    # state i keeps the first N - i channels of that order.
    entries = sorted((-s[j], g, j) for g, s in scores.items() for j in range(len(s)))
    total = len(entries)

    def counts_at(state: float) -> dict[int, int]:
        kept = [g for _, g, _ in entries[: total - int(state)]]
        return {
            g: bounds.round_up(max(kept.count(g), bounds.lower(n)), n) for g, n in sizes.items()
        }

    return np.arange(total + 1, dtype=float), counts_at


def _targets(analysis, bounds: Bounds, metric: str):
    """Targets in (0.05, 1], half of them drawn above the bounds' floor (reachable)."""
    lows = _lows(_sizes(analysis), bounds)
    floor = _cost(analysis, lows, metric) / _cost(analysis, None, metric)
    above_floor = st.floats(min(max(floor, 0.05), 1.0), 1.0).filter(lambda t: t > 0.05)
    return st.one_of(above_floor, st.floats(0.05, 1.0, exclude_min=True))


@st.composite
def _problem(draw, analyses, score_elements=None, strategies=STRATEGIES):
    name = draw(st.sampled_from(sorted(analyses)))
    analysis = analyses[name]
    elements = score_elements or st.floats(0.0, 1e3, allow_nan=False, allow_subnormal=False)
    scores = {
        g: draw(arrays(np.float64, n, elements=elements)) for g, n in _sizes(analysis).items()
    }
    bounds = Bounds(
        min_keep=draw(st.integers(1, 8)),
        max_prune_fraction=draw(st.floats(0.3, 0.95)),
        round_to=draw(st.sampled_from([1, 2, 4, 8])),
    )
    metric = draw(st.sampled_from(["flops", "params"]))
    target = draw(_targets(analysis, bounds, metric))
    strategy = draw(st.sampled_from(strategies))
    return analysis, scores, target, metric, strategy, bounds


def _allocate_or_expect_unreachable(analysis, scores, target, metric, strategy, bounds):
    """The allocation, or None after checking that an unreachable target raises."""
    sizes = {g: len(s) for g, s in scores.items()}
    if not _reachable(analysis, sizes, bounds, target, metric):
        with pytest.raises(BalanceError, match="unreachable"):
            allocate(analysis, scores, target, metric, strategy, bounds)
        return None
    return allocate(analysis, scores, target, metric, strategy, bounds)


@PROPERTY
@given(data=st.data())
def test_plan_meets_budget_and_the_next_larger_plan_does_not(analyses, data):
    """The exact cost of a baseline plan is within the budget, and it is the largest such plan.

    ``_bisect`` returns the smallest candidate threshold whose plan fits (cost
    falls as the threshold rises). So the returned counts are the plan at the
    returned threshold, and the plan at the next smaller candidate threshold -
    one step more channels - exceeds the budget; the only exception is the
    smallest candidate, whose plan keeps every channel.
    """
    problem = data.draw(_problem(analyses, strategies=("uniform", "global")))
    analysis, scores, target, metric, strategy, bounds = problem
    plan = _allocate_or_expect_unreachable(*problem)
    if plan is None:
        return
    full = _cost(analysis, None, metric)
    cost = _cost(analysis, plan.keep_counts, metric)
    assert cost <= target * full * (1 + 1e-12)  # a target drawn at the bounds' floor rounds
    assert plan.achieved == pytest.approx(cost / full, rel=1e-12)
    assert plan.achieved <= target + 1e-12
    candidates, counts_at = _threshold_oracle(analysis, scores, strategy, metric, bounds)
    assert plan.keep_counts == counts_at(plan.threshold)
    smaller = candidates[candidates < plan.threshold]
    if len(smaller) == 0:
        assert plan.keep_counts == {g: len(s) for g, s in scores.items()}
    else:
        assert _cost(analysis, counts_at(smaller[-1]), metric) > target * full


@PROPERTY
@given(
    data=st.data(),
    seed=st.integers(0, 2**32 - 1),
)
def test_threshold_plans_are_within_one_round_step_of_the_budget(analyses, data, seed):
    """With distinct ratios, one more threshold step adds <= round_to channels to one group.

    Hence (``global``) the plan's cost is above the budget minus
    the largest cost of giving any single group ``round_to`` more channels,
    unless every group is already whole.
    """
    analysis, _, target, metric, strategy, bounds = data.draw(
        _problem(analyses, strategies=("global",))
    )
    rng = np.random.default_rng(seed)
    scores = {g: rng.random(n) + 0.01 for g, n in _sizes(analysis).items()}
    ratios = np.concatenate(list(scores.values()))
    assume(len(np.unique(ratios)) == len(ratios))
    plan = _allocate_or_expect_unreachable(analysis, scores, target, metric, strategy, bounds)
    if plan is None or plan.keep_counts == plan.sizes:
        return
    counts = plan.keep_counts
    cost = _cost(analysis, counts, metric)
    step = max(
        _cost(analysis, {**counts, g: min(n, counts[g] + bounds.round_to)}, metric) - cost
        for g, n in plan.sizes.items()
    )
    assert cost > target * _cost(analysis, None, metric) - step


@PROPERTY
@given(data=st.data())
def test_plans_respect_bounds_and_keep_the_most_important_channels(analyses, data):
    problem = data.draw(_problem(analyses))
    analysis, scores, _, _, _, bounds = problem
    plan = _allocate_or_expect_unreachable(*problem)
    if plan is None:
        return
    assert set(plan.keep) == set(scores)
    for gid, kept in plan.keep.items():
        n = len(scores[gid])
        assert plan.sizes[gid] == n
        assert bounds.lower(n) <= len(kept) <= n
        assert len(kept) % bounds.round_to == 0 or len(kept) == n
        assert np.all(np.diff(kept) > 0), "kept indices must be unique and sorted"
        assert len(kept) == 0 or (kept[0] >= 0 and kept[-1] < n)
        pruned = plan.pruned(gid)
        assert len(pruned) + len(kept) == n
        if len(pruned) and len(kept):
            assert scores[gid][kept].min() >= scores[gid][pruned].max()


@PROPERTY
@given(data=st.data())
def test_a_tighter_target_never_keeps_more_channels_in_a_baseline(analyses, data):
    """Threshold plans are nested. (``balanced`` is not: at a tighter target the
    exact optimum may trade an expensive channel for several cheap ones.)"""
    problem = data.draw(_problem(analyses, strategies=("uniform", "global")))
    analysis, scores, target, metric, strategy, bounds = problem
    other = data.draw(_targets(analysis, bounds, metric))
    tight, loose = sorted((target, other))
    sizes = {g: len(s) for g, s in scores.items()}
    assume(_reachable(analysis, sizes, bounds, tight, metric))
    small = allocate(analysis, scores, tight, metric, strategy, bounds).keep_counts
    large = allocate(analysis, scores, loose, metric, strategy, bounds).keep_counts
    assert all(small[g] <= large[g] for g in sizes), (small, large)


@PROPERTY
@given(data=st.data())
def test_balanced_plans_are_maximal_and_never_below_the_baselines(analyses, data):
    """No group can grow by one allowed step within the budget, and the objective's
    value is at least that of the ``uniform`` and ``global`` plans at the same target."""
    problem = data.draw(_problem(analyses, strategies=("balanced",)))
    analysis, scores, target, metric, _, bounds = problem
    plan = _allocate_or_expect_unreachable(*problem)
    if plan is None:
        return
    counts, limit = plan.keep_counts, target * _cost(analysis, None, metric) * (1 + 1e-12)
    for g, n in plan.sizes.items():
        if counts[g] < n:
            grown = {**counts, g: bounds.round_up(counts[g] + 1, n)}
            assert _cost(analysis, grown, metric) > limit, (g, counts)
    value = _objective(analysis, scores, metric, bounds)
    for baseline in ("uniform", "global"):
        other = allocate(analysis, scores, target, metric, baseline, bounds)
        assert value(plan) >= value(other) - 1e-9 * abs(value(plan)), baseline


def _objective(analysis, scores, metric, bounds, objective="retained"):
    """``plan -> value`` of ``balanced``'s objective (:class:`coupled.Problem`)."""
    groups = sorted(scores)
    levels = [
        coupled.levels_for(len(scores[g]), bounds.lower(len(scores[g])), bounds.round_to)
        for g in groups
    ]
    quadratic = analysis.coster.quadratic(metric, groups)
    problem = coupled.Problem.build([scores[g] for g in groups], levels, quadratic, 1.0, objective)
    return lambda plan: problem.value(problem.index([plan.keep_counts[g] for g in groups]))


@PROPERTY
@given(data=st.data())
def test_allocation_is_deterministic(analyses, data):
    problem = data.draw(_problem(analyses))
    first = _allocate_or_expect_unreachable(*problem)
    if first is None:
        return
    second = allocate(*problem)
    assert first.to_dict() == second.to_dict()


@pytest.mark.parametrize("strategy", ["balanced", "uniform", "global"])
def test_a_plan_within_an_earlier_one_keeps_none_of_the_channels_it_cut(analyses, strategy):
    """``within``: the channels a gradual schedule cut before stay cut, even where they
    now score higher than some kept ones, and the target is still met."""
    analysis = analyses["digits"]
    rng = np.random.default_rng(0)
    scores = {g: rng.random(n) for g, n in _sizes(analysis).items()}
    earlier = allocate(analysis, scores, 0.6, strategy=strategy)
    flipped = {g: 1.0 - s for g, s in scores.items()}  # the cut channels now look best
    later = allocate(analysis, flipped, 0.4, strategy=strategy, within=earlier.keep)
    for gid, kept in later.keep.items():
        assert set(kept.tolist()) <= set(earlier.keep[gid].tolist()), gid
    assert later.achieved <= 0.4
    free = allocate(analysis, flipped, 0.4, strategy=strategy)
    assert any(not set(k.tolist()) <= set(earlier.keep[g].tolist()) for g, k in free.keep.items())


def _ones(analysis) -> dict[int, np.ndarray]:
    return {g: np.ones(n) for g, n in _sizes(analysis).items()}


@pytest.mark.parametrize("strategy", ["balanced", "global"])
def test_tied_scores_still_land_within_one_channel_of_the_target(analyses, strategy):
    """Equal scores must not make the plan overshoot the target by whole groups.

    Fails today: a group's tied channels share one ratio, so the threshold
    candidates only allow "whole group" or "lower bound"; on the digits CNN with
    all scores 1 a 0.9 FLOPs target yields 0.135 (``balanced``) and 0.017
    (``global``) instead of a plan one channel short of 0.9. Tied channels at
    the threshold should be kept while the budget allows.
    """
    analysis = analyses["digits"]
    bounds = Bounds(min_keep=1, max_prune_fraction=0.9)
    plan = allocate(analysis, _ones(analysis), 0.9, strategy=strategy, bounds=bounds)
    counts, full = plan.keep_counts, _cost(analysis, None, "flops")
    cost = _cost(analysis, counts, "flops")
    step = max(
        _cost(analysis, {**counts, g: min(n, counts[g] + 1)}, "flops") - cost
        for g, n in plan.sizes.items()
    )
    assert plan.achieved > 0.9 - step / full, plan.keep_counts


@pytest.mark.parametrize("target", [0, 0.0, -0.1, 1.5, float("nan"), "0.5", None])
def test_bad_target_raises_config_error(analyses, target):
    with pytest.raises(ConfigError, match="target"):
        allocate(analyses["small"], _ones(analyses["small"]), target)


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf")])
def test_negative_or_non_finite_scores_raise_balance_error(analyses, bad):
    scores = _ones(analyses["small"])
    gid = min(scores)
    scores[gid][2] = bad
    with pytest.raises(BalanceError, match=f"group {gid}"):
        allocate(analyses["small"], scores, 0.5)


@pytest.mark.parametrize(
    "kwargs, match",
    [({"strategy": "greedy"}, "strategy"), ({"target_metric": "macs"}, "target_metric")],
)
def test_unknown_strategy_or_metric_raises_config_error(analyses, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        allocate(analyses["small"], _ones(analyses["small"]), 0.5, **kwargs)


def test_unreachable_target_names_a_producer_and_the_bounds_to_relax(analyses):
    analysis = analyses["digits"]
    with pytest.raises(BalanceError) as err:
        allocate(analysis, _ones(analysis), 0.05, bounds=Bounds(min_keep=1000))
    message = str(err.value)
    producers = {p for g in analysis.graph.prunable_groups for p in g.nodes("producer")}
    assert any(p in message for p in producers), message
    assert "min_keep" in message and "max_prune_fraction" in message


def test_empty_scores_raise_balance_error(analyses):
    with pytest.raises(BalanceError, match="no prunable"):
        allocate(analyses["small"], {}, 0.5)


def test_model_without_prunable_group_raises_balance_error():
    inp = keras.Input((8, 8, 3))
    model = keras.Model(inp, L.Conv2D(4, 3, name="only")(inp))
    analysis = analyze(model)
    assert analysis.graph.prunable_groups == []
    with pytest.raises(BalanceError, match="no prunable"):
        group_scores(analysis.graph, None, "magnitude")
    with pytest.raises(BalanceError, match="no prunable"):
        allocate(analysis, {}, 0.5)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"min_keep": 0},
        {"min_keep": 1.5},
        {"max_prune_fraction": 0.0},
        {"max_prune_fraction": 1.0},
        {"max_prune_fraction": -0.2},
        {"round_to": 0},
        {"round_to": 2.0},
    ],
)
def test_bounds_validation_raises_config_error(kwargs):
    with pytest.raises(ConfigError, match=next(iter(kwargs))):
        Bounds(**kwargs)


def test_bounds_lower_and_round_up():
    bounds = Bounds(min_keep=3, max_prune_fraction=0.5, round_to=4)
    assert bounds.lower(2) == 2  # never more than the group
    assert bounds.lower(5) == 4  # max(3, ceil(2.5)) = 3, rounded up to 4
    assert bounds.lower(20) == 12  # ceil(10) = 10, rounded up to 12
    assert bounds.round_up(9, 10) == 10


@pytest.mark.parametrize("fraction, size, expected", [(0.7, 10, 3), (0.7, 100, 30), (0.95, 100, 5)])
def test_bounds_lower_is_exact_for_decimal_fractions(fraction, size, expected):
    """``max_prune_fraction=0.7`` lets a 10-channel group keep 3 channels, not 4.

    Fails today: ``Bounds.lower`` computes ``ceil(size * (1 - fraction))`` with no
    tolerance, and ``10 * (1 - 0.7) = 3.0000000000000004`` rounds up to 4.
    """
    assert Bounds(min_keep=1, max_prune_fraction=fraction).lower(size) == expected


def test_scores_of_the_wrong_length_are_rejected(analyses):
    """Scores must have one entry per channel of the group.

    Fails today: ``allocate`` takes the group size from ``len(scores[g])``, so a
    short array silently yields a plan for a smaller group than the model has.
    """
    scores = _ones(analyses["small"])
    gid = min(scores)
    scores[gid] = scores[gid][:3]
    with pytest.raises((BalanceError, ConfigError)):
        allocate(analyses["small"], scores, 0.5)


@pytest.mark.parametrize("which", ["model input", "reaches a model output", "unknown id"])
def test_scores_for_a_group_that_is_not_prunable_are_rejected(analyses, which):
    """Only prunable groups can be allocated.

    Fails today: a score array for the model-input group, the output group or an
    id that is no group at all is accepted and shows up in ``plan.keep``.
    """
    analysis = analyses["small"]
    scores = _ones(analysis)
    blocked = {r: g for g in analysis.graph.groups.values() for r in g.reasons}
    gid, size = (blocked[which].id, blocked[which].size) if which in blocked else (999, 7)
    scores[gid] = np.ones(size)
    with pytest.raises((BalanceError, ConfigError)):
        allocate(analysis, scores, 0.5)


def test_allocation_to_dict_round_trips_the_plan(analyses):
    analysis = analyses["small"]
    plan = allocate(analysis, _ones(analysis), 0.5, strategy="uniform")
    assert isinstance(plan, Allocation)
    d = plan.to_dict()
    assert {int(g): len(v) for g, v in d["keep"].items()} == plan.keep_counts
    assert d["strategy"] == "uniform" and d["target"] == 0.5


def test_round_to_auto_keeps_counts_the_cpu_vector_width_divides(analyses):
    """``round_to="auto"``: every kept count is a multiple of the CPU's float32 lanes
    (or the whole group), and the plan still meets its target."""
    from tf_balancer.hardware import _cpu_flags, simd_lanes

    lanes = simd_lanes()
    flags = _cpu_flags() or set()
    assert lanes == (16 if "avx512f" in flags else 8 if {"avx", "avx2"} & flags else lanes)
    assert Bounds(round_to="auto").round_to == lanes
    with pytest.raises(ConfigError, match="or 'auto'"):
        Bounds(round_to="fast")
    analysis = analyses["digits"]
    scores = {g.id: np.linspace(1, 2, g.size) for g in analysis.graph.prunable_groups}
    plan = allocate(analysis, scores, 0.5, bounds=Bounds(round_to="auto"))
    assert plan.achieved <= 0.5
    for gid, kept in plan.keep_counts.items():
        assert kept % lanes == 0 or kept == plan.sizes[gid], (gid, kept)
    if lanes > 1:  # an unreachable target names the rounding among the fixes
        with pytest.raises(BalanceError, match=rf"lower round_to \(now {lanes}\)"):
            allocate(analysis, scores, 0.01, bounds=Bounds(round_to="auto"))

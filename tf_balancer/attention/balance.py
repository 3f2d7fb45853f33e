r"""The balancer: per-group channel budgets that meet a global FLOPs/params target.

Problem. Group ``g`` has ``n_g`` channels with importance scores ``s_gj``.
Keep ``k_g`` channels, the ``k_g`` most important ones, so as to

.. math::

    \max_k \sum_g V_g(k_g) \quad\text{s.t.}\quad
    C(k) \le T \cdot C(n), \qquad lo_g \le k_g \le n_g,

where ``C`` is the exact cost model, ``T`` the target ratio and ``lo_g`` comes
from the bounds (``min_keep``, ``max_prune_fraction``, rounded up to
``round_to``). The value ``V_g`` is the *objective*:

* ``"sum"``: ``V_g(k) = sum_{j<=k} s_g(j)``, the kept importance. Optimised
  exactly, it starves layers: on the digits CNN at 1/4 of the FLOPs it cut the
  residual block's middle conv to 4 of 32 channels, because removing it also
  makes its neighbours cheap, and the trained accuracy fell 1-2 points below
  ``uniform`` (``benchmarks.compare``).
* ``"retained"`` (default): ``V_g(k) = w_g (1 - 1 / R_g(k))``, ``R_g`` the
  group's retained share (half its importance fraction, half its width
  fraction) and ``w_g`` its share of the model's cost at full width
  (``k_g dC/dk_g / C``). Halving a group costs ``w_g``, quartering it
  ``3 w_g``: deep cuts are penalised progressively (a ``log R`` penalty tied
  the uniform plan with cutting every other layer of a chain to 1/4). With
  flat scores and every layer between prunable groups the optimum is the
  uniform plan; importance moves channels from where they matter least per
  unit cost to where they matter most.

``C`` is not linear: a conv costs ``cin * cout``, so once a neighbouring group
shrinks, a channel saves less than it did at full width. ``C`` is exactly
quadratic in ``k`` (:meth:`PlanCoster.quadratic`), and ``balanced`` optimises it
as such (:mod:`tf_balancer.attention.coupled`):

1. the first-order plan: each group's per-channel cost ``c_g`` taken once at
   full width, channels kept iff ``s_gj / c_g >= lambda`` (one multiplier,
   importance per unit cost, bisected on the exact cost) - the Lagrangian
   allocation ``min sum_g C_g A_g s.t. sum_g A_g = 1`` generalised to
   importance-weighted channels; ``uniform`` and ``global`` plans as well;
2. re-linearised: for a bisected ``lambda`` each group in turn takes the best
   count given its neighbours' *current* counts (coordinate ascent on
   ``V - lambda C``), ``O(log(1/tol) * sweeps * m * (m + L))`` for ``m``
   groups of at most ``L`` levels;
3. from the best of these, local moves on the exact cost until none helps:
   fill the leftover budget by importance per marginal exact cost, exchange
   channels between groups, re-assign two coupled groups jointly;
4. exhaustive instead of (1)-(3) when at most ``EXACT_LIMIT`` plans exist.

So the plan's value is never below that of ``uniform``, ``global`` or the
first-order plan, and no group can grow by one step within the budget. On 120
random small instances (``sum`` objective) the search alone is within 0.4 % of
the brute-force optimum in the worst case, 0.01 % on average (the first-order
plan alone: 21 % and 0.7 %); ResNet50 takes ~0.05 s, DenseNet121 ~0.1 s
(``benchmarks.bench_allocation``).

Baselines (so the benefit is measured, not assumed):
    ``uniform``  the same keep ratio in every group (tfmot's default behaviour).
    ``global``   one cost-blind threshold on the raw scores across all groups.

Example:
    >>> plan = allocate(analysis, scores, target=0.5)        # doctest: +SKIP
    >>> plan.achieved <= 0.5                                  # doctest: +SKIP
    True
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from tf_balancer.attention import coupled
from tf_balancer.errors import BalanceError, ConfigError
from tf_balancer.graph.latency import measure_latency
from tf_balancer.hardware import simd_lanes

__all__ = [
    "check_target",
    "Bounds",
    "KeepPlan",
    "Allocation",
    "allocate",
    "lowest_reachable",
    "STRATEGIES",
]

STRATEGIES = ("balanced", "uniform", "global")
METRICS = ("flops", "params", "latency")


@dataclasses.dataclass(frozen=True)
class Bounds:
    """Per-group limits: keep at least ``min_keep`` channels and at least
    ``1 - max_prune_fraction`` of them; keep counts are multiples of ``round_to``
    (or the whole group). ``round_to="auto"`` is the CPU's float32 vector width
    (:func:`tf_balancer.hardware.simd_lanes`: 16 with AVX-512, 8 with AVX2), the
    counts its conv kernels run fastest at."""

    min_keep: int = 4
    max_prune_fraction: float = 0.9
    round_to: int | str = 1

    def __post_init__(self) -> None:
        if not (isinstance(self.min_keep, int) and self.min_keep >= 1):
            raise ConfigError(f"min_keep must be an int >= 1, got {self.min_keep!r}")
        if not 0.0 < self.max_prune_fraction < 1.0:
            raise ConfigError(
                f"max_prune_fraction must be in (0, 1), got {self.max_prune_fraction!r}"
            )
        if self.round_to == "auto":
            object.__setattr__(self, "round_to", simd_lanes())
        if not (isinstance(self.round_to, int) and self.round_to >= 1):
            raise ConfigError(f"round_to must be an int >= 1 or 'auto', got {self.round_to!r}")

    def lower(self, size: int) -> int:
        floor = max(self.min_keep, math.ceil(size * (1.0 - self.max_prune_fraction) - 1e-9))
        return self.round_up(min(floor, size), size)

    def round_up(self, k: int, size: int) -> int:
        return min(size, -(-k // self.round_to) * self.round_to)

    def for_unit(self, unit: int) -> Bounds:
        """These bounds for a group whose elements stand for ``unit`` channels each
        (an attention head of width 16 counts as 16 channels toward ``min_keep``
        and ``round_to``).

        Example:
            >>> Bounds(min_keep=4, round_to=8).for_unit(16)
            Bounds(min_keep=1, max_prune_fraction=0.9, round_to=1)
        """
        if unit == 1:
            return self
        return Bounds(
            -(-self.min_keep // unit), self.max_prune_fraction, max(1, self.round_to // unit)
        )

    def for_group(self, group: Any) -> Bounds:
        """These bounds for a :class:`~tf_balancer.graph.layer_graph.ChannelGroup`:
        :meth:`for_unit` of its unit, with keep counts also multiples of its
        ``blocks`` (the groups of the grouped convolutions that read or write it).

        Example:
            >>> Bounds(round_to=8).for_group(ChannelGroup(0, 96, (), blocks=12)).round_to
            24
        """
        bounds = self.for_unit(group.unit)
        if group.blocks == 1:
            return bounds
        return dataclasses.replace(bounds, round_to=math.lcm(bounds.round_to, group.blocks))


@dataclasses.dataclass(frozen=True)
class KeepPlan:
    """The minimal plan interface: group id -> kept channel indices, and group sizes.

    :class:`Allocation` extends it with how the plan was made; a ``KeepPlan``
    also describes channels found already masked or restored from a checkpoint.
    """

    keep: Mapping[int, np.ndarray]
    sizes: Mapping[int, int]

    @property
    def keep_counts(self) -> dict[int, int]:
        return {g: len(idx) for g, idx in self.keep.items()}

    def pruned(self, gid: int) -> np.ndarray:
        """Indices of the channels removed from group ``gid``."""
        return np.setdiff1d(np.arange(self.sizes[gid]), self.keep[gid])


@dataclasses.dataclass(frozen=True)
class Allocation(KeepPlan):
    """Channels to keep per group, and how the plan meets its target.

    Attributes:
        keep: group id -> sorted indices of the channels kept.
        sizes: group id -> channels before pruning.
        strategy, target, target_metric, objective: what was asked.
        achieved: the plan's cost ratio (exact cost model), ``<= target``.
        threshold: how the plan was found: for ``global`` the number of channels
            cut from the global score order, for ``uniform`` the prune fraction,
            for ``balanced`` the Lagrange multiplier of the plan the local search
            started from (importance per unit cost; 0 when the start was a
            baseline plan or the search was exhaustive).
    """

    strategy: str = "balanced"
    target: float = 1.0
    target_metric: str = "flops"
    achieved: float = 1.0
    threshold: float = 0.0
    objective: str = "retained"

    def to_dict(self) -> dict[str, Any]:
        return {
            "strategy": self.strategy,
            "target": self.target,
            "target_metric": self.target_metric,
            "achieved": self.achieved,
            "threshold": self.threshold,
            "objective": self.objective,
            "keep": {str(g): idx.tolist() for g, idx in self.keep.items()},
            "sizes": {str(g): n for g, n in self.sizes.items()},
        }


def check_target(target: Any) -> float:
    """``target`` as a float, checked: a number (not a bool) in (0, 1].

    Example:
        >>> check_target(np.float32(0.5))
        0.5

    Raises:
        ConfigError: not a number, or outside (0, 1] (NaN included).
    """
    if isinstance(target, bool) or not isinstance(target, (int, float, np.integer, np.floating)):
        raise ConfigError(f"target must be a number in (0, 1], got {target!r}")
    if not 0.0 < target <= 1.0 or math.isnan(target):
        raise ConfigError(f"target must be in (0, 1], got {target!r}")
    return float(target)


def _validate(
    scores: Mapping[int, np.ndarray], target: float, metric: str, strategy: str, graph: Any
) -> None:
    check_target(target)
    if metric not in METRICS:
        raise ConfigError(f"target_metric must be one of {METRICS}, got {metric!r}")
    if strategy not in STRATEGIES:
        raise ConfigError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if not scores:
        raise BalanceError("no prunable channel group: nothing to balance (see `inspect`)")
    prunable = {g.id: g for g in graph.prunable_groups}
    for gid, s in scores.items():
        if gid not in prunable:
            raise BalanceError(f"group {gid} is not a prunable group of this model (see `inspect`)")
        s = np.asarray(s, dtype=np.float64)
        if s.shape != (prunable[gid].size,):
            raise BalanceError(
                f"group {gid} has {prunable[gid].size} channels but {s.size} scores were given"
            )
        if not np.all(np.isfinite(s)) or np.any(s < 0):
            raise BalanceError(f"scores of group {gid} must be finite and >= 0")


def allocate(
    analysis: Any,
    scores: Mapping[int, np.ndarray],
    target: float,
    target_metric: str = "flops",
    strategy: str = "balanced",
    bounds: Bounds | None = None,
    objective: str = "retained",
    within: Mapping[int, np.ndarray] | None = None,
) -> Allocation:
    """Choose how many (and which) channels each prunable group keeps.

    Args:
        analysis: a :class:`~tf_balancer.analysis.ModelAnalysis` (its ``coster``
            gives the exact cost of any plan).
        scores: group id -> per-channel importance (non-negative).
        target: fraction of the metric to keep, in (0, 1].
        target_metric: ``"flops"``, ``"params"`` or ``"latency"`` (measured on this
            machine, layer by layer: :func:`~tf_balancer.graph.latency.measure_latency`,
            run here at its default batch size unless the analysis has a table).
        strategy: ``"balanced"``, ``"uniform"`` or ``"global"``.
        bounds: per-group limits (defaults: ``Bounds()``).
        objective: what ``balanced`` maximises: ``"retained"`` (default), a
            cost-share-weighted penalty on the share of each group that is
            cut, or ``"sum"``, the total kept importance (module docstring).
        within: group id -> the only channels the group may keep (groups not
            listed: any), e.g. what the previous plan of a gradual schedule kept: a
            channel masked since has zero weights and gets no gradient, so keeping
            it again would spend budget on a dead channel. Defaults to None.

    Returns:
        An :class:`Allocation` whose exact cost ratio is ``<= target`` (up to a
        relative 1e-12, so a target equal to the bounds' floor is reachable).

    Raises:
        ConfigError: bad target, metric or strategy.
        BalanceError: negative/NaN scores, no prunable group, or a target the
            bounds make unreachable (the message names the blocking groups).
    """
    bounds = bounds or Bounds()
    _validate(scores, target, target_metric, strategy, analysis.graph)
    if objective not in coupled.OBJECTIVES:
        raise ConfigError(f"objective must be one of {coupled.OBJECTIVES}, got {objective!r}")
    coster = analysis.coster
    if target_metric == "latency" and coster.latency is None:
        measure_latency(analysis)
    scores = {g: np.asarray(s, dtype=np.float64) for g, s in sorted(scores.items())}
    sizes = {g: len(s) for g, s in scores.items()}
    full = coster.total(None, target_metric)
    budget = target * full
    cost = lambda counts: coster.total(counts, target_metric)  # noqa: E731
    groups = analysis.graph.groups
    limits = {g: bounds.for_group(groups[g]) for g in sizes}
    within = {g: np.arange(n) if g not in (within or {}) else within[g] for g, n in sizes.items()}
    caps = {g: len(within[g]) for g in sizes}
    lows = {g: min(limits[g].lower(n), caps[g]) for g, n in sizes.items()}
    if cost(lows) > budget * (1 + 1e-12):
        raise BalanceError(
            _unreachable_message(analysis, lows, cost, full, target, target_metric, bounds)
        )
    if strategy == "balanced":
        counts, threshold = _balanced(
            coster, scores, sizes, lows, caps, limits, target_metric, budget, objective
        )
    else:
        threshold, counts = _baseline(strategy, scores, sizes, limits, cost, budget, caps)
    keep = {g: _best(scores[g], counts[g], groups[g].blocks, within[g]) for g in scores}
    achieved = cost(counts) / full
    return Allocation(keep, sizes, strategy, target, target_metric, achieved, threshold, objective)


def lowest_reachable(analysis: Any, target_metric: str = "flops", bounds: Bounds | None = None):
    """The smallest fraction of ``target_metric`` any plan reaches: every prunable
    group at its lower bound (1.0 for a model with no prunable group).

    Example:
        >>> lowest_reachable(analyze(model), "flops")  # doctest: +SKIP
        0.061
    """
    bounds = bounds or Bounds()
    groups = analysis.graph.prunable_groups
    if not groups:
        return 1.0
    if target_metric == "latency" and analysis.coster.latency is None:
        measure_latency(analysis)
    lows = {g.id: bounds.for_group(g).lower(g.size) for g in groups}
    full = analysis.coster.total(None, target_metric)
    return analysis.coster.total(lows, target_metric) / full


def _best(
    scores: np.ndarray, count: int, blocks: int = 1, allowed: np.ndarray | None = None
) -> np.ndarray:
    """Sorted indices of the ``count`` best channels (among ``allowed`` ones); with
    ``blocks`` > 1, the best ``count / blocks`` of each of that many equal
    consecutive runs.

    Example:
        >>> _best(np.array([1.0, 4, 3, 2, 9, 8]), 2, blocks=2).tolist()
        [1, 4]
        >>> _best(np.array([1.0, 4, 3, 2, 9, 8]), 2, allowed=np.array([0, 2, 3])).tolist()
        [2, 3]
    """
    run = len(scores) // blocks
    allowed = np.arange(len(scores)) if allowed is None else np.asarray(allowed, dtype=np.int64)
    picks = []
    for b in range(blocks):
        candidates = allowed[(allowed >= b * run) & (allowed < (b + 1) * run)]
        picks.append(candidates[np.argsort(-scores[candidates], kind="stable")[: count // blocks]])
    return np.sort(np.concatenate(picks))


def _baseline(
    strategy, scores, sizes, limits, cost, budget, caps=None
) -> tuple[float, dict[int, int]]:
    """``(threshold, counts)`` of a threshold strategy (``uniform``, ``global``, first-order);
    ``limits``: group id -> its :class:`Bounds`; ``caps``: group id -> most channels kept."""
    if strategy == "uniform":
        counts_at, candidates = _uniform(sizes, limits)
    else:
        full = cost(None)
        per_unit = _marginal_costs(sizes, cost, full) if strategy == "linear" else None
        counts_at, candidates = _threshold(scores, per_unit, limits)

    def capped(state: Any) -> dict[int, int]:
        return {g: min(c, (caps or sizes)[g]) for g, c in counts_at(state).items()}

    return _bisect(capped, candidates, cost, budget)


def _balanced(
    coster, scores, sizes, lows, caps, limits, metric, budget, objective
) -> tuple[dict, float]:
    """Counts of the exact-cost search (:mod:`.coupled`) and its multiplier."""
    groups = sorted(scores)
    quadratic = coster.quadratic(metric, groups)
    cost = lambda counts: quadratic([(counts or sizes).get(g, sizes[g]) for g in groups])  # noqa: E731
    starts = [
        _baseline(name, scores, sizes, limits, cost, budget, caps)[1]
        for name in ("linear", "uniform", "global")
    ]
    levels = [coupled.levels_for(sizes[g], lows[g], limits[g].round_to) for g in groups]
    problem = coupled.Problem.build(
        [scores[g] for g in groups],
        [np.union1d(k[k <= caps[g]], [caps[g]]) for g, k in zip(groups, levels, strict=True)],
        quadratic,
        budget,
        objective,
        [sizes[g] for g in groups],
    )
    counts, lam = coupled.solve(problem, [[s[g] for g in groups] for s in starts])
    return {g: int(c) for g, c in zip(groups, counts, strict=True)}, 0.0 if math.isnan(lam) else lam


def _marginal_costs(sizes: Mapping[int, int], cost: Callable, full: float) -> dict[int, float]:
    """Cost saved by removing one channel of each group (at full width)."""
    return {g: max(full - cost({g: n - 1}), 1e-12) for g, n in sizes.items()}


def _threshold(
    scores: Mapping[int, np.ndarray],
    per_unit: Mapping[int, float] | None,
    limits: Mapping[int, Bounds],
) -> tuple[Callable[[int], dict[int, int]], np.ndarray]:
    """Plans keeping the best channels by ``score / cost`` (raw score when cost-blind).

    All channels are put in one order (ratio descending, then group id, then
    channel index, so ties are broken deterministically, one channel at a time);
    state ``i`` keeps the first ``N - i`` channels of that order, clipped by the
    bounds. The candidate values are the ratios at each cut.
    """
    groups = sorted(scores)
    ratios = [scores[g] / (per_unit[g] if per_unit else 1.0) for g in groups]
    values = np.concatenate(ratios)
    owner = np.concatenate([np.full(len(r), i) for i, r in enumerate(ratios)])
    index = np.concatenate([np.arange(len(r)) for r in ratios])
    order = np.lexsort((index, owner, -values))
    positions = [np.sort(np.flatnonzero(owner[order] == i)) for i in range(len(groups))]
    total = len(values)

    def counts_at(state: int) -> dict[int, int]:
        kept = total - int(state)
        return {
            g: limits[g].round_up(
                max(int(np.searchsorted(pos, kept)), limits[g].lower(len(pos))), len(pos)
            )
            for g, pos in zip(groups, positions, strict=True)
        }

    return counts_at, np.arange(total + 1)


def _uniform(
    sizes: Mapping[int, int], limits: Mapping[int, Bounds]
) -> tuple[Callable[[float], dict[int, int]], np.ndarray]:
    """Keep counts for one prune ratio everywhere (threshold = fraction pruned)."""

    def counts_at(pruned: float) -> dict[int, int]:
        return {
            g: limits[g].round_up(max(math.ceil(n * (1.0 - pruned) - 1e-9), limits[g].lower(n)), n)
            for g, n in sizes.items()
        }

    fractions = {1.0 - k / n for n in set(sizes.values()) for k in range(n + 1)}
    return counts_at, np.unique(np.array(sorted(fractions | {0.0, 1.0})))


def _bisect(
    counts_at: Callable[[Any], dict[int, int]],
    candidates: np.ndarray,
    cost: Callable[[dict[int, int]], float],
    budget: float,
) -> tuple[float, dict[int, int]]:
    """Smallest candidate whose plan fits the budget (cost falls as the candidate rises)."""
    lo, hi = 0, len(candidates) - 1  # counts_at(candidates[hi]) fits: all groups at bounds
    if cost(counts_at(candidates[lo])) <= budget:
        return float(candidates[lo]), counts_at(candidates[lo])
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if cost(counts_at(candidates[mid])) <= budget:
            hi = mid
        else:
            lo = mid
    return float(candidates[hi]), counts_at(candidates[hi])


def _unreachable_message(analysis, lows, cost, full, target, metric, bounds) -> str:
    reached = cost(lows) / full
    savings = {g: cost({h: n for h, n in lows.items() if h != g}) - cost(lows) for g in lows}
    worst = sorted(lows, key=lambda g: -savings[g])[:3]
    names = ", ".join(
        f"group {g} ({'/'.join(analysis.graph.groups[g].nodes('producer'))}, {lows[g]} channels)"
        for g in worst
    )
    rounding = f", lower round_to (now {bounds.round_to})" if bounds.round_to > 1 else ""
    return (
        f"target {target:g} of {metric} is unreachable: with every prunable group at its lower "
        f"bound the model keeps {reached:.4f}. Held back most by: {names}. Relax min_keep "
        f"(now {bounds.min_keep}){rounding} or raise max_prune_fraction (now "
        f"{bounds.max_prune_fraction}), or ask for a target >= {math.ceil(reached * 1000) / 1000:.3f}."
    )

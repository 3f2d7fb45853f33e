r"""Search for the ``balanced`` plan under the exact, coupled cost.

The cost of a plan is exactly quadratic in the keep counts ``k`` (a conv costs
``cin * cout``; both are linear in ``k``): ``C(k) = k Q k + q k + r`` with
``Q >= 0`` (:meth:`~tf_balancer.graph.cost.PlanCoster.quadratic`). Each group's
value ``V_g(k_g)`` is concave in its count (:func:`level_values`: the kept
importance, or a weighted penalty on the share it loses). We maximise
``sum_g V_g(k_g)`` subject to ``C(k) <= budget`` over the allowed counts of each
group (its *levels*: lower bound .. size in ``round_to`` steps).

Algorithm (``m`` groups, ``L`` levels in the largest group):

1. **Exact** when the plan space is small (``prod_g |levels_g| <= EXACT_LIMIT``):
   every plan is costed in one vectorised pass; the best that fits wins.
2. **Lagrangian with re-linearisation.** For a multiplier ``lambda`` maximise
   ``sum_g V_g(k_g) - lambda C(k)`` by coordinate ascent: each group in turn
   takes its best level *given the others' current counts* (its cost is a
   quadratic in its own count, with the coupling to the neighbours included),
   sweeping until no group moves. ``lambda`` is bisected (geometrically) so
   the plan fits the budget; the best fitting plan seen is kept.
   ``O(bisections * sweeps * m * (m + L))``.
3. **Local search** from the best of (2) and the starting plans passed in
   (the first-order plan, ``uniform``, ``global``): fill, exchange, pair,
   triple and grow-and-repair moves on the exact cost until none improves
   (:mod:`tf_balancer.attention.moves`, with their complexities).

The result's value is never below any starting plan's, and it is maximal: no
group can grow by one level within the budget.

Example:
    >>> problem = Problem.build(scores, levels, quadratic, budget)  # doctest: +SKIP
    >>> counts, lam = solve(problem, starts=[uniform_counts])         # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from collections.abc import Sequence

import numpy as np

from tf_balancer.attention.moves import improve
from tf_balancer.graph.cost import QuadraticCost

__all__ = [
    "Problem",
    "solve",
    "levels_for",
    "level_values",
    "cost_shares",
    "EXACT_LIMIT",
    "OBJECTIVES",
]

EXACT_LIMIT = 100_000
_LAMBDA_TOLERANCE = 1e-3  # relative precision of the bisected multiplier
_MAX_SWEEPS = 25
_REL = 1e-12
# Extra effort for small problems (at most SMALL_PROBLEM groups): several starts for
# the local search, and grow-and-repair moves. On ResNet50 and DenseNet121 (37 and
# 120 groups, 16 cases) they changed the objective by <= 0.14 % at 30-150x the time.
SMALL_PROBLEM = 16
LOCAL_STARTS = 8
GROW_DEPTH = 4


def levels_for(size: int, low: int, round_to: int) -> np.ndarray:
    """Allowed keep counts of a group: ``low``, the multiples of ``round_to`` above it, ``size``."""
    first = -(-low // round_to) * round_to
    return np.unique(np.array([low, *range(first, size + 1, round_to), size], dtype=np.int64))


OBJECTIVES = ("retained", "sum")
IMPORTANCE_SHARE = 0.5  # "retained": weight of the importance fraction against the width


def level_values(scores: np.ndarray, levels: np.ndarray, objective: str = "retained") -> np.ndarray:
    """A group's value at each of its levels (keep counts), before weighting.

    ``sum``: the kept importance ``V_g(k)`` (sum of the ``k`` best scores).
    ``retained``: ``1 - 1 / R_g(k)``, ``R_g`` the group's retained share - half
    the fraction of its importance kept, half the fraction of its channels kept
    (``IMPORTANCE_SHARE``). Halving a group's share costs 1, quartering it 3:
    deep cuts are penalised progressively, so no layer is starved because its
    channels looked cheap. Concave in ``k`` like ``sum``.

    Example:
        >>> level_values(np.array([3.0, 1.0]), np.array([1, 2]), "sum").tolist()
        [3.0, 4.0]
        >>> level_values(np.array([3.0, 1.0]), np.array([1, 2])).tolist()  # R = 0.625, 1
        [-0.6, 0.0]
    """
    s = np.sort(np.asarray(scores, dtype=np.float64))[::-1]
    prefix = np.concatenate([[0.0], np.cumsum(s)])
    if objective == "sum":
        return prefix[levels]
    width = np.asarray(levels, dtype=np.float64) / len(s)
    importance = prefix[levels] / prefix[-1] if prefix[-1] > 0 else width
    share = IMPORTANCE_SHARE * importance + (1.0 - IMPORTANCE_SHARE) * width
    return 1.0 - 1.0 / np.maximum(share, 1e-12)


def cost_shares(quadratic: QuadraticCost, full: np.ndarray) -> np.ndarray:
    """Each group's cost elasticity at full width: ``k_g dC/dk_g / C``.

    The ``retained`` objective weights group ``g`` by it, so with flat scores the
    optimum of ``sum_g w_g (1 - n_g / k_g)`` under a homogeneous quadratic cost
    (every layer between two prunable groups) is the uniform plan; importance,
    and layers with a fixed side (the first conv, the classifier), tilt it.
    """
    full = np.asarray(full, dtype=np.float64)
    return full * quadratic.gradient(full) / max(float(quadratic(full)), 1e-300)


@dataclasses.dataclass(frozen=True)
class Problem:
    """One allocation instance in level space (``x_g`` indexes ``levels[g]``).

    Attributes:
        levels: per group, the allowed keep counts, ascending.
        values: per group, the objective's value at each level.
        quadratic: the exact cost ``k Q k + q k + r`` of keep counts ``k``.
        budget: the largest allowed cost.
    """

    levels: list[np.ndarray]
    values: list[np.ndarray]
    quadratic: QuadraticCost
    budget: float

    @classmethod
    def build(
        cls,
        scores: Sequence[np.ndarray],
        levels: Sequence[np.ndarray],
        quadratic: QuadraticCost,
        budget: float,
        objective: str = "retained",
        sizes: Sequence[int] | None = None,
    ) -> Problem:
        """An instance from per-group scores; ``objective`` as in :func:`level_values`
        (``retained`` values weighted by :func:`cost_shares` at the groups' ``sizes``,
        by default their top levels)."""
        full = np.array(sizes or [lv[-1] for lv in levels], dtype=np.float64)
        weights = cost_shares(quadratic, full) if objective == "retained" else np.ones(len(full))
        values = [
            w * level_values(s, lv, objective)
            for s, lv, w in zip(scores, levels, weights, strict=True)
        ]
        return cls(list(levels), values, quadratic, budget)

    @property
    def matrix(self) -> np.ndarray:
        return self.quadratic.matrix

    @property
    def linear(self) -> np.ndarray:
        return self.quadratic.linear

    @property
    def limit(self) -> float:
        return self.budget * (1 + _REL) + _REL

    @functools.cached_property
    def level_table(self) -> np.ndarray:
        """``levels`` as one float array, a row per group (padded with its top level):
        the moves read ``level_table[g, x[g]]`` for a group's count."""
        return _padded(self.levels)

    @functools.cached_property
    def value_table(self) -> np.ndarray:
        """``values`` as one array, a row per group (padded like :attr:`level_table`)."""
        return _padded(self.values)

    def counts(self, x: np.ndarray) -> np.ndarray:
        return self.level_table[np.arange(len(self.levels)), x]

    def index(self, counts: Sequence[int]) -> np.ndarray:
        """Level indices of a plan given as counts (each count must be a level)."""
        return np.array(
            [int(np.searchsorted(lv, c)) for lv, c in zip(self.levels, counts, strict=True)]
        )

    def cost(self, k: np.ndarray) -> np.ndarray | float:
        """The exact cost of keep counts ``k`` (one plan, or a batch of them as rows)."""
        return self.quadratic(k)

    def gradient(self, k: np.ndarray) -> np.ndarray:
        """``d cost / d k`` at keep counts ``k``."""
        return self.quadratic.gradient(k)

    def value(self, x: np.ndarray) -> float:
        return float(sum(v[i] for v, i in zip(self.values, x, strict=True)))


def _padded(rows: Sequence[np.ndarray]) -> np.ndarray:
    width = max(len(r) for r in rows)
    out = np.empty((len(rows), width), dtype=np.float64)
    for g, r in enumerate(rows):
        out[g, : len(r)] = r
        out[g, len(r) :] = r[-1]
    return out


def solve(problem: Problem, starts: Sequence[Sequence[int]]) -> tuple[np.ndarray, float]:
    """The best plan found, as counts per group, and the Lagrange multiplier used.

    ``starts`` are fitting plans (counts) the result must not be worse than.
    The multiplier is ``nan`` when the exact search or a start won.
    """
    exact = _exhaustive(problem)
    if exact is not None:
        return problem.counts(exact), math.nan
    candidates = [(problem.index(s), math.nan) for s in starts]
    small = len(problem.levels) <= SMALL_PROBLEM
    candidates += _lagrangian(problem)
    values = [problem.value(x) for x, _ in candidates]
    order = np.argsort(-np.array(values), kind="stable")[: LOCAL_STARTS if small else 1]
    best, lam, best_value = None, math.nan, -math.inf
    seen: set[bytes] = set()  # a search joining an earlier one's path ends where it did
    for i in order:  # the first of equals wins: starts before multipliers
        x = improve(problem, candidates[i][0].copy(), GROW_DEPTH if small else 0, seen)
        if x is None:
            continue
        value = problem.value(x)
        if value > best_value + _REL * max(abs(best_value), 1.0) or best is None:
            best, lam, best_value = x, candidates[i][1], value
    return problem.counts(best), lam


def _exhaustive(problem: Problem) -> np.ndarray | None:
    """The optimum by enumeration, or ``None`` when the plan space is too large."""
    sizes = [len(lv) for lv in problem.levels]
    if math.prod(sizes) > EXACT_LIMIT:
        return None
    grid = np.array(list(itertools.product(*[range(n) for n in sizes])), dtype=np.int64)
    k = np.stack([lv[grid[:, g]] for g, lv in enumerate(problem.levels)], axis=1).astype(float)
    cost = problem.cost(k)
    value = sum(v[grid[:, g]] for g, v in enumerate(problem.values))
    value = np.where(cost <= problem.limit, value, -np.inf)
    best = np.flatnonzero(value >= value.max() - _REL * max(abs(value.max()), 1.0))
    return grid[best[np.argmax(cost[best])]]  # ties: keep the channels the budget allows


def _lagrangian(problem: Problem) -> list[tuple[np.ndarray, float]]:
    """The distinct fitting coordinate-ascent plans ``(x, lambda)`` met while
    bisecting ``lambda`` (the ascent starts from the lowest levels, warm after)."""
    high = _lambda_high(problem)
    if high <= 0:
        return []
    lo, hi = math.log(high) - 30.0, math.log(high)
    x = np.zeros(len(problem.levels), dtype=np.int64)
    found: dict[bytes, tuple[np.ndarray, float]] = {}
    while hi - lo > _LAMBDA_TOLERANCE:
        mid = 0.5 * (lo + hi)
        x = _coordinate_ascent(problem, math.exp(mid), x)
        if problem.cost(problem.counts(x)) <= problem.limit:
            hi = mid
            found.setdefault(x.tobytes(), (x.copy(), math.exp(mid)))
        else:
            lo = mid
    return list(found.values())


def _lambda_high(problem: Problem) -> float:
    """A multiplier at which no group gains by growing from its lowest level."""
    k = problem.counts(np.zeros(len(problem.levels), dtype=np.int64))
    grad = problem.gradient(k)
    steps = [(lv[1] - lv[0]) * grad[g] for g, lv in enumerate(problem.levels) if len(lv) > 1]
    positive = [s for s in steps if s > 0]
    total = sum(float(v[-1] - v[0]) for v in problem.values)
    return 2.0 * total / min(positive) if positive and total > 0 else 0.0


def _coordinate_ascent(problem: Problem, lam: float, x: np.ndarray) -> np.ndarray:
    """Maximise ``V(k) - lam * C(k)`` one group at a time (others fixed) until stable."""
    x = x.copy()
    k = problem.counts(x)
    q, lin = problem.matrix, problem.linear
    for _ in range(_MAX_SWEEPS):
        moved = False
        for g, (lv, v) in enumerate(zip(problem.levels, problem.values, strict=True)):
            coupling = 2.0 * (q[g] @ k - q[g, g] * k[g]) + lin[g]
            own = q[g, g] * lv * lv + coupling * lv
            i = int(np.argmax(v - lam * own))
            if i != x[g]:
                x[g], k[g], moved = i, lv[i], True
        if not moved:
            break
    return x

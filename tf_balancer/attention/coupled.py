r"""Search for the ``balanced`` plan under the exact, coupled cost.

The cost of a plan is exactly quadratic in the keep counts ``k`` (a conv costs
``cin * cout``; both are linear in ``k``): ``C(k) = k Q k + q k + r`` with
``Q >= 0`` (:meth:`~tf_balancer.graph.cost.PlanCoster.quadratic`). Each group's
kept importance ``V_g(k_g)`` (the sum of its ``k_g`` best scores) is concave.
We maximise ``sum_g V_g(k_g)`` subject to ``C(k) <= budget`` over the allowed
counts of each group (its *levels*: lower bound .. size in ``round_to`` steps).

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
   (the first-order plan, ``uniform``, ``global``): *fill* - grow the group
   whose next level adds the most importance per unit of exact cost, while it
   fits - and *exchange* - shrink one group by up to ``EXCHANGE_DEPTH`` levels
   to grow another by one level, taking the best importance gain that fits -
   alternated until neither improves. ``O(m^2 * EXCHANGE_DEPTH)`` per move.

The result is never worse than any starting plan, and is maximal: no group can
grow by one level within the budget.

Example:
    >>> problem = Problem.build(scores, levels, quadratic, budget)  # doctest: +SKIP
    >>> counts, lam = solve(problem, starts=[uniform_counts])         # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Sequence

import numpy as np

__all__ = ["Problem", "solve", "levels_for", "EXACT_LIMIT"]

EXACT_LIMIT = 100_000
EXCHANGE_DEPTH = 16
_LAMBDA_TOLERANCE = 1e-4  # relative precision of the bisected multiplier
_MAX_SWEEPS = 25
_REL = 1e-12
_MAX_MOVES = 2000
PAIR_WINDOW = 4
PAIR_GRID = 12


def levels_for(size: int, low: int, round_to: int) -> np.ndarray:
    """Allowed keep counts of a group: ``low``, the multiples of ``round_to`` above it, ``size``."""
    first = -(-low // round_to) * round_to
    return np.unique(np.array([low, *range(first, size + 1, round_to), size], dtype=np.int64))


@dataclasses.dataclass(frozen=True)
class Problem:
    """One allocation instance in level space (``x_g`` indexes ``levels[g]``).

    Attributes:
        levels: per group, the allowed keep counts, ascending.
        values: per group, the kept importance at each level.
        matrix, linear, constant: the exact cost ``k Q k + q k + r``.
        budget: the largest allowed cost.
    """

    levels: list[np.ndarray]
    values: list[np.ndarray]
    matrix: np.ndarray
    linear: np.ndarray
    constant: float
    budget: float

    @classmethod
    def build(cls, scores: Sequence[np.ndarray], levels: Sequence[np.ndarray], quadratic, budget):
        values = []
        for s, lv in zip(scores, levels, strict=True):
            prefix = np.concatenate([[0.0], np.cumsum(np.sort(np.asarray(s, float))[::-1])])
            values.append(prefix[lv])
        return cls(
            list(levels), values, quadratic.matrix, quadratic.linear, quadratic.constant, budget
        )

    @property
    def limit(self) -> float:
        return self.budget * (1 + _REL) + _REL

    def counts(self, x: np.ndarray) -> np.ndarray:
        return np.array([lv[i] for lv, i in zip(self.levels, x, strict=True)], dtype=np.float64)

    def index(self, counts: Sequence[int]) -> np.ndarray:
        """Level indices of a plan given as counts (each count must be a level)."""
        return np.array(
            [int(np.searchsorted(lv, c)) for lv, c in zip(self.levels, counts, strict=True)]
        )

    def cost(self, k: np.ndarray) -> float:
        return float(k @ self.matrix @ k + self.linear @ k + self.constant)

    def value(self, x: np.ndarray) -> float:
        return float(sum(v[i] for v, i in zip(self.values, x, strict=True)))


def solve(problem: Problem, starts: Sequence[Sequence[int]]) -> tuple[np.ndarray, float]:
    """The best plan found, as counts per group, and the Lagrange multiplier used.

    ``starts`` are fitting plans (counts) the result must not be worse than.
    The multiplier is ``nan`` when the exact search or a start won.
    """
    exact = _exhaustive(problem)
    if exact is not None:
        return problem.counts(exact), math.nan
    candidates = [(problem.index(s), math.nan) for s in starts]
    lagrangian = _lagrangian(problem)
    if lagrangian is not None:
        candidates.append(lagrangian)
    values = [problem.value(x) for x, _ in candidates]
    x, lam = candidates[int(np.argmax(values))]  # the first of equals: starts win ties
    return problem.counts(_improve(problem, x.copy())), lam


def _exhaustive(problem: Problem) -> np.ndarray | None:
    """The optimum by enumeration, or ``None`` when the plan space is too large."""
    sizes = [len(lv) for lv in problem.levels]
    if math.prod(sizes) > EXACT_LIMIT:
        return None
    grid = np.array(list(itertools.product(*[range(n) for n in sizes])), dtype=np.int64)
    k = np.stack([lv[grid[:, g]] for g, lv in enumerate(problem.levels)], axis=1).astype(float)
    cost = np.einsum("ni,ij,nj->n", k, problem.matrix, k) + k @ problem.linear + problem.constant
    value = sum(v[grid[:, g]] for g, v in enumerate(problem.values))
    value = np.where(cost <= problem.limit, value, -np.inf)
    best = np.flatnonzero(value >= value.max() - _REL * max(abs(value.max()), 1.0))
    return grid[best[np.argmax(cost[best])]]  # ties: keep the channels the budget allows


def _lagrangian(problem: Problem) -> tuple[np.ndarray, float] | None:
    """Best fitting coordinate-ascent plan over a geometric bisection of ``lambda``."""
    high = _lambda_high(problem)
    if high <= 0:
        return None
    lo, hi = math.log(high) - 40.0, math.log(high)
    x = np.zeros(len(problem.levels), dtype=np.int64)
    best, best_value = None, -math.inf
    while hi - lo > _LAMBDA_TOLERANCE:
        mid = 0.5 * (lo + hi)
        x = _coordinate_ascent(problem, math.exp(mid), x)
        k = problem.counts(x)
        if problem.cost(k) <= problem.limit:
            hi = mid
            value = problem.value(x)
            if value > best_value:
                best, best_value = (x.copy(), math.exp(mid)), value
        else:
            lo = mid
    return best


def _lambda_high(problem: Problem) -> float:
    """A multiplier at which no group gains by growing from its lowest level."""
    k = problem.counts(np.zeros(len(problem.levels), dtype=np.int64))
    grad = 2.0 * problem.matrix @ k + problem.linear
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


def _improve(problem: Problem, x: np.ndarray) -> np.ndarray:
    """Local moves until none raises the kept importance: fill and exchange first
    (cheap), a two-group re-assignment when they are stuck."""
    for _ in range(_MAX_MOVES):
        x = _fill(problem, x)
        move = _best_exchange(problem, x)
        if move is not None:
            shrink, depth, grow = move
            x[shrink] -= depth
            x[grow] += 1
            continue
        pair = _best_pair(problem, x)
        if pair is None:
            return x
        x[pair[0]], x[pair[2]] = pair[1], pair[3]
    return _fill(problem, x)


def _fill(problem: Problem, x: np.ndarray) -> np.ndarray:
    """Grow, one level at a time, the group with the best importance per exact cost that fits."""
    k = problem.counts(x)
    cost = problem.cost(k)
    top = np.array([len(lv) - 1 for lv in problem.levels])
    while True:
        open_ = np.flatnonzero(x < top)
        if not len(open_):
            return x
        delta = np.array([problem.levels[g][x[g] + 1] - k[g] for g in open_])
        gain = np.array([problem.values[g][x[g] + 1] - problem.values[g][x[g]] for g in open_])
        grad = 2.0 * problem.matrix[open_] @ k + problem.linear[open_]
        extra = delta * grad + delta * delta * problem.matrix[open_, open_]
        fits = cost + extra <= problem.limit
        if not fits.any():
            return x
        ratio = np.where(extra > 0, gain / np.maximum(extra, 1e-300), np.inf)
        ratio = np.where(fits, ratio, -np.inf)
        j = int(np.argmax(ratio))
        g = open_[j]
        x[g] += 1
        k[g] += delta[j]
        cost += extra[j]


def _best_exchange(problem: Problem, x: np.ndarray) -> tuple[int, int, int] | None:
    """``(shrink, depth, grow)``: the fitting exchange with the largest importance gain."""
    m = len(problem.levels)
    k = problem.counts(x)
    cost = problem.cost(k)
    grad = 2.0 * problem.matrix @ k + problem.linear
    diag = np.diag(problem.matrix)
    depth = EXCHANGE_DEPTH
    drop = np.full((m, depth), np.nan)  # channels removed when shrinking g by t+1 levels
    loss = np.full((m, depth), np.inf)
    up = np.full(m, np.nan)
    gain = np.full(m, -np.inf)
    for g, (lv, v) in enumerate(zip(problem.levels, problem.values, strict=True)):
        t = min(depth, x[g])
        if t:
            drop[g, :t] = k[g] - lv[x[g] - 1 - np.arange(t)]
            loss[g, :t] = v[x[g]] - v[x[g] - 1 - np.arange(t)]
        if x[g] + 1 < len(lv):
            up[g] = lv[x[g] + 1] - k[g]
            gain[g] = v[x[g] + 1] - v[x[g]]
    shrink_cost = -drop * grad[:, None] + drop * drop * diag[:, None]  # (m, depth)
    grow_cost = up * grad + up * up * diag  # (m,)
    cross = -2.0 * drop[:, :, None] * up[None, None, :] * problem.matrix[:, None, :]
    delta = shrink_cost[:, :, None] + grow_cost[None, None, :] + cross
    improvement = gain[None, None, :] - loss[:, :, None]
    improvement[np.arange(m), :, np.arange(m)] = -np.inf  # a group cannot trade with itself
    ok = np.nan_to_num(cost + delta, nan=np.inf) <= problem.limit
    improvement = np.where(ok, improvement, -np.inf)
    best = np.unravel_index(int(np.argmax(improvement)), improvement.shape)
    floor = _REL * max(problem.value(x), 1.0)
    if not improvement[best] > floor:
        return None
    shrink, t, grow = (int(i) for i in best)
    return shrink, t + 1, grow


def _pair_candidates(problem: Problem, x: np.ndarray) -> np.ndarray:
    """Per group, level indices a pair move may set: ``PAIR_WINDOW`` levels either
    side of the current one and ``PAIR_GRID`` levels spread over the whole range
    (padded with -1)."""
    rows = []
    for lv, i in zip(problem.levels, x, strict=True):
        near = np.arange(max(i - PAIR_WINDOW, 0), min(i + PAIR_WINDOW, len(lv) - 1) + 1)
        spread = np.round(np.linspace(0, len(lv) - 1, min(PAIR_GRID, len(lv)))).astype(int)
        rows.append(np.union1d(near, spread))
    width = max(len(r) for r in rows)
    return np.array([np.pad(r, (0, width - len(r)), constant_values=-1) for r in rows])


def _best_pair(problem: Problem, x: np.ndarray) -> tuple[int, int, int, int] | None:
    """``(g, level_g, h, level_h)``: the fitting re-assignment of two *coupled*
    groups (a layer between them, others fixed) with the largest importance gain,
    over :func:`_pair_candidates`. Coupling is what makes the cost non-convex:
    cutting one group deep makes its neighbour's channels cheap."""
    pairs = np.argwhere(np.triu(problem.matrix, 1) > 0)
    if not len(pairs):
        return None
    k = problem.counts(x)
    grad = 2.0 * problem.matrix @ k + problem.linear
    cand = _pair_candidates(problem, x)
    valid = cand >= 0
    safe = np.where(valid, cand, 0)
    counts = np.array([lv[c] for lv, c in zip(problem.levels, safe, strict=True)], dtype=float)
    d = np.where(valid, counts - k[:, None], 0.0)
    gain = np.array([v[c] - v[i] for v, c, i in zip(problem.values, safe, x, strict=True)])
    gain = np.where(valid, gain, -np.inf)
    own = grad[:, None] * d + np.diag(problem.matrix)[:, None] * d * d  # (m, G)
    g, h = pairs[:, 0], pairs[:, 1]
    cross = 2.0 * problem.matrix[g, h][:, None, None] * d[g][:, :, None] * d[h][:, None, :]
    delta = own[g][:, :, None] + own[h][:, None, :] + cross  # (pairs, G, G)
    total = gain[g][:, :, None] + gain[h][:, None, :]
    total = np.where(problem.cost(k) + delta <= problem.limit, total, -np.inf)
    flat = int(np.argmax(total))
    if not total.flat[flat] > _REL * max(problem.value(x), 1.0):
        return None
    p, i, j = np.unravel_index(flat, total.shape)
    return int(g[p]), int(cand[g[p], i]), int(h[p]), int(cand[h[p], j])

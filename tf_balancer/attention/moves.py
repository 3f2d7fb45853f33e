"""Local moves of the ``balanced`` search (:mod:`tf_balancer.attention.coupled`).

Each move changes a plan ``x`` (level index per group) of a
:class:`~tf_balancer.attention.coupled.Problem` and keeps it within the budget,
judged by the exact quadratic cost; :func:`improve` applies them until none
raises the plan's value (``m`` groups):

* *fill*: grow the group whose next level adds the most value per unit of exact
  cost, while one fits - ``O(m^2)`` per step;
* *exchange*: shrink one group by up to ``EXCHANGE_DEPTH`` levels to grow another
  by one level, the best gain that fits - ``O(m^2 * EXCHANGE_DEPTH)``;
* *pair*: re-assign two coupled groups jointly over a grid of their levels
  (``PAIR_WINDOW`` around the current one, ``PAIR_GRID`` across the range) -
  ``O(pairs * grid^2)``; coupling is what makes the cost non-convex;
* on small problems, *triple* (three groups by up to 2 levels each) and
  *grow-and-repair* (grow one group, shrink others greedily until it fits).

Example:
    >>> x = improve(problem, x)  # doctest: +SKIP
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np

__all__ = ["improve", "EXCHANGE_DEPTH", "PAIR_WINDOW", "PAIR_GRID"]

EXCHANGE_DEPTH = 16
PAIR_WINDOW = 4
PAIR_GRID = 12
_MAX_MOVES = 2000
_REL = 1e-12

Problem = Any  # a tf_balancer.attention.coupled.Problem (not imported: coupled imports this)


def improve(
    problem: Problem, x: np.ndarray, grow_depth: int = 0, seen: set[bytes] | None = None
) -> np.ndarray | None:
    """Apply moves until none raises the value: fill and exchange first (cheap), a
    pair re-assignment when they are stuck, then - with ``grow_depth`` (small
    problems) - triple and grow-and-repair moves (growing by up to ``grow_depth``).

    The moves are deterministic, so a search that reaches a plan an earlier search
    (sharing ``seen``) passed through ends where that one ended: it stops and
    returns ``None``."""
    for _ in range(_MAX_MOVES):
        if seen is not None:
            key = x.tobytes()
            if key in seen:
                return None
            seen.add(key)
        x = _fill(problem, x)
        move = _best_exchange(problem, x)
        if move is not None:
            shrink, depth, grow = move
            x[shrink] -= depth
            x[grow] += 1
            continue
        pair = _best_pair(problem, x)
        if pair is not None:
            x[pair[0]], x[pair[2]] = pair[1], pair[3]
            continue
        moved = None
        if grow_depth:
            moved = _best_triple(problem, x)
            if moved is None:
                moved = _best_grow_and_repair(problem, x, grow_depth)
        if moved is None:
            return x
        x = moved
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
        delta = problem.level_table[open_, x[open_] + 1] - k[open_]
        values = problem.value_table
        gain = values[open_, x[open_] + 1] - values[open_, x[open_]]
        grad = problem.gradient(k)[open_]
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
    grad = problem.gradient(k)
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
    grad = problem.gradient(k)
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


def _best_grow_and_repair(problem: Problem, x: np.ndarray, depth: int) -> np.ndarray | None:
    """Grow one group by up to ``depth`` levels, then shrink the others (one
    level at a time, least value lost per unit of cost saved) until the plan fits;
    the best such plan when it beats ``x``, else ``None``. Reaches trades among
    three or more groups that the pairwise moves cannot."""
    base = problem.value(x)
    best, best_value = None, base + _REL * max(abs(base), 1.0)
    top = np.array([len(lv) - 1 for lv in problem.levels])
    for h in np.flatnonzero(x < top):
        for step in range(1, min(depth, top[h] - x[h]) + 1):
            trial = x.copy()
            trial[h] += step
            trial = _repair(problem, trial, keep=h)
            if trial is not None and problem.value(trial) > best_value:
                best, best_value = trial, problem.value(trial)
    return best


def _repair(problem: Problem, x: np.ndarray, keep: int) -> np.ndarray | None:
    """Shrink groups other than ``keep`` until ``x`` fits (``None`` if it cannot)."""
    k = problem.counts(x)
    cost = problem.cost(k)
    while cost > problem.limit:
        room = np.flatnonzero(x > 0)
        room = room[room != keep]
        if not len(room):
            return None
        drop = k[room] - problem.level_table[room, x[room] - 1]
        values = problem.value_table
        loss = values[room, x[room]] - values[room, x[room] - 1]
        grad = problem.gradient(k)[room]
        saving = drop * grad - drop * drop * problem.matrix[room, room]
        j = int(np.argmin(np.where(saving > 0, loss / np.maximum(saving, 1e-300), np.inf)))
        g = room[j]
        x[g] -= 1
        k[g] -= drop[j]
        cost -= saving[j]
    return x


def _best_triple(problem: Problem, x: np.ndarray, depth: int = 2) -> np.ndarray | None:
    """The best fitting plan that moves three groups by up to ``depth`` levels each
    (others fixed), when it beats ``x``; ``O(m^3 (2 depth + 1)^3)``, small problems only."""
    m = len(problem.levels)
    if m < 3:
        return None
    base = problem.value(x)
    best, best_value = None, base + _REL * max(abs(base), 1.0)
    steps = np.array(list(itertools.product(range(-depth, depth + 1), repeat=3)))
    for trio in itertools.combinations(range(m), 3):
        trio = np.array(trio)
        top = np.array([len(problem.levels[g]) - 1 for g in trio])
        index = x[trio] + steps
        ok = np.all((index >= 0) & (index <= top), axis=1)
        if not ok.any():
            continue
        index = index[ok]
        plans = np.repeat(problem.counts(x)[None], len(index), axis=0)
        value = np.full(len(index), base)
        for j, g in enumerate(trio):
            plans[:, g] = problem.levels[g][index[:, j]]
            value += problem.values[g][index[:, j]] - problem.values[g][x[g]]
        value = np.where(problem.cost(plans) <= problem.limit, value, -np.inf)
        i = int(np.argmax(value))
        if value[i] > best_value:
            best, best_value = x.copy(), value[i]
            best[trio] = index[i]
    return best

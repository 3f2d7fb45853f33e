"""Per-layer weight-sparsity targets for tfmot pruning: uniform, or balanced by importance.

The unstructured counterpart of :func:`~tf_balancer.attention.balance.allocate`:
given a mean sparsity over all prunable weights, decide how sparse each
prunable layer (see :func:`~tf_balancer.sparse.wrapping.prunable_kernels`) should be.
Both functions are re-exported by :mod:`tf_balancer.sparse.wrapping`; importing this
module imports tfmot.

Example:
    >>> from tf_balancer._compat import keras
    >>> dense = keras.layers.Dense
    >>> m = keras.Sequential([keras.Input((64,)), dense(64, name="a"), dense(2, name="b")])
    >>> uniform_sparsity_targets(m, 0.5)
    {'a': 0.5, 'b': 0.5}
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from tf_balancer.config.checks import check_sparsity
from tf_balancer.errors import BalanceError, ConfigError
from tf_balancer.sparse._tfmot import prunable_kernels

__all__ = ["balanced_sparsity_targets", "uniform_sparsity_targets"]


def uniform_sparsity_targets(model: Any, target_sparsity: float) -> dict[str, float]:
    """The same sparsity for every prunable layer.

    Raises:
        UnsupportedModelError: for a Keras 3 model.
        ConfigError: for a target outside [0, 1).
    """
    target = check_sparsity("target_sparsity", target_sparsity)
    return {name: target for name in prunable_kernels(model)}


def balanced_sparsity_targets(
    model: Any,
    target_sparsity: float,
    scores: Mapping[str, float] | None = None,
    *,
    max_sparsity: float = 0.95,
) -> dict[str, float]:
    """Per-layer sparsities with parameter-weighted mean ``target_sparsity``.

    Layer ``l`` has ``n_l`` prunable weights and importance ``I_l`` (``scores``,
    default ``sum |w|`` of its kernels); its importance density is
    ``d_l = I_l / n_l`` (mean ``|w|`` by default), normalised by the largest.
    Keeping the fraction ``k_l = 1 - s_l`` of layer ``l`` is valued
    ``n_l d_l log k_l`` (diminishing returns); maximising the sum subject to the
    budget ``sum_l n_l s_l = T sum_l n_l`` and ``0 <= s_l <= max_sparsity`` gives,
    by the KKT conditions, ``s_l = clip(1 - lambda d_l, 0, max_sparsity)``.
    The mean is non-increasing in ``lambda``, which is found by bisection. So
    layers with low importance per weight (large layers with small weights)
    are pruned most.

    Args:
        model: a tf_keras model (wrapped or not).
        target_sparsity: parameter-weighted mean sparsity, in [0, max_sparsity].
        scores: layer name -> importance >= 0 for every prunable layer (extra
            names are ignored). Defaults to ``sum |w|``.
        max_sparsity: upper bound of every layer's sparsity, in [0, 1).

    Returns:
        Layer name -> sparsity, for every prunable layer.

    Raises:
        ConfigError: for values out of range or scores missing a layer.
        BalanceError: when zero-importance layers alone exceed the budget.

    Example:
        >>> from tf_balancer._compat import keras
        >>> dense = keras.layers.Dense
        >>> m = keras.Sequential([keras.Input((64,)), dense(64, name="a"), dense(2, name="b")])
        >>> targets = balanced_sparsity_targets(m, 0.5)
        >>> targets["a"] > targets["b"]
        True
    """
    target = check_sparsity("target_sparsity", target_sparsity)
    cap = check_sparsity("max_sparsity", max_sparsity)
    if target > cap:
        raise ConfigError(
            f"target_sparsity {target} exceeds max_sparsity {cap}; raise max_sparsity"
        )
    kernels = prunable_kernels(model)
    if not kernels:
        return {}
    names = list(kernels)
    sizes = np.array([sum(k.size for k in kernels[name]) for name in names], dtype=np.float64)
    importance = _importance(kernels, scores)
    density = importance / sizes
    density = density / density.max() if density.max() > 0 else density
    lam = _solve_lambda(density, sizes, target, cap)
    sparsity = np.clip(1.0 - lam * density, 0.0, cap)
    return {name: float(s) for name, s in zip(names, sparsity, strict=True)}


def _importance(
    kernels: Mapping[str, list[np.ndarray]], scores: Mapping[str, float] | None
) -> np.ndarray:
    if scores is None:
        return np.array([sum(np.abs(k).sum() for k in ks) for ks in kernels.values()], "float64")
    missing = sorted(set(kernels) - set(scores))
    if missing:
        raise ConfigError(f"scores lack prunable layers {missing}; give a score for each")
    values = np.array([float(scores[name]) for name in kernels], dtype=np.float64)
    if not np.all(np.isfinite(values) & (values >= 0)):
        raise ConfigError(f"scores must be finite numbers >= 0, got {dict(scores)}")
    return values


def _solve_lambda(density: np.ndarray, sizes: np.ndarray, target: float, cap: float) -> float:
    def mean_sparsity(lam: float) -> float:
        return float(np.dot(sizes, np.clip(1.0 - lam * density, 0.0, cap)) / sizes.sum())

    positive = density[density > 0]
    hi = 1.0 / positive.min() if positive.size else 0.0
    if mean_sparsity(hi) > target + 1e-12:
        raise BalanceError(
            f"layers with zero importance stay at max_sparsity {cap} and alone exceed "
            f"target_sparsity {target}; give them a positive score or lower max_sparsity"
        )
    lo = 0.0
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if mean_sparsity(mid) > target else (lo, mid)
    return 0.5 * (lo + hi)

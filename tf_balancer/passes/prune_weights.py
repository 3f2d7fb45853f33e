"""``prune_weights``: one-shot tfmot magnitude pruning of the prunable kernels.

The pass wraps the target layers with tfmot's ``PruneLowMagnitude`` (see
:func:`tf_balancer.sparse.wrapping.wrap_for_pruning`), runs tfmot's mask update once
at the end of the schedule (so every mask is at its final sparsity), applies
the masks and strips the wrappers. The result is a new model with the same
layers and shapes whose kernels hold the requested fraction of exact zeros.

Per-layer targets come from ``ctx.sparsity`` (layer name -> sparsity) when it is
non-empty; otherwise from ``ctx.options_for("prune_weights")``:

* ``target_sparsity``: parameter-weighted mean sparsity, in [0, 1). Defaults to 0.8.
* ``strategy``: ``"balanced"`` (:func:`~tf_balancer.sparse.wrapping.balanced_sparsity_targets`)
  or ``"uniform"``. Defaults to ``"balanced"``.
* ``m_by_n``: ``(m, n)``, m zeros in every n consecutive input-channel weights
  (Dense and Conv2D only); the targets are then ``m / n``. Defaults to None.
* ``max_sparsity``: cap of a layer's sparsity for ``"balanced"``. Defaults to 0.95.

Pruning changes the function, so ``preserves_function`` is False; fine-tune
afterwards to recover accuracy. Unstructured sparsity gives no CPU speed-up:
the kernels stay dense. It shrinks the *compressed* weights, which the stats
report (``compressed_bytes_before``/``after``: gzip of all weights).

Example:
    >>> from tf_balancer._compat import keras
    >>> model = keras.Sequential([keras.Input((32,)), keras.layers.Dense(32, name="fc")])
    >>> ctx = PassContext(sparsity={"fc": 0.5})
    >>> result = PruneWeights().run(model, None, ctx)
    >>> result.changed, result.stats["sparsity"]["fc"]
    (True, 0.5)
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from tf_balancer._compat import ensure_keras2_model
from tf_balancer.errors import ConfigError
from tf_balancer.passes.base import GraphPass, PassContext, PassResult, register_pass

__all__ = ["PruneWeights"]

_log = logging.getLogger(__name__)

_DEFAULTS: Mapping[str, Any] = {
    "target_sparsity": 0.8,
    "strategy": "balanced",
    "m_by_n": None,
    "max_sparsity": 0.95,
}


def _strategies() -> dict[str, Any]:
    from tf_balancer.sparse import wrapping  # imports tfmot (slow), so only when the pass runs

    return {
        "balanced": lambda model, opts: wrapping.balanced_sparsity_targets(
            model, opts["target_sparsity"], max_sparsity=opts["max_sparsity"]
        ),
        "uniform": lambda model, opts: wrapping.uniform_sparsity_targets(
            model, opts["target_sparsity"]
        ),
    }


def _options(ctx: PassContext) -> dict[str, Any]:
    given = dict(ctx.options_for("prune_weights"))
    unknown = sorted(set(given) - set(_DEFAULTS))
    if unknown:
        raise ConfigError(
            f"unknown prune_weights option(s) {unknown}; known: {', '.join(sorted(_DEFAULTS))}"
        )
    return {**_DEFAULTS, **{k: v for k, v in given.items() if v is not None}}


def _requested(target: float, m_by_n: tuple[int, int] | None) -> float:
    return m_by_n[0] / m_by_n[1] if m_by_n else float(target)


@register_pass("prune_weights")
class PruneWeights(GraphPass):
    """One-shot magnitude pruning to per-layer sparsity targets; see the module docstring.

    ``PassResult.stats``: ``targets`` and achieved ``sparsity`` (layer name ->
    fraction of zeros), ``overall_sparsity`` (over all prunable kernels),
    ``m_by_n``, and ``compressed_bytes_before``/``compressed_bytes_after`` (gzip
    of all weights). ``changed`` is False when no layer has a target above 0 or
    no layer can be pruned (e.g. only DepthwiseConv kernels).
    """

    preserves_function = False

    def run(self, model: Any, graph: Any, ctx: PassContext) -> PassResult:
        from tf_balancer.sparse import wrapping

        ensure_keras2_model(model)
        options = _options(ctx)
        if ctx.sparsity:
            targets = dict(ctx.sparsity)
        else:
            strategies = _strategies()
            if options["strategy"] not in strategies:
                raise ConfigError(
                    f"prune_weights strategy {options['strategy']!r} is unknown; "
                    f"use one of {', '.join(sorted(strategies))}"
                )
            targets = strategies[options["strategy"]](model, options)
        m_by_n = wrapping.check_m_by_n(options["m_by_n"])
        if m_by_n is None and not any(float(v) > 0 for v in targets.values()):
            return PassResult(model, changed=False, message="no layer with a sparsity target > 0")
        wrapped, variables = wrapping.wrap_for_pruning(
            model, targets, begin_step=0, end_step=1, frequency=1, m_by_n=m_by_n
        )
        if not variables:
            return PassResult(model, changed=False, message="no layer tfmot can prune")
        wrapping.update_masks(wrapped, step=1)  # the schedule's end: final sparsity
        pruned = wrapping.strip(wrapped)
        achieved = wrapping.weight_sparsity(pruned)
        stats = {
            "targets": {name: _requested(targets[name], m_by_n) for name in variables},
            "sparsity": {name: achieved[name] for name in variables},
            "overall_sparsity": wrapping.overall_sparsity(pruned),
            "m_by_n": m_by_n,
            "compressed_bytes_before": wrapping.compressed_weight_bytes(model),
            "compressed_bytes_after": wrapping.compressed_weight_bytes(pruned),
        }
        message = (
            f"pruned {len(variables)} layer(s) to {stats['overall_sparsity']:.1%} overall "
            f"sparsity; gzip weights {stats['compressed_bytes_before']} -> "
            f"{stats['compressed_bytes_after']} bytes"
        )
        _log.info(message)
        return PassResult(pruned, changed=True, message=message, stats=stats)

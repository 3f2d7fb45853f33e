"""One-shot pruning helpers: BatchNorm statistics re-estimated, plans compared on data.

Cutting channels out of a trained network shifts the activations every later
BatchNormalization normalises: its moving mean and variance describe the dense
network, not the pruned one (Li et al., 2020, "EagleEye: Fast Sub-net
Evaluation for Efficient Neural Network Pruning"). :func:`recalibrate_batchnorm`
re-estimates them on a few batches - no gradient, no weight but the statistics
changes - and :func:`best_plan` uses it to compare candidate plans by the loss
each pruned network has on the same data, the way they will be judged after.

Measured on the digits CNN trained 8 epochs, pruned once to 0.125 FLOPs (3
seeds): the masked copies of the candidate plans score 17-78% on the training
data with the dense statistics, 26-88% with re-estimated ones; after 2
fine-tuning epochs the plan chosen by loss scores 98.44% on validation, uniform
97.55%, the default ``retained`` plan alone 97.10% (``benchmarks.bench_defaults``).

Example:
    >>> recalibrate_batchnorm(compacted, x_train[:2048])  # doctest: +SKIP
    >>> name, plan = best_plan(analysis, {"sum": a, "retained": b}, (x, y), loss)  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np

from tf_balancer._compat import is_layer, layers_of
from tf_balancer.attention.balance import KeepPlan
from tf_balancer.attention.masks import masked_copy

__all__ = ["recalibrate_batchnorm", "best_plan"]

logger = logging.getLogger(__name__)


def _batch_norms(model: Any) -> list[Any]:
    return [layer for layer in layers_of(model) if is_layer(layer, "BatchNormalization")]


def recalibrate_batchnorm(model: Any, x: Any, batch_size: int = 256) -> int:
    """Re-estimate every BatchNormalization layer's moving statistics on ``x``.

    The model runs forward in training mode over ``x``; each layer's momentum is
    set so that its moving mean and variance become the average over the
    batches (momentum ``i / (i + 1)`` at batch ``i``), then restored. Only those
    statistics change (frozen layers, ``trainable=False``, are left as they are).
    Modifies ``model``: give it a copy of anything you want to keep.

    Args:
        model: a Keras model (either Keras).
        x: inputs (an array, or a list of arrays for several inputs).
        batch_size: rows per forward pass. Defaults to 256.

    Returns:
        The number of BatchNormalization layers re-estimated.

    Example:
        >>> recalibrate_batchnorm(pruned_copy, x_train)  # doctest: +SKIP
        5
    """
    layers = [bn for bn in _batch_norms(model) if bn.trainable]
    if not layers:
        return 0
    rows = len(x[0]) if isinstance(x, (list, tuple)) else len(x)
    momenta = [bn.momentum for bn in layers]
    try:
        for i, start in enumerate(range(0, rows, batch_size)):
            for bn in layers:
                bn.momentum = i / (i + 1)
            model(_rows(x, start, start + batch_size), training=True)
    finally:
        for bn, momentum in zip(layers, momenta, strict=True):
            bn.momentum = momentum
    return len(layers)


def _rows(x: Any, start: int, stop: int) -> Any:
    if isinstance(x, (list, tuple)):
        return [np.asarray(a[start:stop]) for a in x]
    return np.asarray(x[start:stop])


def best_plan(
    analysis: Any,
    plans: Mapping[str, KeepPlan],
    data: tuple[Any, Any],
    loss: Any,
    batch_size: int = 256,
) -> tuple[str, KeepPlan]:
    """The plan whose pruned network has the lowest ``loss`` on ``data``.

    Each plan is applied to a masked copy of the analysed model (the model is not
    touched), its BatchNorm statistics are re-estimated on ``data`` and its loss
    is measured there. Ties keep the first plan.

    Args:
        analysis: the model's :class:`~tf_balancer.analysis.ModelAnalysis`.
        plans: name -> plan, in order of preference.
        data: ``(x, y)``.
        loss: the model's compiled loss (anything ``Model.compile(loss=...)`` takes).
        batch_size: rows per forward pass. Defaults to 256.

    Returns:
        ``(name, plan)`` of the best plan.
    """
    x, y = data
    losses = {}
    for name, plan in plans.items():
        copy = masked_copy(analysis.graph, plan)
        recalibrate_batchnorm(copy, x, batch_size)
        copy.compile(loss=loss)
        result = copy.evaluate(x, y, batch_size=batch_size, verbose=0, return_dict=True)
        value = float(result["loss"])
        losses[name] = value if np.isfinite(value) else np.inf
    best = min(losses, key=lambda name: (losses[name], list(plans).index(name)))
    logger.info(
        "plans by loss on the pruning data (BatchNorm re-estimated): %s; using %r",
        ", ".join(f"{name} {value:.4g}" for name, value in losses.items()),
        best,
    )
    return best, plans[best]

"""``mode="sparse"`` of :class:`~tf_balancer.training.callback.BalanceCallback`: tfmot weight pruning.

The model is wrapped before compiling with
:func:`tf_balancer.sparse.wrapping.wrap_for_pruning`, which gives every prunable layer a
schedule whose final sparsity is a ``tf.Variable``. At each rebalance the callback
computes per-layer sparsities for the ramped target (``balanced``: more sparsity
where importance per weight is low; ``uniform``: the same everywhere) and assigns
them to those variables: the compiled train function keeps running, nothing is
recompiled. The callback also does tfmot's ``UpdatePruningStep`` work, so users
do not add that callback themselves.

Unstructured sparsity gives no CPU speed-up in TensorFlow; it makes compressed
files smaller. Use ``mode="structured"`` for speed.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tf_balancer.errors import ConfigError

__all__ = ["check_sparse_model", "rebalance_sparsity", "sparse_ratios"]

WRAP_ARGS = "end_step=0, prune_after_end=True"
MAX_SPARSITY = 0.95
"""No layer is pruned beyond this (and the overall target is capped at it)."""


def check_sparse_model(model: Any) -> None:
    """Raise a ConfigError naming the fix when the model is not wrapped for pruning.

    The callback's epoch ramp drives the targets, so each wrapper's own schedule
    must apply its (variable) final sparsity at once and keep doing so:
    ``end_step=0, prune_after_end=True``.
    """
    from tf_balancer.sparse import wrapping

    variables = wrapping.target_variables(model)
    if not variables:
        raise ConfigError(
            "mode='sparse' needs a model wrapped for pruning before compile: "
            f"`model, _ = tf_balancer.sparse.wrapping.wrap_for_pruning(model, targets, {WRAP_ARGS})`, "
            "then model.compile(...) and fit with the callback"
        )
    for layer in wrapping.wrappers(model):
        schedule = layer.pruning_schedule
        if schedule.end_step != schedule.begin_step or not schedule.prune_after_end:
            raise ConfigError(
                f"layer {layer.layer.name!r}: in mode='sparse' the callback ramps the targets, so "
                f"wrap with wrap_for_pruning(model, targets, {WRAP_ARGS}) (its own schedule "
                "would otherwise lag behind or stop at end_step)"
            )


def rebalance_sparsity(callback: Any, scores: Any, target: float) -> dict[int, np.ndarray]:
    """Assign per-layer sparsities for keeping ``target`` of the prunable weights."""
    from tf_balancer.sparse import wrapping

    model = callback.model
    variables = wrapping.target_variables(model)
    goal = min(max(1.0 - target, 0.0), MAX_SPARSITY)
    if callback.strategy == "uniform":
        targets = wrapping.uniform_sparsity_targets(model, goal)
    else:
        targets = wrapping.balanced_sparsity_targets(model, goal, max_sparsity=MAX_SPARSITY)
    wrapping.set_targets(variables, {k: v for k, v in targets.items() if k in variables})
    return {g.id: np.arange(g.size) for g in callback.analysis.graph.prunable_groups}


def sparse_ratios(callback: Any) -> tuple[float, float, float]:
    """(FLOPs ratio, non-zero params ratio, weight sparsity): dense FLOPs do not change."""
    from tf_balancer.sparse import wrapping

    kernels = [k for ks in wrapping.prunable_kernels(callback.model).values() for k in ks]
    zeros = sum(int(np.count_nonzero(k == 0)) for k in kernels)
    total = max(callback.analysis.cost.params, 1)
    return 1.0, 1.0 - zeros / total, wrapping.overall_sparsity(callback.model)

"""tf_balancer: cost-aware structured pruning for tf_keras models.

Trace a model, cost every layer, weigh each channel's importance against what it
costs, prune to a FLOPs or params target with balanced per-layer budgets, and
compact the result with a Grappler-style pass pipeline.

Example:
    >>> import tf_balancer as tfb
    >>> callback = tfb.BalanceCallback(target=0.5, probe_data=(x, y))  # doctest: +SKIP
    >>> model.fit(x, y, epochs=8, callbacks=[callback])                # doctest: +SKIP
"""

import importlib

__version__ = "0.1.0"

# Errors are light; everything else loads on first use, so `tf-balancer --help` and the
# CLI's input checks do not wait for TensorFlow to import.
from tf_balancer.errors import (
    BalanceError,
    ConfigError,
    ExportError,
    ModelLoadError,
    PassError,
    TFBalancerError,
    UnsupportedModelError,
    VerificationError,
)

_EXPORTS = {
    "allocate": "tf_balancer.attention.balance",
    "Allocation": "tf_balancer.attention.balance",
    "analyze": "tf_balancer.analysis",
    "apply_masks": "tf_balancer.attention.masks",
    "attention_weights": "tf_balancer.attention.importance",
    "balance_score": "tf_balancer.attention.importance",
    "BalanceCallback": "tf_balancer.training.callback",
    "BalanceConfig": "tf_balancer.config",
    "Bounds": "tf_balancer.attention.balance",
    "GraphPass": "tf_balancer.passes.base",
    "group_scores": "tf_balancer.attention.importance",
    "inspect": "tf_balancer.analysis",
    "InspectResult": "tf_balancer.analysis",
    "KeepPlan": "tf_balancer.attention.balance",
    "LayerGraph": "tf_balancer.graph.layer_graph",
    "load_config": "tf_balancer.config",
    "macro_scores": "tf_balancer.metrics",
    "MacroF1": "tf_balancer.metrics",
    "MacroRecall": "tf_balancer.metrics",
    "masked_copy": "tf_balancer.attention.masks",
    "MetaOptimizer": "tf_balancer.optimizer",
    "ModelAnalysis": "tf_balancer.analysis",
    "OptimizationReport": "tf_balancer.optimizer",
    "optimize_saved_model": "tf_balancer.export.savedmodel",
    "export_tflite": "tf_balancer.export.tflite",
    "OptimizeConfig": "tf_balancer.config",
    "prune": "tf_balancer.training.oneshot",
    "PassContext": "tf_balancer.passes.base",
    "PassResult": "tf_balancer.passes.base",
    "ProbeData": "tf_balancer.attention.importance",
    "RebuildPass": "tf_balancer.passes._rebuild",
    "Replacement": "tf_balancer.passes._rebuild",
    "Rewrite": "tf_balancer.passes._rebuild",
    "register_importance": "tf_balancer.attention.importance",
    "register_pass": "tf_balancer.passes.base",
    "registered_passes": "tf_balancer.passes.base",
    "SparsityConfig": "tf_balancer.config",
    "summary_markdown": "tf_balancer.report",
    "trace": "tf_balancer.graph.trace",
    "unregister_pass": "tf_balancer.passes.base",
    "VerifyConfig": "tf_balancer.config",
}


def __getattr__(name: str):
    """Import a public name from its module on first use (PEP 562)."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'tf_balancer' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


__all__ = [
    "__version__",
    "Allocation",
    "BalanceCallback",
    "BalanceConfig",
    "BalanceError",
    "Bounds",
    "ConfigError",
    "ExportError",
    "GraphPass",
    "InspectResult",
    "KeepPlan",
    "LayerGraph",
    "MacroF1",
    "MacroRecall",
    "MetaOptimizer",
    "ModelAnalysis",
    "ModelLoadError",
    "OptimizationReport",
    "OptimizeConfig",
    "PassContext",
    "PassError",
    "PassResult",
    "ProbeData",
    "RebuildPass",
    "Replacement",
    "Rewrite",
    "SparsityConfig",
    "TFBalancerError",
    "UnsupportedModelError",
    "VerificationError",
    "VerifyConfig",
    "allocate",
    "analyze",
    "apply_masks",
    "attention_weights",
    "balance_score",
    "group_scores",
    "inspect",
    "load_config",
    "macro_scores",
    "masked_copy",
    "optimize_saved_model",
    "prune",
    "register_importance",
    "register_pass",
    "registered_passes",
    "summary_markdown",
    "trace",
    "unregister_pass",
]

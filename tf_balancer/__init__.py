"""tf_balancer: cost-aware structured pruning for tf_keras models.

Trace a model, cost every layer, weigh each channel's importance against what it
costs, prune to a FLOPs or params target with balanced per-layer budgets, and
compact the result with a Grappler-style pass pipeline.

Example:
    >>> import tf_balancer as tfb
    >>> callback = tfb.BalanceCallback(target=0.5, probe_data=(x, y))  # doctest: +SKIP
    >>> model.fit(x, y, epochs=8, callbacks=[callback])                # doctest: +SKIP
"""

__version__ = "0.1.0"

from tf_balancer.analysis import InspectResult, ModelAnalysis, analyze, inspect
from tf_balancer.attention.balance import Allocation, Bounds, KeepPlan, allocate
from tf_balancer.attention.importance import (
    ProbeData,
    attention_weights,
    balance_score,
    group_scores,
    register_importance,
)
from tf_balancer.attention.masks import apply_masks, masked_copy
from tf_balancer.callback import BalanceCallback
from tf_balancer.config import (
    BalanceConfig,
    OptimizeConfig,
    SparsityConfig,
    VerifyConfig,
    load_config,
)
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
from tf_balancer.finalize import summary_markdown
from tf_balancer.graph.layer_graph import LayerGraph
from tf_balancer.graph.trace import trace
from tf_balancer.metrics import MacroF1, MacroRecall, macro_scores
from tf_balancer.optimizer import MetaOptimizer, OptimizationReport
from tf_balancer.passes.base import (
    GraphPass,
    PassContext,
    PassResult,
    register_pass,
    registered_passes,
    unregister_pass,
)
from tf_balancer.savedmodel import optimize_saved_model

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
    "register_importance",
    "register_pass",
    "registered_passes",
    "summary_markdown",
    "trace",
    "unregister_pass",
]

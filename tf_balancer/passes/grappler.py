"""``grappler``: TensorFlow's own Grappler meta-optimizer on the frozen inference graph.

The Keras model is traced (batch axis left open), its variables frozen into
constants, and Grappler (constant folding, arithmetic simplification,
remapping/fusion, dependency optimization, dead-node pruning) rewrites the
GraphDef. The result is a callable concrete function, not a Keras model, so
this pass must run last. Node counts before/after are recorded.

Example:
    >>> result = GrapplerPass().run(model, graph, PassContext())  # doctest: +SKIP
    >>> result.stats["nodes_after"] <= result.stats["nodes_before"]  # doctest: +SKIP
    True
"""

from __future__ import annotations

from typing import Any

from tf_balancer.graph.grappler import DEFAULT_OPTIMIZERS, optimize_graph_def
from tf_balancer.graph.trace import trace_keras
from tf_balancer.input_shapes import nominal_shapes, set_nominal_shapes
from tf_balancer.passes.base import GraphPass, PassContext, PassResult, register_pass

__all__ = ["GrapplerPass"]


@register_pass("grappler")
class GrapplerPass(GraphPass):
    """Run Grappler over the frozen graph; returns a concrete function."""

    keras_output = False

    def run(self, model: Any, graph: Any, ctx: PassContext) -> PassResult:
        optimizers = tuple(ctx.options_for("grappler").get("optimizers", DEFAULT_OPTIMIZERS))
        traced = trace_keras(model, batch_size=None)
        function, stats = optimize_graph_def(
            traced.graph_def, traced.input_names, traced.output_names, optimizers
        )
        nominal = nominal_shapes(model)
        if nominal is not None:  # costed at the same sizes as the model
            set_nominal_shapes(function, nominal)
        message = f"{stats['nodes_before']} -> {stats['nodes_after']} graph nodes"
        if "remap_skipped" in stats:
            message += (
                f" (without remap, whose result TensorFlow rejected: {stats['remap_skipped']})"
            )
        return PassResult(function, changed=True, message=message, stats=stats)

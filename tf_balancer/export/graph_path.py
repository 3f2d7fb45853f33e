"""GraphDef-level optimization of SavedModel signatures, and their graph statistics.

The plain path of :func:`~tf_balancer.export.savedmodel.optimize_saved_model` (for a
SavedModel without ``keras_metadata.pb``, e.g. a ``tf.Module``): each
signature is frozen, its batch norms folded (``fold_batchnorm``, with
:func:`~tf_balancer.graph.graphdef_fold.fold_batchnorm_graphdef`) and Grappler
run (``grappler``); a failing step is rolled back unless ``fail_on_error``.
:func:`graph_stats` measures any signature (both paths report it): ops per
type, FLOPs (a Grappler-fused op counted as its base op plus its fused adds)
and params at batch 1.

Example:
    >>> calls, records = optimize_signatures(loaded.signatures, config)  # doctest: +SKIP
    >>> [(r["name"], r["status"]) for r in records]  # doctest: +SKIP
    [('fold_batchnorm', 'applied'), ('grappler', 'applied')]
    >>> graph_stats(loaded.signatures["serving_default"])["flops"]  # doctest: +SKIP
    1204224
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import tensorflow as tf
from tensorflow.python.framework import ops as tf_ops

from tf_balancer.config import OptimizeConfig
from tf_balancer.errors import PassError
from tf_balancer.graph.graphdef_fold import fold_batchnorm_graphdef
from tf_balancer.graph.grappler import graph_def_to_function, op_type_counts, run_grappler
from tf_balancer.graph.trace import op_flops, trace_function

__all__ = ["optimize_signatures", "graph_stats"]

_LOG = logging.getLogger(__name__)

_FUSED_BASE = {
    "_FusedConv2D": "Conv2D",
    "_FusedDepthwiseConv2dNative": "DepthwiseConv2dNative",
    "_FusedMatMul": "MatMul",
}
_COUNTED_FUSIONS = (b"BiasAdd", b"Add", b"AddV2")  # TF's profiler counts 1 FLOP per element


def _graph_step(records, name, signature, fail_on_error, step, graph_def):
    """Run ``step(graph_def) -> (graph_def, message, stats)``; roll back a failure."""
    start = time.perf_counter()
    try:
        new, message, stats = step(graph_def)
    except Exception as err:  # a failing step is rolled back, as MetaOptimizer does
        if fail_on_error:
            raise PassError(f"pass {name!r} failed on signature {signature!r}: {err}") from err
        _LOG.warning("pass %s failed on %s and was rolled back: %s", name, signature, err)
        new, message, stats = graph_def, f"error: {err}", {}
        status = "rolled_back"
    else:
        status = "applied" if stats.get("changed", True) else "unchanged"
    records.append(
        {
            "name": name,
            "signature": signature,
            "status": status,
            "message": message,
            "seconds": time.perf_counter() - start,
            "stats": stats,
        }
    )
    return new


def _optimize_signature(name: str, signature: Any, config: OptimizeConfig, records: list) -> Any:
    frozen = trace_function(signature, batch_size=None).function
    inputs = [t.name for t in frozen.inputs]
    fetches = [t.name for t in frozen.outputs]
    outputs = tf.nest.pack_sequence_as(signature.structured_outputs, fetches)
    graph_def = frozen.graph.as_graph_def()
    keep = {ref.split(":")[0] for ref in inputs + fetches}

    def fold(gd):
        folded, stats = fold_batchnorm_graphdef(gd, protected=keep)
        stats = {
            "changed": stats["folds"] > 0,
            "folds": stats["folds"],
            "skipped": stats["skipped"],
        }
        return folded, f"folded {stats['folds']} batch norm(s)", stats

    def grappler(gd):
        optimized = run_grappler(gd, inputs, fetches, fail_on_error=config.fail_on_error)
        stats = {"nodes_before": len(gd.node), "nodes_after": len(optimized.node)}
        return optimized, f"{len(gd.node)} -> {len(optimized.node)} graph nodes", stats

    for pass_name, step in (("fold_batchnorm", fold), ("grappler", grappler)):
        if pass_name in config.passes:
            graph_def = _graph_step(records, pass_name, name, config.fail_on_error, step, graph_def)
    function = graph_def_to_function(graph_def, inputs, outputs)
    # the frozen inputs follow the sorted keyword order
    keys = sorted(signature.structured_input_signature[1])
    return lambda feed: function(*[feed[key] for key in keys])


def optimize_signatures(
    signatures: Mapping[str, Any], config: OptimizeConfig
) -> tuple[dict[str, Callable], list[dict[str, Any]]]:
    """Freeze each signature and run ``fold_batchnorm`` and ``grappler`` (if in ``config.passes``).

    Args:
        signatures: signature name -> concrete function (a SavedModel signature).
        config: the recipe; other passes are ignored here.

    Returns:
        ``(calls, records)``: signature name -> ``feed -> {output key: tensor}``
        running the optimized graph, and one record per pass and signature
        (``name``, ``signature``, ``status``, ``message``, ``seconds``, ``stats``).

    Raises:
        PassError: a pass failed and ``config.fail_on_error`` is set.
    """
    records: list[dict[str, Any]] = []
    calls = {
        name: _optimize_signature(name, sig, config, records) for name, sig in signatures.items()
    }
    return calls, records


def _flops(graph: tf.Graph) -> int:
    """TF profiler FLOPs; a Grappler-fused op counts as its base op plus its fused adds."""
    flops = op_flops(graph)
    for op in graph.get_operations():
        base = _FUSED_BASE.get(op.type)
        if base and not flops.get(op.name):
            node_def = type(op.node_def)()
            node_def.CopyFrom(op.node_def)
            node_def.op = base
            value = tf_ops.get_stats_for_node_def(graph, node_def, "flops").value or 0
            elements = op.outputs[0].shape.num_elements() or 0
            adds = [f for f in op.get_attr("fused_ops") if f in _COUNTED_FUSIONS]
            flops[op.name] = int(value) + elements * len(adds)
    return sum(flops.values())


def graph_stats(signature: Any) -> dict[str, Any]:
    """Ops per type, FLOPs and params (float constant elements) at batch 1.

    Returns:
        ``{"nodes": int, "ops": {op type: count}, "flops": int, "params": int}``.
    """
    traced = trace_function(signature, batch_size=1)
    params = 0
    for node in traced.graph_def.node:
        if node.op == "Const" and tf.as_dtype(node.attr["dtype"].type).is_floating:
            params += int(np.prod([d.size for d in node.attr["value"].tensor.tensor_shape.dim]))
    ops = op_type_counts(traced.graph_def)
    return {
        "nodes": sum(ops.values()),
        "ops": ops,
        "flops": _flops(traced.graph),
        "flops_hidden": _hidden_flops(traced.graph),
        "params": params,
    }


_HIDING_OPS = {
    "While": "a loop (e.g. a recurrent layer)",
    "StatelessWhile": "a loop (e.g. a recurrent layer)",
    "PartitionedCall": "a function call",
    "StatefulPartitionedCall": "a function call",
}


def _hidden_flops(graph: tf.Graph) -> str:
    """Why TF's profiler cannot count all of a graph's FLOPs ("" when it can): ops
    inside a loop or a function call, or outputs of unknown shape, count 0."""
    for op in graph.get_operations():
        if op.type in _HIDING_OPS:
            return f"{_HIDING_OPS[op.type]} hides its ops"
    for op in graph.get_operations():
        if op.type in _COUNTED_OPS and not op.outputs[0].shape.is_fully_defined():
            return f"{op.type} outputs of unknown shape (in {'/'.join(op.name.split('/')[-4:-1])})"
    return ""


_COUNTED_OPS = frozenset(
    {"MatMul", "BatchMatMulV2", "Conv2D", "DepthwiseConv2dNative", "BiasAdd", "AddV2", "Mul"}
)

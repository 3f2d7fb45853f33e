"""Run TensorFlow's Grappler over a frozen inference GraphDef, and call the result.

Grappler is TF's graph optimizer (constant folding, arithmetic simplification,
op fusion, ...). It normally runs inside a session or ``tf.function`` call; here
it is run offline, once, the way the TF Lite converter does it
(``tensorflow/lite/python/util.py: run_graph_optimizations``): the GraphDef is
wrapped in a ``MetaGraphDef`` whose ``train_op`` collection names the fetches,
and handed to ``tf_optimizer.OptimizeGraph`` with a ``RewriterConfig`` that turns
on exactly the requested optimizers.

Optimizer names are Grappler's own (the ones ``RewriterConfig.optimizers``
accepts); :data:`GRAPPLER_OPTIMIZERS` maps each to its ``RewriterConfig`` toggle.
``remap`` fuses ops into device-specific kernels (``_FusedConv2D``,
``_FusedMatMul`` on CPU; it needs to know the device, hence ``device=``); the
result runs in this TF build but is not meant to be converted by other tools.

Example:
    >>> import tensorflow as tf
    >>> from tf_balancer.graph.trace import freeze
    >>> fn = tf.function(lambda x: x * tf.constant(2.0) * tf.constant(3.0))
    >>> _, frozen = freeze(fn.get_concrete_function(tf.TensorSpec([2], tf.float32)))
    >>> fast, stats = optimize_concrete_function(frozen)
    >>> float(fast(tf.ones([2]))[0][1])
    6.0
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

import tensorflow as tf
from tensorflow.core.protobuf import config_pb2, meta_graph_pb2, rewriter_config_pb2
from tensorflow.python.grappler import tf_optimizer

from tf_balancer.errors import ConfigError, UnsupportedModelError

__all__ = [
    "GRAPPLER_OPTIMIZERS",
    "DEFAULT_OPTIMIZERS",
    "grappler_config",
    "run_grappler",
    "graph_def_to_function",
    "optimize_concrete_function",
    "optimize_graph_def",
    "op_type_counts",
]

_LOG = logging.getLogger(__name__)

#: Grappler optimizer name -> ``RewriterConfig`` toggle field. ``pruning`` is the
#: model pruner (dead-node removal), switched by ``disable_model_pruning``.
GRAPPLER_OPTIMIZERS: Mapping[str, str] = MappingProxyType(
    {
        "pruning": "disable_model_pruning",
        "function": "function_optimization",
        "implementation_selector": "implementation_selector",
        "debug_stripper": "debug_stripper",
        "constfold": "constant_folding",
        "shape": "shape_optimization",
        "arithmetic": "arithmetic_optimization",
        "dependency": "dependency_optimization",
        "loop": "loop_optimization",
        "common_subgraph_elimination": "common_subgraph_elimination",
        "layout": "layout_optimizer",
        "remap": "remapping",
    }
)

#: Safe for frozen CPU inference graphs: no layout change, no function rewrites.
DEFAULT_OPTIMIZERS: tuple[str, ...] = (
    "pruning",
    "constfold",
    "arithmetic",
    "dependency",
    "common_subgraph_elimination",
    "remap",
)

_RC = rewriter_config_pb2.RewriterConfig
_missing = set(GRAPPLER_OPTIMIZERS.values()) - set(_RC.DESCRIPTOR.fields_by_name)
assert not _missing, f"this TensorFlow's RewriterConfig lacks {sorted(_missing)}"


def grappler_config(
    optimizers: Iterable[str] = DEFAULT_OPTIMIZERS, fail_on_error: bool = False
) -> config_pb2.ConfigProto:
    """A ``ConfigProto`` that runs exactly ``optimizers`` (every other toggle is OFF).

    Raises:
        ConfigError: an unknown optimizer name.
    """
    wanted = list(optimizers)
    unknown = sorted(set(wanted) - set(GRAPPLER_OPTIMIZERS))
    if unknown:
        raise ConfigError(
            f"unknown Grappler optimizer(s) {unknown}; choose from {sorted(GRAPPLER_OPTIMIZERS)}."
        )
    config = config_pb2.ConfigProto()
    rewrite = config.graph_options.rewrite_options
    for name, field in GRAPPLER_OPTIMIZERS.items():
        if name == "pruning":
            rewrite.disable_model_pruning = name not in wanted
        else:
            setattr(rewrite, field, _RC.ON if name in wanted else _RC.OFF)
    rewrite.min_graph_nodes = -1  # optimize small graphs too
    rewrite.fail_on_optimizer_errors = fail_on_error
    return config


def _tensor_name(name: str) -> str:
    return name if ":" in name else f"{name}:0"


def _import(graph_def: Any) -> tf.Graph:
    graph = tf.Graph()
    with graph.as_default():
        tf.compat.v1.import_graph_def(graph_def, name="")
    return graph


def _lookup(graph: tf.Graph, names: Sequence[str], role: str) -> list[tf.Tensor]:
    tensors = []
    for name in names:
        try:
            tensors.append(graph.get_tensor_by_name(_tensor_name(name)))
        except (KeyError, ValueError) as err:
            raise UnsupportedModelError(
                f"{role} {name!r} is not a tensor of the GraphDef; pass tensor names such as "
                "'input_1:0' (see `[t.name for t in frozen_fn.inputs]`)."
            ) from err
    return tensors


def _meta_graph(graph_def: Any, inputs: Sequence[str], outputs: Sequence[str]) -> Any:
    graph = _import(graph_def)
    feeds, fetches = _lookup(graph, inputs, "input"), _lookup(graph, outputs, "output")
    meta = tf.compat.v1.train.export_meta_graph(graph_def=graph_def, graph=graph)
    signature = meta_graph_pb2.SignatureDef()
    for tensors, infos in ((feeds, signature.inputs), (fetches, signature.outputs)):
        for tensor in tensors:
            infos[tensor.name].name = tensor.name
            infos[tensor.name].dtype = tensor.dtype.as_datatype_enum
            infos[tensor.name].tensor_shape.CopyFrom(tensor.shape.as_proto())
    meta.signature_def["serving_default"].CopyFrom(signature)
    # Grappler keeps (and prunes towards) the nodes listed in 'train_op'.
    fetch = meta_graph_pb2.CollectionDef()
    fetch.node_list.value.extend(t.name for t in feeds + fetches)
    meta.collection_def["train_op"].CopyFrom(fetch)
    return meta


def _placed(graph_def: Any, device: str) -> Any:
    """A copy with ``device`` on every node that has none (device rewrites need one)."""
    placed = tf.compat.v1.GraphDef()
    placed.CopyFrom(graph_def)
    for node in placed.node:
        node.device = node.device or device
    return placed


def run_grappler(
    graph_def: Any,
    inputs: Sequence[str],
    outputs: Sequence[str],
    optimizers: Iterable[str] = DEFAULT_OPTIMIZERS,
    fail_on_error: bool = False,
    device: str | None = "/device:CPU:0",
) -> Any:
    """Optimize a frozen inference GraphDef with Grappler's meta-optimizer.

    Args:
        graph_def: a frozen ``GraphDef`` (no variables); it is not modified.
        inputs: feed tensor names (``"x:0"``; a bare node name means output 0).
        outputs: fetch tensor names; these nodes and the inputs are preserved.
        optimizers: Grappler optimizer names, see :data:`GRAPPLER_OPTIMIZERS`.
        fail_on_error: raise when one optimizer fails instead of skipping it.
        device: the device to optimize for. ``remap`` only fuses ops whose
            device is known, so unplaced nodes are placed here for the run;
            the placement is cleared again in the result (nodes placed in the
            input keep theirs). ``None`` leaves placement alone.

    Returns:
        The optimized ``GraphDef`` (input and output node names unchanged).

    Raises:
        ConfigError: an unknown optimizer name.
        UnsupportedModelError: an input or output name is not in the graph.

    Example:
        >>> optimized = run_grappler(graph_def, ["input_1:0"], ["Identity:0"])  # doctest: +SKIP
    """
    config = grappler_config(optimizers, fail_on_error)
    placed = _placed(graph_def, device) if device else graph_def
    meta = _meta_graph(placed, list(inputs), list(outputs))
    optimized = tf_optimizer.OptimizeGraph(config, meta, verbose=False)
    if device:
        pinned = {node.name: node.device for node in graph_def.node if node.device}
        for node in optimized.node:
            node.device = pinned.get(node.name, "")
    _LOG.info("grappler: %d -> %d nodes", len(graph_def.node), len(optimized.node))
    return optimized


def graph_def_to_function(graph_def: Any, input_names: Sequence[str], output_names: Any) -> Any:
    """Wrap a GraphDef as a ConcreteFunction (``wrap_function`` + ``prune``).

    Args:
        graph_def: a frozen ``GraphDef``.
        input_names: tensor names of the positional arguments, in order.
        output_names: a tensor name, or a nested structure (list, dict) of tensor
            names; the function returns the same structure.

    Returns:
        A ``ConcreteFunction`` taking the inputs positionally.

    Example:
        >>> fn = graph_def_to_function(graph_def, ["x:0"], "Identity:0")  # doctest: +SKIP
        >>> y = fn(tf.ones([1, 4]))  # doctest: +SKIP
    """
    wrapped = tf.compat.v1.wrap_function(
        lambda: tf.compat.v1.import_graph_def(graph_def, name=""), []
    )
    graph = wrapped.graph
    feeds = _lookup(graph, list(input_names), "input")
    names = tf.nest.map_structure(_tensor_name, output_names)
    _lookup(graph, tf.nest.flatten(names), "output")
    fetches = tf.nest.map_structure(graph.as_graph_element, names)
    return wrapped.prune(feeds, fetches)


def op_type_counts(graph_def: Any) -> dict[str, int]:
    """Histogram of op types in a GraphDef (``{"Conv2D": 3, ...}``)."""
    counts: dict[str, int] = {}
    for node in graph_def.node:
        counts[node.op] = counts.get(node.op, 0) + 1
    return counts


def optimize_concrete_function(
    frozen_fn: Any, optimizers: Iterable[str] = DEFAULT_OPTIMIZERS
) -> tuple[Any, dict[str, Any]]:
    """Run Grappler on a frozen ConcreteFunction (as :func:`trace.freeze` returns).

    Args:
        frozen_fn: a ConcreteFunction whose variables are constants.
        optimizers: Grappler optimizer names, see :data:`GRAPPLER_OPTIMIZERS`.

    Returns:
        ``(function, stats)``: a ConcreteFunction with the same positional inputs
        and output structure, and ``{nodes_before, nodes_after, op_types_before,
        op_types_after}``.

    Example:
        >>> fast, stats = optimize_concrete_function(traced.function)  # doctest: +SKIP
        >>> stats["nodes_after"] <= stats["nodes_before"]  # doctest: +SKIP
        True
    """
    inputs = [t.name for t in frozen_fn.inputs if t.dtype != tf.resource]
    if len(inputs) != len(frozen_fn.inputs):
        raise UnsupportedModelError(
            "the function still captures variables; freeze it first with "
            "`tf_balancer.graph.trace.freeze(concrete_function)`."
        )
    output_names = tf.nest.map_structure(lambda t: t.name, frozen_fn.structured_outputs)
    return optimize_graph_def(frozen_fn.graph.as_graph_def(), inputs, output_names, optimizers)


def optimize_graph_def(
    graph_def: Any,
    inputs: Sequence[str],
    output_names: Any,
    optimizers: Iterable[str] = DEFAULT_OPTIMIZERS,
) -> tuple[Any, dict[str, Any]]:
    """:func:`optimize_concrete_function` of a frozen GraphDef, given the tensor names
    of its inputs and of its outputs (a nested structure of them, which the function
    returned keeps), e.g. a frozen :class:`~tf_balancer.graph.trace.TracedGraph`'s.

    When the result cannot be imported because ``remap`` made an op TensorFlow then
    rejects (it fuses an inference BatchNorm and its ReLU into ``_FusedBatchNormEx``,
    which needs a multiple of 4 channels - a pruned layer often has not), Grappler
    runs again without ``remap``; ``stats["remap_skipped"]`` then says why.
    """
    optimizers = tuple(optimizers)
    optimized = run_grappler(graph_def, inputs, tf.nest.flatten(output_names), optimizers)
    stats: dict[str, Any] = {}
    try:
        function = graph_def_to_function(optimized, inputs, output_names)
    except ValueError as err:
        if "remap" not in optimizers:
            raise
        stats["remap_skipped"] = str(err).strip().splitlines()[0][:300]
        _LOG.info("grappler: remap skipped, its result did not import: %s", stats["remap_skipped"])
        without = tuple(name for name in optimizers if name != "remap")
        optimized = run_grappler(graph_def, inputs, tf.nest.flatten(output_names), without)
        function = graph_def_to_function(optimized, inputs, output_names)
    stats.update(
        nodes_before=len(graph_def.node),
        nodes_after=len(optimized.node),
        op_types_before=op_type_counts(graph_def),
        op_types_after=op_type_counts(optimized),
    )
    return function, stats

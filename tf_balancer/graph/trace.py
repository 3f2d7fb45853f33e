"""Trace a model into a frozen GraphDef and map its ops to Keras layers.

Accepts a tf_keras model (Sequential or Functional, nested models included), a
``tf.function`` with an input signature, a ``ConcreteFunction``, or a SavedModel
directory. Variables are frozen into constants so that TF's own FLOPs
statistics (the ones ``tf.compat.v1.profiler`` reports as ``float_ops``) can be
read per op.

Example:
    >>> from tf_balancer._compat import keras
    >>> inp = keras.Input((4,))
    >>> model = keras.Model(inp, keras.layers.Dense(2, name="d")(inp))
    >>> traced = trace(model)
    >>> sorted({layer for layer in traced.op_to_layer.values()})
    ['d']
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable
from typing import Any

import numpy as np
import tensorflow as tf
from tensorflow.python.framework import ops as tf_ops
from tensorflow.python.framework.convert_to_constants import (
    convert_variables_to_constants_v2,
)

from tf_balancer._compat import is_keras3_object, is_keras_model
from tf_balancer.errors import ModelLoadError, UnsupportedModelError
from tf_balancer.input_shapes import (
    fill_open_axes,
    has_open_axes,
    nominal_shapes,
    open_axes_message,
    set_nominal_shapes,
)

__all__ = [
    "TracedGraph",
    "trace",
    "trace_keras",
    "load_saved_model",
    "freeze",
    "op_flops",
    "constant_params",
]


@dataclasses.dataclass(frozen=True)
class TracedGraph:
    """An inference graph, usually frozen.

    Attributes:
        graph_def: the ``GraphDef`` (frozen: variables are constants).
        function: the (frozen) concrete function (callable on tensors).
        op_to_layer: op name -> owning layer name, for every op that belongs
            to a layer (Keras models), or to a name scope (other graphs).
        batch_size: the fixed batch dimension the graph was traced with.
    """

    graph_def: Any
    function: Any
    op_to_layer: dict[str, str]
    batch_size: int

    @property
    def graph(self) -> tf.Graph:
        return self.function.graph

    def op_types(self) -> dict[str, int]:
        """Histogram of op types (``{"Conv2D": 3, ...}``)."""
        counts: dict[str, int] = {}
        for node in self.graph_def.node:
            counts[node.op] = counts.get(node.op, 0) + 1
        return counts


def freeze(concrete_function: Any) -> tuple[Any, Any]:
    """Freeze variables into constants; returns ``(graph_def, frozen_function)``."""
    frozen = convert_variables_to_constants_v2(concrete_function)
    _restore_static_shapes(frozen.graph, concrete_function.graph)
    return frozen.graph.as_graph_def(), frozen


def _restore_static_shapes(frozen: tf.Graph, original: tf.Graph) -> None:
    """Give the frozen graph's tensors the static shapes the original graph knew.

    Freezing rebuilds the graph from its ``GraphDef``, and a function call's
    outputs (Keras 3 runs a grouped convolution as one) come back with no shape,
    and so does everything downstream of them: the profiler then counts their
    element-wise ops as 0 FLOPs. Ops keep their names, so the shapes are copied.
    """
    for op in frozen.get_operations():
        try:
            known = original.get_operation_by_name(op.name).outputs
        except KeyError:
            continue
        for tensor, shape in zip(op.outputs, (t.shape for t in known), strict=False):
            if not tensor.shape.is_fully_defined() and tensor.shape.is_compatible_with(shape):
                tensor.set_shape(shape)


BATCH_NORM_OPS = frozenset(
    {"FusedBatchNorm", "FusedBatchNormV2", "FusedBatchNormV3", "_FusedBatchNormEx"}
)


def op_flops(graph: tf.Graph) -> dict[str, int]:
    """FLOPs of every op, as TF's profiler counts them where it has statistics.

    Ops the profiler has no statistics for are counted by its conventions
    (2 per multiply-add, 1 per element for a bias add or add, 0 for
    activations) rather than as 0:

    * Grappler's fused ops (``_FusedConv2D``, ``_FusedMatMul``,
      ``_FusedDepthwiseConv2dNative``) as the unfused ops they replace, so a
      graph costs the same before and after Grappler;
    * ``FusedBatchNorm*`` (and ``_FusedBatchNormEx``) as its inference
      arithmetic, a multiply and an add per element - what Keras 3's
      BatchNormalization emits as explicit ops, and what folding it into the
      producer replaces with one bias add. (The profiler counts it as 0, which
      made a folded model look *more* expensive than the model it came from.)
    * ``Einsum`` (attention layers) analytically.
    """
    flops = {}
    for op in graph.get_operations():
        try:
            value = tf_ops.get_stats_for_node_def(graph, op.node_def, "flops").value
        except (ValueError, LookupError):
            value = None
        flops[op.name] = int(value or _fused_flops(op))
    return flops


def _einsum_flops(op: Any) -> int:
    """FLOPs of an ``Einsum``, which TF's profiler does not count.

    A two-operand einsum does one multiply-add for every combination of its index
    values: ``2 * prod(size of each distinct index)`` (a matmul ``ij,jk->ik`` gives
    the profiler's ``2 * i * j * k``). A one-operand einsum (a transpose or a sum)
    counts one per input element.
    """
    equation = op.get_attr("equation")
    equation = equation.decode() if isinstance(equation, bytes) else equation
    operands = equation.split("->")[0].split(",")
    shapes = [t.shape for t in op.inputs]
    if (
        "." in equation
        or len(operands) != len(shapes)
        or not all(s.is_fully_defined() for s in shapes)
    ):
        return 0
    if len(shapes) == 1:
        return shapes[0].num_elements()
    sizes: dict[str, int] = {}
    for letters, shape in zip(operands, shapes, strict=True):
        sizes.update(zip(letters, (int(d) for d in shape), strict=True))
    return 2 * int(np.prod(list(sizes.values())))


def _fused_flops(op: Any) -> int:
    """The count for an op the profiler has no statistics for (see :func:`op_flops`)."""
    if op.type == "Einsum":
        return _einsum_flops(op)
    if op.type in BATCH_NORM_OPS:
        shape = op.outputs[0].shape
        return 2 * shape.num_elements() if shape.is_fully_defined() else 0
    if op.type not in ("_FusedConv2D", "_FusedMatMul", "_FusedDepthwiseConv2dNative"):
        return 0
    out = op.outputs[0].shape
    weights = op.inputs[1].shape
    if not out.is_fully_defined() or not weights.is_fully_defined():
        return 0
    outputs = out.num_elements()
    if op.type == "_FusedMatMul":
        transpose_a = op.get_attr("transpose_a")
        inner = op.inputs[0].shape[0 if transpose_a else 1]
        core = 2 * int(inner) * outputs
    elif op.type == "_FusedConv2D":
        core = 2 * int(weights[0]) * int(weights[1]) * int(weights[2]) * outputs
    else:  # depthwise: each output element reads one kh x kw window of one channel
        core = 2 * int(weights[0]) * int(weights[1]) * outputs
    fused = [f.decode() if isinstance(f, bytes) else f for f in op.get_attr("fused_ops")]
    per_element = {"BiasAdd": 1, "Add": 1, "FusedBatchNorm": 2}
    extra = sum(per_element.get(name, 0) * outputs for name in fused)
    return core + extra


def constant_params(graph_def: Any) -> int:
    """Parameters of a frozen graph: elements of its floating-point constant tensors
    of rank >= 1 (scalars and integer shape constants are not weights)."""
    total = 0
    for node in graph_def.node:
        if node.op != "Const":
            continue
        tensor = node.attr["value"].tensor
        if not tf.as_dtype(tensor.dtype).is_floating or not tensor.tensor_shape.dim:
            continue
        total += int(np.prod([d.size for d in tensor.tensor_shape.dim]))
    return total


def _fixed_specs(
    specs: Iterable[Any],
    batch_size: int | None,
    keras_inputs: bool = False,
    nominal: list[tuple] | None = None,
    owner: str = "the function",
) -> list[tf.TensorSpec]:
    """Input specs with an open batch axis set to ``batch_size`` (None keeps it open).

    ``keras_inputs``: the first axis of each is a Keras model's batch axis, set even
    where the model fixed it (a Sequential ``fit`` built has its first batch's size).
    Other open axes take their ``nominal`` sizes (:mod:`tf_balancer.input_shapes`);
    with a fixed ``batch_size`` none may stay open (FLOPs need every size).
    """
    specs = list(specs)
    shapes = fill_open_axes([tuple(s.shape) for s in specs], nominal)
    fixed = []
    for spec, shape in zip(specs, shapes, strict=True):
        shape = list(shape)
        if shape and (shape[0] is None or keras_inputs):
            shape[0] = batch_size
        fixed.append(tf.TensorSpec(shape, spec.dtype, name=spec.name))
    if batch_size is not None and has_open_axes([s.shape for s in fixed]):
        raise UnsupportedModelError(open_axes_message(owner, [tuple(s.shape) for s in specs]))
    return fixed


def trace_keras(model: Any, batch_size: int | None = 1, *, frozen: bool = True) -> TracedGraph:
    """Trace a Keras model (tf_keras or Keras 3) in inference mode at a fixed batch size.

    The traced function runs the model's flattened calls one by one, each inside
    a name scope of its own (``tfb_call_<i>``), so every op maps to the call that
    made it - whatever scope names the Keras version adds (Keras 3 uniquifies them:
    layer ``d`` runs under ``d_1``), for nested and shared layers alike. It
    computes exactly what ``model(x, training=False)`` computes.

    ``batch_size=None`` keeps the batch axis open, and any other open input axis
    (for deployment; TF's FLOPs statistics need a fixed batch). With a fixed
    batch, open input axes take their nominal sizes (:mod:`tf_balancer.input_shapes`).
    ``frozen=False`` skips freezing the variables into constants (about half the
    time on a large model): the graph reads them instead, with the same ops,
    shapes and FLOPs - enough for costing.
    """
    from tf_balancer.graph.walk import concrete_function, run_calls, walk_model

    walk = walk_model(model)  # rejects subclassed models
    specs = _fixed_specs(
        [
            tf.TensorSpec(t.shape, tf.as_dtype(t.dtype), name=t.name.split(":")[0])
            for t in walk.input_tensors
        ],
        batch_size,
        keras_inputs=True,
        nominal=walk.nominal if batch_size is not None else None,
        owner=f"model {walk.model_name!r}",
    )
    scopes = {f"{_CALL_SCOPE}{i}": call.name for i, call in enumerate(walk.calls)}

    def forward(*xs):
        outputs = run_calls(walk, xs, scope=_CALL_SCOPE)
        return outputs if len(outputs) > 1 else outputs[0]

    concrete = concrete_function(forward, specs)
    graph_def, function = freeze(concrete) if frozen else (concrete.graph.as_graph_def(), concrete)
    return TracedGraph(graph_def, function, _map_ops(graph_def, scopes), batch_size)


def load_saved_model(path: str | os.PathLike) -> Any:
    """Load a SavedModel with ``tf.saved_model.load``, or raise a one-line error."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ModelLoadError(f"{path}: no such file or directory")
    if not tf.saved_model.contains_saved_model(path):
        raise ModelLoadError(f"{path}: not a SavedModel directory (no saved_model.pb inside)")
    try:
        return tf.saved_model.load(path)
    except Exception as err:  # corrupt protos surface as many TF error types
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelLoadError(f"{path}: could not load the SavedModel ({first})") from err


def serving_function(loaded: Any, signature: str | None = None) -> Any:
    """The named (default ``serving_default``, else the first) signature function."""
    signatures = dict(getattr(loaded, "signatures", {}) or {})
    if not signatures:
        raise ModelLoadError("the SavedModel has no serving signatures to trace")
    name = signature or ("serving_default" if "serving_default" in signatures else None)
    if name is None:
        name = sorted(signatures)[0]
    if name not in signatures:
        raise ModelLoadError(f"no signature {name!r}; available: {sorted(signatures)}")
    return signatures[name]


def trace_function(fn: Any, batch_size: int = 1) -> TracedGraph:
    """Trace a ``tf.function`` (with input signature), ConcreteFunction or signature."""
    nominal = nominal_shapes(fn)
    if isinstance(fn, tf.types.experimental.PolymorphicFunction):
        fn = fn.get_concrete_function()
    signature = fn.structured_input_signature
    if signature is None:  # e.g. a pruned wrap_function: feeds are its placeholders
        args = [tf.TensorSpec(t.shape, t.dtype) for t in fn.inputs if t.dtype != tf.resource]
        signature = (args, {})
    args, kwspecs = signature
    if kwspecs:
        fixed_specs = _fixed_specs(kwspecs.values(), batch_size, nominal=nominal)
        specs = dict(zip(kwspecs, fixed_specs, strict=True))
        fixed = tf.function(lambda **kw: fn(**kw)).get_concrete_function(**specs)
    else:
        fixed = tf.function(lambda *xs: fn(*xs)).get_concrete_function(
            *_fixed_specs(args, batch_size, nominal=nominal)
        )
    graph_def, frozen = freeze(fixed)
    return TracedGraph(graph_def, frozen, _map_scopes(graph_def), batch_size)


def trace(obj: Any, batch_size: int = 1, input_shape: Any = None) -> TracedGraph:
    """Trace a Keras model, tf.function, ConcreteFunction or SavedModel path.

    ``input_shape``: the sizes of open input axes (``tf.TensorSpec([None, None])``),
    as :func:`tf_balancer.input_shapes.set_nominal_shapes` takes them.

    Raises:
        UnsupportedModelError: Keras 3 model or an untraceable object.
        ModelLoadError: a path that is missing or not a SavedModel.
    """
    if is_keras_model(obj) or is_keras3_object(obj):
        if input_shape is not None:
            set_nominal_shapes(obj, input_shape)
        return trace_keras(obj, batch_size)
    loaded = None
    if isinstance(obj, (str, os.PathLike)):
        loaded = load_saved_model(obj)  # keep alive while tracing: it owns the variables
        obj = serving_function(loaded)
    if isinstance(
        obj, (tf.types.experimental.PolymorphicFunction, tf.types.experimental.ConcreteFunction)
    ):
        if input_shape is not None:
            set_nominal_shapes(obj, input_shape)
        traced = trace_function(obj, batch_size)
        del loaded
        return traced
    raise UnsupportedModelError(
        f"cannot trace a {type(obj).__name__}; pass a tf_keras model, a tf.function with an "
        "input_signature, a ConcreteFunction or a SavedModel directory."
    )


_CALL_SCOPE = "tfb_call_"


def _map_ops(graph_def: Any, scopes: dict[str, str]) -> dict[str, str]:
    """Map op names ``tfb_call_<i>/...`` to the name of call ``i``."""
    mapping = {}
    for node in graph_def.node:
        first = node.name.split("/", 1)[0]
        if first in scopes and "/" in node.name:
            mapping[node.name] = scopes[first]
    return mapping


_PLUMBING_OPS = frozenset({"Const", "Identity", "NoOp", "Placeholder"})
_CALL_SCOPES = frozenset({"StatefulPartitionedCall", "PartitionedCall"})


def _map_scopes(graph_def: Any) -> dict[str, str]:
    """Without Keras metadata an op's 'layer' is its name scope.

    Function-call wrappers (``StatefulPartitionedCall/...``) are dropped from the
    scope; plumbing ops (constants, identities) are not attributed.
    """
    mapping = {}
    for node in graph_def.node:
        if node.op in _PLUMBING_OPS or node.name.startswith("Func/"):
            continue
        parts = node.name.split("/")
        while len(parts) > 1 and parts[0] in _CALL_SCOPES:
            parts = parts[1:]
        mapping[node.name] = "/".join(parts[:-1]) or parts[-1]  # unscoped ops stand alone
    return mapping

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

import os
from collections.abc import Iterable
from typing import Any

import numpy as np
import tensorflow as tf
from tensorflow.python.framework import ops as tf_ops
from tensorflow.python.framework.convert_to_constants import (
    convert_variables_to_constants_v2,
)

try:  # the two halves of convert_variables_to_constants_v2 (TF >= 2.2), to skip the second
    from tensorflow.python.framework.convert_to_constants import (
        _construct_concrete_function,
        _FunctionConverterDataInEager,
        _replace_variables_by_constants,
    )
except ImportError:  # pragma: no cover - a TensorFlow without them freezes in one go
    _replace_variables_by_constants = None

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
    "trace_walk",
    "load_saved_model",
    "freeze",
    "op_flops",
    "constant_params",
]


class TracedGraph:
    """An inference graph, usually frozen.

    Attributes:
        graph_def: the ``GraphDef`` (frozen: variables are constants).
        op_to_layer: op name -> owning layer name, for every op that belongs
            to a layer (Keras models), or to a name scope (other graphs).
        batch_size: the fixed batch dimension the graph was traced with.
        graph: the ``tf.Graph`` of ``graph_def``, with static shapes (for FLOPs).
        function: the (frozen) concrete function (callable on tensors). A frozen
            trace makes it and ``graph`` when first read: wrapping a GraphDef as a
            function takes longer than freezing it, costing needs only ``graph``
            and Grappler only ``graph_def``.
        input_names, output_names: the function's input tensor names and its
            output tensor names (in its output structure).
    """

    def __init__(
        self,
        graph_def: Any,
        function: Any,
        op_to_layer: dict[str, str],
        batch_size: int | None,
        graph: tf.Graph | None = None,
    ):
        self.graph_def = graph_def
        self.op_to_layer = op_to_layer
        self.batch_size = batch_size
        self._function = function  # a ConcreteFunction, or a _FrozenFunction making one
        self._graph = graph

    @property
    def function(self) -> Any:
        if isinstance(self._function, _FrozenFunction):
            self._function = self._function()
        return self._function

    @property
    def graph(self) -> tf.Graph:
        if self._graph is None and isinstance(self._function, _FrozenFunction):
            self._graph = self._function.imported_graph()
        return self._graph if self._graph is not None else self.function.graph

    @property
    def input_names(self) -> list[str]:
        if isinstance(self._function, _FrozenFunction):
            return self._function.input_names
        return [t.name for t in self._source.inputs if t.dtype != tf.resource]

    @property
    def output_names(self) -> Any:
        return tf.nest.map_structure(lambda t: t.name, self._source.structured_outputs)

    @property
    def _source(self) -> Any:
        """A function with the graph's input and output names (freezing keeps them)."""
        if isinstance(self._function, _FrozenFunction):
            return self._function.source
        return self._function

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


class _FrozenFunction:
    """Makes the frozen function of a frozen GraphDef when first asked (see
    :class:`TracedGraph`); ``source`` is the function it was frozen from."""

    def __init__(self, source: Any, graph_def: Any, converted: Any):
        self.source, self.graph_def, self.converted = source, graph_def, converted
        captures = source.graph.internal_captures
        constants = {id(captures[i]) for i in converted}  # captured values, now constants
        self.input_names = [t.name for t in source.inputs if id(t) not in constants]

    def __call__(self) -> Any:
        frozen = _construct_concrete_function(self.source, self.graph_def, self.converted)
        _restore_static_shapes(frozen.graph, self.source.graph)
        return frozen

    def imported_graph(self) -> tf.Graph:
        """The GraphDef imported as a ``tf.Graph``, with the source's static shapes."""
        graph = tf.Graph()
        with graph.as_default():
            tf.compat.v1.import_graph_def(self.graph_def, name="")
        _restore_static_shapes(graph, self.source.graph)
        return graph


def _frozen_trace(concrete: Any, op_to_layer: Any, batch_size: int | None) -> TracedGraph:
    """The frozen :class:`TracedGraph` of ``concrete``: its GraphDef with the variables
    made constants (TensorFlow's own conversion, as in :func:`freeze`). Its graph (for
    costing) and its function are made when first read: Grappler needs neither, and
    wrapping the GraphDef as a function took 2.0 of :func:`freeze`'s 2.3 s on
    EfficientNetB0. ``op_to_layer(graph_def)`` maps ops."""
    if _replace_variables_by_constants is None:
        graph_def, frozen = freeze(concrete)
        return TracedGraph(graph_def, frozen, op_to_layer(graph_def), batch_size)
    data = _FunctionConverterDataInEager(
        func=concrete, lower_control_flow=True, aggressive_inlining=False
    )
    graph_def, converted = _replace_variables_by_constants(converter_data=data)
    function = _FrozenFunction(concrete, graph_def, converted)
    return TracedGraph(graph_def, function, op_to_layer(graph_def), batch_size)


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
    from tf_balancer.graph.walk import walk_model

    return trace_walk(walk_model(model), batch_size, frozen=frozen)  # rejects subclassed models


def trace_walk(walk: Any, batch_size: int | None = 1, *, frozen: bool = True) -> TracedGraph:
    """:func:`trace_keras` of a :class:`~tf_balancer.graph.walk.Walk`: its calls, fed
    its ``input_tensors`` (Keras tensors, or ``tf.TensorSpec`` for a walk that is
    part of a model: the calls some pass changed, costed without the rest).

    Raises:
        UnsupportedModelError: with a fixed batch, an input axis is open and has
            no nominal size.
    """
    from tf_balancer.graph.walk import concrete_function, run_calls

    specs = _fixed_specs(
        [
            tf.TensorSpec(t.shape, tf.as_dtype(t.dtype), name=(t.name or "").split(":")[0] or None)
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
    if frozen:
        return _frozen_trace(concrete, lambda gd: _map_ops(gd, scopes), batch_size)
    graph_def = concrete.graph.as_graph_def()
    return TracedGraph(graph_def, concrete, _map_ops(graph_def, scopes), batch_size)


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
    graph_def = fn.graph.as_graph_def()
    if _is_plain_graph(fn, graph_def):
        return _reimported(fn, graph_def, batch_size, nominal)
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
    return _frozen_trace(fixed, _map_scopes, batch_size)


def _is_plain_graph(fn: Any, graph_def: Any) -> bool:
    """A function of its positional tensors alone, whose graph reads no variable and calls
    no function (e.g. Grappler's result, :func:`~tf_balancer.graph.grappler.graph_def_to_function`)."""
    if fn.structured_input_signature is not None or fn.captured_inputs:
        return False
    return all(t.dtype != tf.resource for t in fn.inputs) and not graph_def.library.function


def _reimported(
    fn: Any, graph_def: Any, batch_size: int, nominal: list[tuple] | None
) -> TracedGraph:
    """:func:`trace_function` of a :func:`_is_plain_graph` function: its GraphDef imported
    again on inputs of fixed sizes, for costing (nothing to freeze: wrapping it to
    freeze would take about 6x as long on EfficientNetB0). ``graph_def``: ``fn``'s."""
    specs = _fixed_specs(
        [tf.TensorSpec(t.shape, t.dtype) for t in fn.inputs], batch_size, nominal=nominal
    )
    graph = tf.Graph()
    with graph.as_default():
        feeds = {
            t.name: tf.compat.v1.placeholder(s.dtype, s.shape)
            for t, s in zip(fn.inputs, specs, strict=True)
        }
        tf.compat.v1.import_graph_def(graph_def, input_map=feeds, name="")
    return TracedGraph(graph_def, fn, _map_scopes(graph_def), batch_size, graph)


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

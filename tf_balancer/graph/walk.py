"""Walk a functional or Sequential Keras model call by call, nested models flattened.

This is the one module that reads Keras's functional-graph structure
(``Functional._nodes_by_depth`` and its ``Node``s), through the adapter of the
model's Keras (:func:`tf_balancer._compat.adapter_for`: tf_keras or Keras 3).
Everything else - the layer graph, the passes that rebuild models - goes
through :func:`walk_model` and :func:`rebuild`.

Example:
    >>> from tf_balancer._compat import keras
    >>> inp = keras.Input((4,))
    >>> model = keras.Model(inp, keras.layers.Dense(2, name="d")(inp))
    >>> [c.name for c in walk_model(model).calls]
    ['d']
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import tensorflow as tf

from tf_balancer._compat import (
    KerasAdapter,
    KerasOp,
    adapter_for,
    ensure_keras_model,
    keras,
    read_weights,
    sublayers,
)
from tf_balancer.errors import UnsupportedModelError
from tf_balancer.input_shapes import (
    declared_shapes,
    fill_open_axes,
    has_open_axes,
    nominal_shapes,
    set_nominal_shapes,
)

__all__ = [
    "Call",
    "Walk",
    "walk_model",
    "concrete_function",
    "rebuild",
    "clone_flat",
    "clone_layer",
    "weights_of",
    "set_layer_weights",
    "training_parameter",
    "IDENTITY",
]


@dataclasses.dataclass(frozen=True)
class Call:
    """One call of a layer in the (flattened) model graph.

    Attributes:
        name: unique name; ``outer/inner`` for layers of nested models, with a
            ``#k`` suffix when a layer is called more than once.
        layer: the Keras layer object (shared with the user's model; never mutated).
        node: the Keras ``Node`` of this call (holds the call's arguments; read
            it through the model's adapter).
        inputs: keys of the tensors this call consumes, in argument order.
        outputs: keys of the tensors it produces.
        shared: the layer is called more than once in the model.
        masks: keys of the inputs passed as ``mask=`` (Keras 3 records the mask of
            ``Embedding(mask_zero=True)`` as an argument of the next layer): they
            gate time steps, they are not channels.
    """

    name: str
    layer: Any
    node: Any
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    shared: bool = False
    masks: tuple[str, ...] = ()

    @property
    def data_inputs(self) -> tuple[str, ...]:
        """``inputs`` without the masks: the tensors whose channels the call reads."""
        return tuple(k for k in self.inputs if k not in self.masks)

    @property
    def class_name(self) -> str:
        return getattr(self.layer, "class_name", None) or type(self.layer).__name__

    @property
    def arguments(self) -> tuple[list[Any], dict[str, Any]]:
        """``(args, kwargs)`` the layer was called with (tensors are Keras tensors)."""
        return adapter_for(self.layer).node_call(self.node)


@dataclasses.dataclass(frozen=True)
class Walk:
    """The flattened call sequence of a model, in topological order."""

    model_name: str
    calls: tuple[Call, ...]
    input_keys: tuple[str, ...]
    output_keys: tuple[str, ...]
    shapes: dict[str, tuple]
    dtypes: dict[str, str]
    input_tensors: tuple[Any, ...]
    adapter: KerasAdapter = dataclasses.field(default=None, compare=False, repr=False)
    output_structure: Any = None
    """The model's ``output`` with each tensor replaced by its index in ``output_keys``
    (a dict by the user's keys, a list, a tuple), so rebuilt models return the same
    structure; None for a single output."""
    nominal: list[tuple] | None = None
    """Sizes of the open input axes (no batch axis) at which ``shapes`` were
    resolved, for a model whose inputs have open axes; None otherwise."""


class _Walker:
    def __init__(self, adapter: KerasAdapter) -> None:
        self.adapter = adapter
        self.alias: dict[str, str] = {}
        self.calls: list[Call] = []
        self.shapes: dict[str, tuple] = {}
        self.dtypes: dict[str, str] = {}
        self.scopes: dict[str, int] = {}

    def key(self, tensor_id: str) -> str:
        while tensor_id in self.alias:
            tensor_id = self.alias[tensor_id]
        return tensor_id

    def record(self, tensor: Any, scope: str) -> str:
        """Key of a tensor seen inside ``scope`` (scoped: a nested model's inner
        tensors are the same objects for each of its calls)."""
        key = self.key(scope + str(id(tensor)))
        self.shapes.setdefault(key, tuple(tensor.shape))
        self.dtypes.setdefault(key, tf.as_dtype(tensor.dtype).name)
        return key

    def walk(self, model: Any, scope: str) -> None:
        nodes = self.adapter.nodes_by_depth(model)
        for depth in sorted(nodes, reverse=True):
            for node in nodes[depth]:
                if node.is_input:
                    continue
                layer = self.adapter.node_layer(node)
                if self.adapter.is_graph_network(layer):
                    self._walk_nested(node, scope, layer, layer.name)
                elif (twin := composite_twin(self.adapter, layer, node)) is not None:
                    self._walk_nested(node, scope, twin, layer.name)
                else:
                    self._add_call(node, scope)

    def _walk_nested(self, node: Any, scope: str, inner: Any, name: str) -> None:
        """The calls of a nested model, or of a custom layer's twin, as ``name/...``."""
        inner_scope = f"{scope}{name}/"
        calls = self.scopes.get(inner_scope, 0)
        self.scopes[inner_scope] = calls + 1
        if calls:
            inner_scope = f"{scope}{name}#{calls}/"
        inner_inputs = self.adapter.graph_inputs(inner)
        for inner_in, outer_in in zip(inner_inputs, self.adapter.node_inputs(node), strict=True):
            self.alias[inner_scope + str(id(inner_in))] = self.record(outer_in, scope)
        self.walk(inner, inner_scope)
        outer_outs = self.adapter.node_outputs(node)
        inner_outs = self.adapter.graph_outputs(inner)
        for outer_out, inner_out in zip(outer_outs, inner_outs, strict=True):
            self.alias[scope + str(id(outer_out))] = self.key(inner_scope + str(id(inner_out)))

    def _add_call(self, node: Any, scope: str) -> None:
        layer = self.adapter.node_layer(node)
        tensors = self.adapter.node_inputs(node)
        inputs = tuple(self.record(t, scope) for t in tensors)
        outputs = tuple(self.record(t, scope) for t in self.adapter.node_outputs(node))
        mask_ids = {id(m) for m in tf.nest.flatten(self.adapter.node_call(node)[1].get("mask"))}
        masks = tuple(k for k, t in zip(inputs, tensors, strict=True) if id(t) in mask_ids)
        self.calls.append(Call(f"{scope}{layer.name}", layer, node, inputs, outputs, masks=masks))


def walk_model(model: Any) -> Walk:
    """Flatten a Keras model (tf_keras or Keras 3) into its calls.

    Functional and Sequential models are walked as they are; a built subclassed
    model through its :func:`functional_twin` (the same layers, called on
    symbolic inputs). For a model with open input axes and nominal sizes
    (:mod:`tf_balancer.input_shapes`), ``shapes`` are those of a run at the
    nominal sizes (one symbolic trace); without nominal sizes they keep None.

    Raises:
        UnsupportedModelError: for unbuilt models and subclassed models whose
            ``call`` Keras cannot trace symbolically.
    """
    given = ensure_keras_model(model)
    model = functional_twin(given)
    adapter = adapter_for(model)
    if not adapter.is_graph_network(model):
        raise UnsupportedModelError(
            f"model {model.name!r} is not built, or is subclassed with a call() that Keras "
            "cannot trace on symbolic inputs, so its layer graph is unknown; call it once on a "
            "batch (model(x[:1])) before fit, build it with the Functional or Sequential API, or "
            "pass its traced tf.function/SavedModel to `tf_balancer.inspect` for a graph view."
        )
    walker = _Walker(adapter)
    inputs = adapter.graph_inputs(model)
    input_keys = tuple(walker.record(t, "") for t in inputs)
    walker.walk(model, "")
    output_keys = tuple(walker.key(str(id(t))) for t in adapter.graph_outputs(model))
    calls = _mark_shared(walker.calls)
    walk = Walk(
        model.name,
        calls,
        input_keys,
        output_keys,
        walker.shapes,
        walker.dtypes,
        tuple(inputs),
        adapter,
        _output_structure(model, adapter.graph_outputs(model)),
    )
    nominal = nominal_shapes(given) or nominal_shapes(model)
    if nominal is None or not has_open_axes(declared_shapes(model)):
        return walk
    return dataclasses.replace(walk, shapes=_resolved_shapes(walk, nominal), nominal=nominal)


def _output_structure(model: Any, outputs: Sequence[Any]) -> Any:
    """``model.output`` with its tensors replaced by their index in ``outputs``."""
    index = {id(t): i for i, t in enumerate(outputs)}
    try:
        structure = tf.nest.map_structure(lambda t: index[id(t)], model.output)
    except (AttributeError, KeyError, ValueError, TypeError):  # no single structure to keep
        return None
    return None if isinstance(structure, int) else structure


def _resolved_shapes(walk: Walk, nominal: list[tuple]) -> dict[str, tuple]:
    """Every tensor's shape (batch axis None) when the inputs have the nominal sizes."""
    declared = [tuple(t.shape) for t in walk.input_tensors]
    specs = [
        tf.TensorSpec((1, *shape[1:]), t.dtype)
        for shape, t in zip(fill_open_axes(declared, nominal), walk.input_tensors, strict=True)
    ]
    shapes: dict[str, tuple] = {}

    def batch_open(key: str, shape: tuple) -> tuple:  # a batch axis as Keras records it
        has_batch = shape and (walk.shapes.get(key) or (None,))[0] is None
        return (None, *shape[1:]) if has_batch else shape

    def forward(*xs):
        tensors = _run(walk, xs)
        shapes.update({k: batch_open(k, tuple(t.shape)) for k, t in tensors.items()})
        return [tensors[k] for k in walk.output_keys]

    concrete_function(forward, specs)
    return {**walk.shapes, **shapes}


def concrete_function(forward: Callable[..., Any], specs: Sequence[Any]) -> Any:
    """``forward`` traced at ``specs`` without AutoGraph (about 30% faster; built-in
    layers need no conversion), with it when a custom layer branches on a tensor."""
    try:
        return tf.function(forward, autograph=False).get_concrete_function(*specs)
    except tf.errors.OperatorNotAllowedInGraphError:
        return tf.function(forward).get_concrete_function(*specs)


_TWINS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_LAYER_TWINS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # node -> twin or None
_KERAS_PACKAGES = ("keras", "tf_keras", "tensorflow", "tensorflow_model_optimization")
_STATE_OUTSIDE_WEIGHTS = frozenset({"TextVectorization", "StringLookup", "IntegerLookup"})


def composite_twin(adapter: KerasAdapter, layer: Any, node: Any) -> Any | None:
    """For one call of a custom layer made of Keras layers and operations, a functional
    twin (:meth:`~tf_balancer._compat.KerasAdapter.layer_twin`) whose outputs equal the
    layer's on a sample batch; walked in its place like a nested model, so the layers
    inside are analysed and pruned. A ``Lambda`` is treated the same way (its
    function's operations are recorded). None for Keras' other layers and for what
    cannot be recorded (the layer then stays one opaque call). Made once per call.
    """
    module = type(layer).__module__
    # Keras' own layers, but not the custom ones its applications define (e.g.
    # InceptionResNetV2's CustomScaleLayer, ``x + y * scale``)
    keras_own = module.split(".")[0] in _KERAS_PACKAGES and ".applications." not in module
    if isinstance(layer, KerasOp) or (keras_own and type(layer).__name__ != "Lambda"):
        return None
    if node not in _LAYER_TWINS:
        twin = adapter.layer_twin(layer, node)
        _LAYER_TWINS[node] = (
            twin if twin is not None and _same_outputs(adapter, layer, node, twin) else None
        )
    return _LAYER_TWINS[node]


def _sample_batch(tensors: Sequence[Any]) -> list[Any]:
    """A seeded batch of 2 for symbolic ``tensors`` (open axes 4): floats uniform in
    [0, 1), other dtypes zeros (valid token ids and indices)."""
    import numpy as np

    rng = np.random.default_rng(0)
    values = []
    for t in tensors:
        shape = [2 if i == 0 else (d or 4) for i, d in enumerate(t.shape)]
        dtype = tf.as_dtype(t.dtype)
        values.append(
            tf.constant(rng.random(shape), dtype) if dtype.is_floating else tf.zeros(shape, dtype)
        )
    return values


def _same_outputs(adapter: KerasAdapter, layer: Any, node: Any, twin: Any) -> bool:
    """The twin computes the layer's call on a seeded sample batch (inference mode), and
    the layer adds no loss of its own (``add_loss``) that the twin would not."""
    tensors = adapter.node_inputs(node)
    values = _sample_batch(tensors)
    by_id = {id(t): v for t, v in zip(tensors, values, strict=True)}
    args, kwargs = tf.nest.map_structure(lambda v: by_id.get(id(v), v), adapter.node_call(node))
    if training_parameter(layer) is not None:
        kwargs["training"] = False
    try:
        expected = tf.nest.flatten(layer(*args, **kwargs))
        actual = tf.nest.flatten(twin(values[0] if len(values) == 1 else values, training=False))
    except Exception:  # noqa: BLE001 - a call the twin cannot make is no twin
        return False
    if len(layer.losses) > len(twin.losses):  # add_loss in call: the twin would drop it
        return False
    return _largest_gap(actual, expected) is None


def _largest_gap(actual: Sequence[Any], expected: Sequence[Any]) -> float | None:
    """None when a twin's outputs equal the original's (rtol 1e-4, atol 1e-5), else
    the largest absolute difference (inf when their numbers differ)."""
    import numpy as np

    actual, expected = [np.asarray(a) for a in actual], [np.asarray(e) for e in expected]
    if len(actual) != len(expected):
        return float("inf")
    if all(np.allclose(a, e, rtol=1e-4, atol=1e-5) for a, e in zip(actual, expected, strict=True)):
        return None
    return max(
        float(np.max(np.abs(a - e), initial=0.0)) for a, e in zip(actual, expected, strict=True)
    )


def functional_twin(model: Any) -> Any:
    """``model`` itself when functional/Sequential; for a built subclassed model, its
    functional twin (same layer objects, same outputs), made once per model.

    Whatever ``call`` does that Keras cannot record symbolically leaves the model
    unsupported (the caller's error says so); nothing is changed on ``model``.

    Raises:
        UnsupportedModelError: the twin would not be the model: it does not hold
            every weight of the model (one the model creates itself, outside its
            layers), or its outputs differ from the model's in inference on a
            sample batch (a Python branch on ``training`` taken while recording,
            e.g. with a ``training=True`` default). The optimized model, built from
            the twin, would compute something else than the model.
    """
    adapter = adapter_for(model)
    if adapter.is_graph_network(model):
        return model
    if model not in _TWINS:
        try:
            twin = adapter.functional_twin(model)
        except Exception:  # noqa: BLE001 - a call() Keras cannot trace symbolically
            twin = None
        if twin is None:
            return model
        _check_twin(model, twin)
        _TWINS[model] = twin
    return _TWINS[model]


def _check_twin(model: Any, twin: Any) -> None:
    """Raise when ``model`` owns weights none of its layers does (the twin cannot hold
    them; a layer used only outside ``call``, e.g. in a custom ``train_step``, is
    fine), or ``twin`` does not compute its outputs."""
    in_layers = {id(w) for layer in sublayers(model) for w in layer.weights}
    outside = [w.name for w in model.weights if id(w) not in in_layers]
    if outside:
        raise UnsupportedModelError(
            f"model {model.name!r} creates weights outside its layers ({', '.join(outside)}): "
            "the optimized model is built from the model's layers and could not hold them. "
            "Create them in a layer of their own (a keras.layers.Layer subclass that makes "
            "them with add_weight and applies them in call) and call that layer in the model"
        )
    values = _sample_batch(twin.inputs)
    x = values[0] if len(values) == 1 else values
    expected = tf.nest.flatten(model(x, training=False))
    gap = _largest_gap(tf.nest.flatten(twin(x, training=False)), expected)
    if gap is not None:
        raise UnsupportedModelError(
            f"model {model.name!r}: its call, recorded on symbolic inputs, computes something "
            f"else than the model in inference (max abs difference {gap:.3g} on a sample "
            "batch), and the optimized model would be built from that record. Usually a Python "
            "branch on `training` with a `training=True` default: give call `training=None` "
            "(Keras passes the mode) and branch inside layers (Dropout, BatchNormalization "
            "and augmentation layers take `training` themselves)"
        )


def _mark_shared(calls: Sequence[Call]) -> tuple[Call, ...]:
    counts: dict[int, int] = {}
    for call in calls:
        counts[id(call.layer)] = counts.get(id(call.layer), 0) + 1
    seen: dict[int, int] = {}
    out = []
    for call in calls:
        n = counts[id(call.layer)]
        if n == 1:
            out.append(call)
            continue
        k = seen.get(id(call.layer), 0)
        seen[id(call.layer)] = k + 1
        name = call.name if k == 0 else f"{call.name}#{k}"
        out.append(dataclasses.replace(call, name=name, shared=True))
    return tuple(out)


IDENTITY = object()
"""Returned by a ``rebuild`` factory to drop a single-input layer (its output is its input)."""


def rebuild(
    walk: Walk,
    make_layer: Callable[[Call], Any],
    name: str | None = None,
    outputs: Sequence[str] | None = None,
) -> keras.Model:
    """Build a new functional model that calls ``make_layer(call)`` for each call.

    ``make_layer`` returns a (new) layer to call with the original arguments, or
    :data:`IDENTITY` to drop the call. Weights are the factory's business: it
    usually returns a fresh layer and sets weights after building, see
    :func:`clone_flat`. ``outputs`` (tensor keys) defaults to the model's outputs;
    pass more keys to expose intermediate tensors.
    """
    adapter = walk.adapter or adapter_for(walk.calls[0].layer)
    new_inputs, tensors = call_symbolically(walk, make_layer)
    result = [tensors[k] for k in (walk.output_keys if outputs is None else outputs)]
    if outputs is None and walk.output_structure is not None:  # the model's dict or list
        packed = tf.nest.map_structure(lambda i: result[i], walk.output_structure)
    else:
        packed = result if len(result) > 1 else result[0]
    single = len(new_inputs) == 1  # Keras 3 warns when a one-input list model gets a tensor
    model = adapter.model(new_inputs[0] if single else new_inputs, packed, name)
    if walk.nominal is not None:  # costed at the same sizes as the model it came from
        set_nominal_shapes(model, walk.nominal)
    return model


def call_symbolically(
    walk: Walk, make_layer: Callable[[Call], Any] = lambda call: call.layer
) -> tuple[list[Any], dict[str, Any]]:
    """Call ``make_layer(call)`` for each call on new symbolic inputs (the batch axis open,
    even where the model fixed it): Keras builds each layer as a functional model
    would. Returns the new inputs and every tensor by key. ``make_layer`` as in
    :func:`rebuild`; by default the calls' own layers."""
    adapter = walk.adapter or adapter_for(walk.calls[0].layer)
    new_inputs = [
        adapter.input((None, *t.shape[1:]), t.dtype, (t.name or "").split(":")[0] or None)
        for t in walk.input_tensors
    ]
    tensors: dict[str, Any] = dict(zip(walk.input_keys, new_inputs, strict=True))
    for call in walk.calls:
        new_layer = make_layer(call)
        if new_layer is IDENTITY:
            tensors[call.outputs[0]] = tensors[call.inputs[0]]
            continue
        args, kwargs = _map_arguments(call, walk, tensors)
        produced = tf.nest.flatten(new_layer(*args, **kwargs))
        tensors.update(zip(call.outputs, produced, strict=True))
    return new_inputs, tensors


def run_calls(walk: Walk, inputs: Sequence[Any], scope: str | None = None) -> list[Any]:
    """Run the walked calls on real tensors, in inference mode; returns the model outputs.

    With ``scope``, call ``i`` runs inside ``tf.name_scope(f"{scope}{i}")``.
    """
    tensors = _run(walk, inputs, scope)
    return [tensors[k] for k in walk.output_keys]


def _run(walk: Walk, inputs: Sequence[Any], scope: str | None = None) -> dict[str, Any]:
    """Every tensor of :func:`run_calls`, by key."""
    tensors: dict[str, Any] = dict(zip(walk.input_keys, inputs, strict=True))
    for i, call in enumerate(walk.calls):
        args, kwargs = _map_arguments(call, walk, tensors)
        if training_parameter(call.layer) is not None:
            kwargs["training"] = False
        if scope is None:
            produced = call.layer(*args, **kwargs)
        else:
            with tf.name_scope(f"{scope}{i}"):
                produced = call.layer(*args, **kwargs)
        tensors.update(zip(call.outputs, tf.nest.flatten(produced), strict=True))
    return tensors


def training_parameter(layer: Any) -> Any:
    """The ``training`` parameter of ``layer.call`` (an ``inspect.Parameter``), or None."""
    import inspect

    try:
        return inspect.signature(layer.call).parameters.get("training")
    except (TypeError, ValueError):
        return None


def _map_arguments(call: Call, walk: Walk, tensors: dict[str, Any]) -> tuple[list, dict]:
    adapter = walk.adapter or adapter_for(call.layer)
    keras_inputs = adapter.node_inputs(call.node)
    by_id = dict(zip((str(id(t)) for t in keras_inputs), call.inputs, strict=True))

    def swap(value: Any) -> Any:
        key = by_id.get(str(id(value)))
        return tensors[key] if key is not None else value

    args, kwargs = adapter.node_call(call.node)
    return tf.nest.map_structure(swap, args), tf.nest.map_structure(swap, kwargs)


def clone_layer(source: Any, /, **config_overrides: Any) -> Any:
    """A fresh, unbuilt copy of layer ``source`` from its config, with overrides applied
    (a wrapper's ``layer`` entry may be overridden too)."""
    if isinstance(source, KerasOp) or (not config_overrides and _used_as_is(source)):
        return source  # an operation is stateless: the same one serves the copy
    config = source.get_config()
    config.update(config_overrides)
    try:
        return adapter_for(source).layer_from_config(type(source), config)
    except (TypeError, ValueError) as err:  # a custom layer whose __init__ refuses its config
        if not config_overrides and not source.weights:
            return source  # weightless: like an operation, the same layer serves the copy
        raise UnsupportedModelError(
            f"layer {source.name!r} ({type(source).__name__}) cannot be re-created from its "
            f"config: {str(err).splitlines()[0][:200]}. Give its __init__ **kwargs passed on "
            "to super().__init__(**kwargs), and a get_config() that returns its own arguments "
            "with super().get_config()'s"
        ) from err


def _used_as_is(layer: Any) -> bool:
    """Layers a copy without config changes shares instead of rebuilding from config: a
    weightless ``Lambda`` (Keras 3 may not run one rebuilt from config), and lookup
    layers (an adapted vocabulary lives in a table the config does not hold)."""
    name = type(layer).__name__
    return (name == "Lambda" and not layer.weights) or name in _STATE_OUTSIDE_WEIGHTS


def set_layer_weights(layer: Any, values: Sequence[Any]) -> None:
    """``layer.set_weights(values)``, then the state derived from them.

    Keras 3's preprocessing layers (an adapted ``Normalization``) compute their
    constants from their weights in ``finalize_state``, which its ``set_weights``
    does not call (tf_keras' does): without it, a copy normalises with mean 0
    and variance 1.
    """
    layer.set_weights(values)
    finalize = getattr(layer, "finalize_state", None)
    if len(values) and callable(finalize):
        finalize()


def weights_of(walk: Walk) -> dict[str, list[Any]]:
    """Every call's current weights (numpy copies), for :func:`clone_flat` later.

    Much cheaper than a clone: take it where the model must be remembered, clone
    only where the copy is used.
    """
    values = read_weights([call.layer for call in walk.calls])
    return {call.name: v for call, v in zip(walk.calls, values, strict=True)}


def clone_flat(
    walk: Walk, name: str | None = None, weights: Mapping[str, list[Any]] | None = None
) -> tuple[keras.Model, dict[str, Any]]:
    """An independent copy of the walked model (nested models flattened).

    Args:
        walk: the model's walk.
        name: the copy's name (default: the model's).
        weights: call name -> weights (from :func:`weights_of`) to give the copy
            instead of the model's current ones.

    Returns:
        ``(model, layers)`` where ``layers`` maps each call name to its new layer.
        Weights are copied; the original model is not touched.
    """
    layers: dict[str, Any] = {}
    by_id: dict[int, Any] = {}  # a shared layer stays shared in the copy

    def make(call: Call) -> Any:
        if id(call.layer) not in by_id:
            by_id[id(call.layer)] = clone_layer(call.layer)
        layers[call.name] = by_id[id(call.layer)]
        return layers[call.name]

    model = rebuild(walk, make, name=name or walk.model_name)
    weights = weights_of(walk) if weights is None else weights
    for call in walk.calls:
        set_layer_weights(layers[call.name], weights[call.name])
    return model, layers

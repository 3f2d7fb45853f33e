"""Walk a functional tf_keras model call by call, nested models flattened.

This is the one module that reads Keras's functional-graph structure
(``Functional._nodes_by_depth`` and the public attributes of its ``Node``s).
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
from collections.abc import Callable, Sequence
from typing import Any

import tensorflow as tf

from tf_balancer._compat import ensure_keras2_model, keras
from tf_balancer.errors import UnsupportedModelError

__all__ = ["Call", "Walk", "walk_model", "rebuild", "clone_flat", "clone_layer", "IDENTITY"]


@dataclasses.dataclass(frozen=True)
class Call:
    """One call of a layer in the (flattened) model graph.

    Attributes:
        name: unique name; ``outer/inner`` for layers of nested models, with a
            ``#k`` suffix when a layer is called more than once.
        layer: the Keras layer object (shared with the user's model; never mutated).
        node: the Keras ``Node`` of this call (holds the call's arguments).
        inputs: keys of the tensors this call consumes, in argument order.
        outputs: keys of the tensors it produces.
        shared: the layer is called more than once in the model.
    """

    name: str
    layer: Any
    node: Any
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    shared: bool = False

    @property
    def class_name(self) -> str:
        return type(self.layer).__name__


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


def _is_graph_network(model: Any) -> bool:
    return isinstance(model, keras.Model) and getattr(model, "_is_graph_network", False)


class _Walker:
    def __init__(self) -> None:
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
        self.dtypes.setdefault(key, tensor.dtype.name)
        return key

    def walk(self, model: Any, scope: str) -> None:
        for depth in sorted(model._nodes_by_depth, reverse=True):
            for node in model._nodes_by_depth[depth]:
                if node.is_input:
                    continue
                if _is_graph_network(node.layer):
                    self._walk_nested(node, scope)
                else:
                    self._add_call(node, scope)

    def _walk_nested(self, node: Any, scope: str) -> None:
        inner = node.layer
        inner_scope = f"{scope}{inner.name}/"
        calls = self.scopes.get(inner_scope, 0)
        self.scopes[inner_scope] = calls + 1
        if calls:
            inner_scope = f"{scope}{inner.name}#{calls}/"
        for inner_in, outer_in in zip(inner.inputs, node.keras_inputs, strict=True):
            self.alias[inner_scope + str(id(inner_in))] = self.record(outer_in, scope)
        self.walk(inner, inner_scope)
        outer_outs = tf.nest.flatten(node.outputs)
        for outer_out, inner_out in zip(outer_outs, inner.outputs, strict=True):
            self.alias[scope + str(id(outer_out))] = self.key(inner_scope + str(id(inner_out)))

    def _add_call(self, node: Any, scope: str) -> None:
        layer = node.layer
        inputs = tuple(self.record(t, scope) for t in node.keras_inputs)
        outputs = tuple(self.record(t, scope) for t in tf.nest.flatten(node.outputs))
        self.calls.append(Call(f"{scope}{layer.name}", layer, node, inputs, outputs))


def walk_model(model: Any) -> Walk:
    """Flatten a functional or Sequential tf_keras model into its layer calls.

    Raises:
        UnsupportedModelError: for Keras 3 models, unbuilt Sequential models and
            subclassed models (whose call graph Keras does not record).
    """
    model = ensure_keras2_model(model)
    if not _is_graph_network(model):
        raise UnsupportedModelError(
            f"model {model.name!r} is subclassed or not built, so its layer graph is unknown; "
            "build it with the Functional or Sequential API (with a `keras.Input`), or pass "
            "its traced tf.function/SavedModel to `tf_balancer.inspect` for a graph-level view."
        )
    walker = _Walker()
    input_keys = tuple(walker.record(t, "") for t in model.inputs)
    walker.walk(model, "")
    output_keys = tuple(walker.key(str(id(t))) for t in model.outputs)
    calls = _mark_shared(walker.calls)
    return Walk(
        model.name,
        calls,
        input_keys,
        output_keys,
        walker.shapes,
        walker.dtypes,
        tuple(model.inputs),
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
    new_inputs = [
        keras.Input(batch_shape=t.shape, dtype=t.dtype, name=t.name.split(":")[0])
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
    result = [tensors[k] for k in (walk.output_keys if outputs is None else outputs)]
    return keras.Model(new_inputs, result if len(result) > 1 else result[0], name=name)


def _map_arguments(call: Call, walk: Walk, tensors: dict[str, Any]) -> tuple[list, dict]:
    node = call.node
    by_id = dict(zip((str(id(t)) for t in node.keras_inputs), call.inputs, strict=True))

    def swap(value: Any) -> Any:
        key = by_id.get(str(id(value)))
        return tensors[key] if key is not None else value

    args = tf.nest.map_structure(swap, list(node.call_args))
    kwargs = tf.nest.map_structure(swap, dict(node.call_kwargs))
    return args, kwargs


def clone_layer(layer: Any, **config_overrides: Any) -> Any:
    """A fresh, unbuilt copy of ``layer`` from its config, with overrides applied."""
    config = layer.get_config()
    config.update(config_overrides)
    return type(layer).from_config(config)


def clone_flat(walk: Walk, name: str | None = None) -> tuple[keras.Model, dict[str, Any]]:
    """An independent copy of the walked model (nested models flattened).

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
    for call in walk.calls:
        layers[call.name].set_weights(call.layer.get_weights())
    return model, layers

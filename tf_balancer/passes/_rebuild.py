"""Shared helpers of the function-preserving passes: find layer pairs, rebuild with replacements.

The passes ``strip_training_ops``, ``fold_batchnorm`` and ``fuse_activation``
all do the same thing in the end: rebuild the model call by call, dropping some
calls (:data:`~tf_balancer.graph.walk.IDENTITY`) and re-creating others from a
changed config, and copy every other layer's weights unchanged.
:func:`rebuild_with` does that once for all of them. It also keeps the model's
output names: when the layer that produced an output is dropped or merged into
its producer, the surviving layer takes the output's original name.

Example:
    >>> from tf_balancer._compat import adapter_for, keras
    >>> from tf_balancer.graph.walk import walk_model
    >>> inp = keras.Input((4,), name="x")
    >>> hidden = keras.layers.Dense(3, name="d")(inp)
    >>> model = keras.Model(inp, keras.layers.Dropout(0.5, name="drop")(hidden))
    >>> new = rebuild_with(model, walk_model(model), {"drop": IDENTITY})
    >>> [layer.name for layer in new.layers], new.output_names
    (['x', 'drop'], ['drop'])
"""

from __future__ import annotations

import abc
import dataclasses
import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import tensorflow as tf

from tf_balancer._compat import adapter_for, keras
from tf_balancer.graph.walk import (
    IDENTITY,
    Call,
    Walk,
    clone_layer,
    rebuild,
    set_layer_weights,
    training_parameter,
    walk_model,
)
from tf_balancer.passes.base import GraphPass, PassContext, PassResult

__all__ = [
    "IDENTITY",
    "Replacement",
    "Rewrite",
    "RebuildPass",
    "rebuild_with",
    "fill_weights",
    "walk_of",
    "tensor_uses",
    "producers",
    "forced_training",
    "single_consumer_producer",
]

_log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Replacement:
    """How to re-create one call's layer.

    Attributes:
        overrides: config values changed on the clone (e.g. ``{"use_bias": True}``).
        weights: weight attribute -> value (e.g. ``{"kernel": ..., "bias": ...}``)
            assigned after the model is built; it must cover every weight of the
            new layer. Empty: the original layer's weights are copied unchanged.
        layer: a built layer, weights set, to call as it is instead (a chain of
            passes made it already); ``overrides`` and ``weights`` are then unused.
    """

    overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    weights: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)
    layer: Any = None


@dataclasses.dataclass(frozen=True)
class Rewrite:
    """What a :class:`RebuildPass` changes in a walk, before any model is built.

    Attributes:
        replacements: call name -> :class:`Replacement`, or ``IDENTITY`` to drop it.
        message: the pass record's message.
        stats: the pass record's stats.
    """

    replacements: Mapping[str, Any]
    message: str
    stats: Mapping[str, Any] = dataclasses.field(default_factory=dict)


class RebuildPass(GraphPass):
    """A pass that drops some calls and re-creates others from a changed config.

    Subclasses implement :meth:`rewrite`, which reads the walk only (a call's
    layer, config, weights and neighbours). Run alone, the pass rebuilds the model
    with the rewrite (:func:`rebuild_with`); several in a row, the
    :class:`~tf_balancer.optimizer.MetaOptimizer` applies each rewrite to the walk
    the previous one left (:mod:`tf_balancer.passes.chain`) and builds one model
    at the end.

    Example (a pass that drops every ``GaussianNoise`` layer):
        >>> from tf_balancer import register_pass, unregister_pass
        >>> @register_pass("drop_noise_example")
        ... class DropNoise(RebuildPass):
        ...     def rewrite(self, walk, ctx):
        ...         noise = [c.name for c in walk.calls if type(c.layer).__name__ == "GaussianNoise"]
        ...         return Rewrite(dict.fromkeys(noise, IDENTITY), f"dropped {noise}") if noise else None
        >>> unregister_pass("drop_noise_example")
    """

    @abc.abstractmethod
    def rewrite(self, walk: Walk, ctx: PassContext) -> Rewrite | None:
        """The calls to drop or replace in ``walk``, or None when there is nothing to do."""

    def run(self, model: Any, graph: Any, ctx: PassContext) -> PassResult:
        walk = walk_of(model, graph)
        change = self.rewrite(walk, ctx)
        if change is None:
            return PassResult(model, changed=False, message=self.nothing_to_do)
        new_model = rebuild_with(model, walk, change.replacements)
        _log.debug("%s", change.message)
        return PassResult(new_model, changed=True, message=change.message, stats=dict(change.stats))

    nothing_to_do: str = "nothing to do"
    """The record's message when :meth:`rewrite` finds nothing."""


def walk_of(model: Any, graph: Any) -> Walk:
    """The graph's walk, or a fresh walk of ``model`` when no graph is given."""
    return graph.walk if graph is not None else walk_model(model)


def tensor_uses(walk: Walk) -> dict[str, int]:
    """Tensor key -> number of times it is consumed (by calls or as a model output)."""
    uses: dict[str, int] = {}
    for key in [k for call in walk.calls for k in call.inputs] + list(walk.output_keys):
        uses[key] = uses.get(key, 0) + 1
    return uses


def producers(walk: Walk) -> dict[str, Call]:
    """Tensor key -> the call that produces it (model inputs have none)."""
    return {key: call for call in walk.calls for key in call.outputs}


def forced_training(call: Call) -> bool:
    """True when the call passes ``training=True`` (e.g. Monte Carlo dropout).

    Keras 3 records the default of ``call``'s ``training`` argument when none is
    given, and its augmentation layers default to True: that is not forced.
    """
    args, kwargs = call.arguments
    training = kwargs.get("training")
    if training is None and len(args) > 1:
        training = args[1]
    parameter = training_parameter(call.layer)
    return training is True and (parameter is None or parameter.default is not True)


def single_consumer_producer(
    call: Call, walk: Walk, uses: Mapping[str, int], prods: Mapping[str, Call]
) -> Call | None:
    """The producer ``call`` can merge into: that of its only input, if ``call`` is that
    tensor's only consumer and computes in the same dtype.

    Both calls must be unshared single-output calls (a float32 ``Activation`` after a
    float16 ``Dense``, as mixed precision writes a softmax head, stays apart); otherwise
    returns None. ``uses`` and ``prods`` are :func:`tensor_uses` and :func:`producers`
    of ``walk``.
    """
    if len(call.inputs) != 1 or len(call.outputs) != 1 or call.shared:
        return None
    key = call.inputs[0]
    producer = prods.get(key)
    if producer is None or producer.shared or len(producer.outputs) != 1:
        return None
    if walk.dtypes.get(call.outputs[0]) != walk.dtypes.get(key):
        return None
    return producer if uses.get(key) == 1 else None


def rebuild_with(
    model: Any,
    walk: Walk,
    replacements: Mapping[str, Replacement | object],
) -> keras.Model:
    """A new model with some calls replaced or dropped; every other layer cloned.

    Args:
        model: the original model (read, never modified).
        walk: ``walk_model(model)``.
        replacements: call name -> :class:`Replacement`, or ``IDENTITY`` to drop
            that (single-input) call.

    Returns:
        A functional model named like ``model``, with the same input and output
        names, whose untouched layers carry copies of the original weights.
    """
    renames = _output_renames(model, walk, replacements)
    made: dict[int, Any] = {}
    fills: list[tuple[Any, Call, Replacement | None]] = []

    def make_layer(call: Call) -> Any:
        change = replacements.get(call.name)
        if change is IDENTITY:
            return IDENTITY
        if id(call.layer) not in made:
            prebuilt = change.layer if change is not None else None
            rename = {"name": renames[id(call.layer)]} if id(call.layer) in renames else {}
            if prebuilt is not None and not rename:
                made[id(call.layer)] = prebuilt  # built and filled already
                return prebuilt
            if prebuilt is not None:  # a copy under the output's name, filled from it
                made[id(call.layer)] = clone_layer(prebuilt, **rename)
            else:
                overrides = dict(change.overrides) if change is not None else {}
                made[id(call.layer)] = clone_layer(call.layer, **overrides, **rename)
            fills.append((made[id(call.layer)], call, change))
        return made[id(call.layer)]

    new_model = rebuild(walk, make_layer, name=model.name)
    for layer, call, change in fills:
        fill_weights(layer, call, change)
    return new_model


def fill_weights(layer: Any, call: Call, change: Replacement | None) -> None:
    """Set the weights of ``layer``, the new layer of ``call``: those ``change`` gives,
    else a copy of ``call.layer``'s."""
    if change is not None and change.layer is not None:  # a prebuilt layer, renamed
        set_layer_weights(layer, change.layer.get_weights())
        return
    if change is None or not change.weights:
        set_layer_weights(layer, call.layer.get_weights())
        return
    variables = [getattr(layer, attr) for attr in change.weights]
    if len(variables) != len(layer.weights):
        raise ValueError(
            f"replacement weights for {call.name!r} cover {sorted(change.weights)} but the new "
            f"layer has {len(layer.weights)} weights; give a value for every weight attribute"
        )
    for variable, value in zip(variables, change.weights.values(), strict=True):
        variable.assign(np.asarray(value, dtype=tf.as_dtype(variable.dtype).as_numpy_dtype))


def _output_renames(
    model: Any, walk: Walk, replacements: Mapping[str, Replacement | object]
) -> dict[int, str]:
    """``id(layer)`` -> new layer name, so each output keeps its original name."""
    prods = producers(walk)
    kept_names = {
        call.layer.name for call in walk.calls if replacements.get(call.name) is not IDENTITY
    }
    names: dict[int, str] = {}  # id(layer) -> the name its outputs need
    output_names = adapter_for(model).output_names(model)
    for key, wanted in zip(walk.output_keys, output_names, strict=True):
        call = prods.get(key)
        while call is not None and replacements.get(call.name) is IDENTITY:
            call = prods.get(call.inputs[0])
        if call is None:
            _log.warning("output %r is now a model input and takes the input's name", wanted)
            continue
        free = wanted == call.layer.name or wanted not in kept_names
        if names.setdefault(id(call.layer), wanted if free else call.layer.name) != wanted:
            _log.warning("cannot keep output name %r: another layer has it", wanted)
    layer_names = {id(call.layer): call.layer.name for call in walk.calls}
    return {key: name for key, name in names.items() if name != layer_names[key]}

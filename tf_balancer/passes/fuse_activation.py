"""``fuse_activation``: move a standalone activation layer into the conv/dense before it.

``Conv2D(..., activation="linear")`` followed by ``ReLU()`` computes the same as
``Conv2D(..., activation="relu")``; the fused model has one layer (and one
kernel launch) less. Fused activations:

* ``ReLU()`` with default arguments -> ``"relu"``;
* ``ReLU(max_value=6)`` (``negative_slope=0``, ``threshold=0``) -> ``"relu6"``
  (a tf_keras activation name; both run ``tf.nn.relu6``);
* ``Activation(name)`` for any activation name tf_keras resolves;
* an operation that is an activation: ``keras.ops.relu``/``relu6``/``sigmoid``/``tanh``
  in Keras 3, the same TensorFlow functions (``TFOpLambda``) in tf_keras.

Other ReLU settings (a negative slope, a threshold, another cap) have no
activation-name equivalent and are left alone. The producer must be a Conv1D/2D/3D(Transpose),
Dense, DepthwiseConv1D/2D or SeparableConv1D/2D with a linear activation, called
once, whose output feeds only the activation layer. The fused layer keeps the
conv's name (or the activation's name when that produced a model output).

Example:
    >>> from tf_balancer._compat import builtin_layer_name, keras, keras_of
    >>> from tf_balancer.graph.layer_graph import LayerGraph
    >>> inp = keras.Input((8, 8, 3))
    >>> x = keras.layers.Conv2D(4, 3, name="conv")(inp)
    >>> x = keras.layers.ReLU(6.0, name="relu6")(x)
    >>> model = keras.Model(inp, keras.layers.GlobalAveragePooling2D(name="pool")(x))
    >>> result = FuseActivation().run(model, LayerGraph.from_model(model), PassContext())
    >>> result.stats["fused"], result.model.get_layer("conv").get_config()["activation"]
    ((('conv', 'relu6'),), 'relu6')
"""

from __future__ import annotations

from typing import Any

from tf_balancer._compat import builtin_layer_name, keras_of, op_arguments
from tf_balancer.graph.walk import Call, Walk
from tf_balancer.passes._rebuild import (
    IDENTITY,
    RebuildPass,
    Replacement,
    Rewrite,
    producers,
    single_consumer_producer,
    tensor_uses,
)
from tf_balancer.passes.base import PassContext, register_pass

__all__ = ["FuseActivation", "activation_name"]


_PRODUCERS: tuple[str, ...] = (
    "Conv1D",
    "Conv2D",
    "Conv3D",
    "Conv1DTranspose",
    "Conv2DTranspose",
    "Conv3DTranspose",
    "Dense",
    "DepthwiseConv1D",
    "DepthwiseConv2D",
    "SeparableConv1D",
    "SeparableConv2D",
)


def activation_name(layer: Any) -> str | None:
    """The activation name equivalent to a ``ReLU`` or ``Activation`` layer, or None.

    Example:
        >>> activation_name(keras.layers.ReLU(max_value=6.0))
        'relu6'
        >>> activation_name(keras.layers.ReLU(negative_slope=0.1)) is None
        True
    """
    arguments = op_arguments(layer)  # keras.ops.relu(x), tf.nn.relu(x)
    if arguments is not None:
        if arguments.op == "ReLU" and arguments.tensors == 1:  # keras.activations.relu(x, ...)
            op = getattr(layer, "op", layer)  # Keras 3's operation, with the ReLU's arguments
            return _relu_name(*(getattr(op, a, None) for a in _RELU_ARGUMENTS))
        name = _OP_ACTIVATIONS.get(arguments.op) if arguments.tensors == 1 else None
        return name if name and _known_activation(layer, name) else None
    config = layer.get_config()
    kind = builtin_layer_name(layer)
    if kind == "ReLU":
        return _relu_name(*(config[a] for a in _RELU_ARGUMENTS))
    if kind == "Activation":
        name = config.get("activation")
        if not isinstance(name, str):
            return None
        return name if _known_activation(layer, name) else None
    return None


_RELU_ARGUMENTS = ("negative_slope", "max_value", "threshold")


def _relu_name(negative_slope: Any, max_value: Any, threshold: Any) -> str | None:
    """``"relu"`` or ``"relu6"`` for a ReLU with these arguments, else None."""
    if float(negative_slope or 0.0) != 0.0 or float(threshold or 0.0) != 0.0:
        return None
    if max_value is None:
        return "relu"
    return "relu6" if float(max_value) == 6.0 else None


_OP_ACTIVATIONS = {"Relu": "relu", "Relu6": "relu6", "Sigmoid": "sigmoid", "Tanh": "tanh"}
"""Operations (Keras 3 ops, tf_keras ``TFOpLambda``) that are a Keras activation."""


def _known_activation(layer: Any, name: str) -> bool:
    try:
        keras_of(layer).activations.get(name)
    except ValueError:
        return False
    return True


def _fusable_producer(call: Call) -> bool:
    return (
        builtin_layer_name(call.layer) in _PRODUCERS
        and call.layer.get_config()["activation"] == "linear"
    )


def _find_pairs(walk: Walk) -> list[tuple[Call, Call, str]]:
    uses, prods = tensor_uses(walk), producers(walk)
    pairs = []
    for call in walk.calls:
        name = activation_name(call.layer)
        if name is None:
            continue
        conv = single_consumer_producer(call, walk, uses, prods)
        if conv is not None and _fusable_producer(conv):
            pairs.append((conv, call, name))
    return pairs


@register_pass("fuse_activation")
class FuseActivation(RebuildPass):
    """Fuse ReLU / ReLU6 / ``Activation`` layers into the preceding conv/dense.

    Stats:
        fused: ``(conv, activation_layer)`` call-name pairs, in topological order.
    """

    nothing_to_do = "no fusable activation layer"

    def rewrite(self, walk: Walk, ctx: PassContext) -> Rewrite | None:
        pairs = _find_pairs(walk)
        if not pairs:
            return None
        replacements: dict[str, Any] = {}
        for conv, act, name in pairs:
            replacements[conv.name] = Replacement({"activation": name})
            replacements[act.name] = IDENTITY
        fused = tuple((conv.name, act.name) for conv, act, _ in pairs)
        return Rewrite(replacements, f"fused {len(fused)} activation layers", {"fused": fused})

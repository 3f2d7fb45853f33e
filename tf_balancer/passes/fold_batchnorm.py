"""``fold_batchnorm``: fold an inference BatchNormalization into the conv/dense before it.

At inference ``BatchNormalization`` is an affine map per channel,
``y = scale * (x - moving_mean) + beta`` with
``scale = gamma / sqrt(moving_variance + epsilon)`` (``gamma = 1`` when
``scale=False``, ``beta = 0`` when ``center=False``). Following a linear
``x = conv(inp) + bias`` it folds into the conv::

    kernel' = kernel * scale          (along the output-channel axis)
    bias'   = (bias - moving_mean) * scale + beta

The pair is folded only when the conv/dense has a linear activation, uses
``channels_last``, is called once and its output feeds nothing but the
BatchNormalization, and the BatchNormalization normalises the last axis, is not
called with ``training=True`` and uses neither renorm, virtual batches nor an
adjustment function. The folded layer keeps the conv's name (or the BN's name
when the BN produced a model output) and always has ``use_bias=True``.

Supported: Conv1D/2D/3D, Conv1D/2D/3DTranspose (their kernel's second-to-last
axis is scaled), Dense, DepthwiseConv1D/2D (output channel
``c * depth_multiplier + m`` scales ``depthwise_kernel[..., c, m]``) and
SeparableConv1D/2D (the pointwise kernel is scaled).

Example:
    >>> from tf_balancer._compat import builtin_layer_name, keras, weight_attribute
    >>> from tf_balancer.graph.layer_graph import LayerGraph
    >>> inp = keras.Input((8, 8, 3))
    >>> x = keras.layers.Conv2D(4, 3, use_bias=False, name="conv")(inp)
    >>> model = keras.Model(inp, keras.layers.BatchNormalization(name="bn")(x))
    >>> result = FoldBatchNorm().run(model, LayerGraph.from_model(model), PassContext())
    >>> result.stats["folded"], result.model.output_names
    ((('conv', 'bn'),), ['bn'])
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from tf_balancer._compat import builtin_layer_name, weight_attribute
from tf_balancer.graph.walk import Call, Walk
from tf_balancer.passes._rebuild import (
    IDENTITY,
    RebuildPass,
    Replacement,
    Rewrite,
    forced_training,
    producers,
    single_consumer_producer,
    tensor_uses,
)
from tf_balancer.passes.base import PassContext, register_pass

__all__ = ["FoldBatchNorm", "fold_weights"]


# built-in layer class name -> (its kernel attributes in weight order, the scaled one, the
# axes of the scaled kernel that index the output channels)
_FOLDABLE: dict[str, tuple[tuple[str, ...], str, tuple[int, ...]]] = {
    **{name: (("kernel",), "kernel", (-1,)) for name in ("Conv1D", "Conv2D", "Conv3D", "Dense")},
    # a transposed convolution's kernel is (*window, filters, input channels)
    **{f"Conv{d}DTranspose": (("kernel",), "kernel", (-2,)) for d in (1, 2, 3)},
    **{
        name: (("depthwise_kernel",), "depthwise_kernel", (-2, -1))
        for name in ("DepthwiseConv1D", "DepthwiseConv2D")
    },
    **{
        name: (("depthwise_kernel", "pointwise_kernel"), "pointwise_kernel", (-1,))
        for name in ("SeparableConv1D", "SeparableConv2D")
    },
}


def _foldable_producer(call: Call) -> bool:
    config = call.layer.get_config()
    return (
        builtin_layer_name(call.layer) in _FOLDABLE
        and config.get("activation") == "linear"
        and config.get("data_format") != "channels_first"
    )


def _is_inference_bn(call: Call, walk: Walk) -> bool:
    layer = call.layer
    if builtin_layer_name(layer) != "BatchNormalization" or forced_training(call):
        return False
    if getattr(layer, "renorm", False) or getattr(layer, "virtual_batch_size", None):
        return False
    if getattr(layer, "adjustment", None) is not None:
        return False
    axis = layer.get_config()["axis"]
    axis = list(axis) if isinstance(axis, (list, tuple)) else [axis]
    rank = len(walk.shapes[call.inputs[0]]) if len(call.inputs) == 1 else 0
    return len(axis) == 1 and axis[0] in (-1, rank - 1)


def fold_weights(conv: Any, bn: Any) -> dict[str, np.ndarray]:
    """Weights (attribute -> value) of ``conv`` with ``bn`` folded in, bias included.

    Args:
        conv: a built layer of a supported type (see the module docstring).
        bn: a built ``BatchNormalization`` over the conv's output channels.

    Raises:
        ValueError: when the BN's channel count differs from the conv's.
    """
    kernels, scaled, axes = _FOLDABLE[builtin_layer_name(conv)]
    mean = bn.moving_mean.numpy().astype(np.float64)
    gamma = bn.gamma.numpy().astype(np.float64) if bn.gamma is not None else 1.0
    beta = bn.beta.numpy().astype(np.float64) if bn.beta is not None else 0.0
    scale = gamma / np.sqrt(bn.moving_variance.numpy().astype(np.float64) + bn.epsilon)
    kernels = tuple(weight_attribute(conv, attr) for attr in kernels)
    scaled = weight_attribute(conv, scaled)
    weights = {attr: getattr(conv, attr).numpy().astype(np.float64) for attr in kernels}
    kernel = weights[scaled]
    shape = [1] * kernel.ndim  # scale broadcast along the output-channel axes
    for axis in axes:
        shape[axis] = kernel.shape[axis]
    if int(np.prod(shape)) != mean.shape[0]:
        raise ValueError(
            f"cannot fold {bn.name!r} ({mean.shape[0]} channels) into {conv.name!r} "
            f"(kernel {kernel.shape}); the BatchNormalization must follow the layer directly"
        )
    weights[scaled] = kernel * np.reshape(scale, shape)
    bias = conv.bias.numpy().astype(np.float64) if conv.bias is not None else 0.0
    weights["bias"] = (bias - mean) * scale + beta
    return weights


def _find_pairs(walk: Walk) -> list[tuple[Call, Call]]:
    uses, prods = tensor_uses(walk), producers(walk)
    pairs = []
    for call in walk.calls:
        if not _is_inference_bn(call, walk):
            continue
        conv = single_consumer_producer(call, walk, uses, prods)
        if conv is not None and _foldable_producer(conv):
            pairs.append((conv, call))
    return pairs


def _replacements(pairs: list[tuple[Call, Call]]) -> Mapping[str, Any]:
    replacements: dict[str, Any] = {}
    for conv, bn in pairs:
        weights = fold_weights(conv.layer, bn.layer)
        replacements[conv.name] = Replacement({"use_bias": True}, weights)
        replacements[bn.name] = IDENTITY
    return replacements


@register_pass("fold_batchnorm")
class FoldBatchNorm(RebuildPass):
    """Fold inference BatchNormalization layers into the preceding conv/dense.

    Stats:
        folded: ``(conv, batchnorm)`` call-name pairs, in topological order.
    """

    nothing_to_do = "no foldable BatchNormalization"

    def rewrite(self, walk: Walk, ctx: PassContext) -> Rewrite | None:
        pairs = _find_pairs(walk)
        if not pairs:
            return None
        folded = tuple((conv.name, bn.name) for conv, bn in pairs)
        message = f"folded {len(folded)} BatchNormalization layers"
        return Rewrite(_replacements(pairs), message, {"folded": folded})

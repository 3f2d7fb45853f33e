"""How each Keras layer type relates to channels (the last axis).

A :class:`LayerSpec` says what a layer does to the channel axis and which axis of
each of its weights indexes input channels, output channels or pass-through
channels. The layer graph uses it to build channel groups; masking and the
``prune_channels`` pass use the same axes to zero or slice weights, and the cost
model to count parameters under a plan. One table, three users.

Roles:
    ``producer``     creates new output channels (Conv, Dense, SeparableConv).
    ``passthrough``  output channel ``c`` depends only on input channel ``c``
                     (BatchNorm, activations, pooling, DepthwiseConv2D, Dropout,
                     scalar Rescaling, a Reshape that keeps the last axis).
    ``merge``        element-wise merge of same-shaped inputs (Add, Multiply, ...).
    ``concat``       concatenation along the channel axis.
    ``flatten``      channels become ``spatial x channels`` features.
    ``reduce``       global pooling: spatial axes go, channels stay.
    ``opaque``       anything else: groups it touches are not prunable.

Example:
    >>> spec_for(keras.layers.Conv2D(8, 3)).role
    'producer'
"""

from __future__ import annotations

import dataclasses
from typing import Any

from tf_balancer._compat import is_layer, weight_attribute

__all__ = ["LayerSpec", "spec_for", "opaque_reason", "couples_channels", "keeps_channel_axis"]


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """Channel semantics of one layer type.

    Attributes:
        role: see the module docstring.
        out_axes: weight attribute -> axis indexing output channels (producers).
        in_axes: weight attribute -> axis indexing input channels (consumers).
        ch_axes: weight attribute -> axis indexing pass-through channels.
    """

    role: str
    out_axes: dict[str, int] = dataclasses.field(default_factory=dict)
    in_axes: dict[str, int] = dataclasses.field(default_factory=dict)
    ch_axes: dict[str, int] = dataclasses.field(default_factory=dict)


_CONV = LayerSpec("producer", out_axes={"kernel": -1, "bias": 0}, in_axes={"kernel": -2})
_SEPARABLE = LayerSpec(
    "producer",
    out_axes={"pointwise_kernel": -1, "bias": 0},
    in_axes={"depthwise_kernel": -2, "pointwise_kernel": -2},
)
_DEPTHWISE = LayerSpec("passthrough", ch_axes={"depthwise_kernel": -2, "bias": 0})
_BATCHNORM = LayerSpec(
    "passthrough",
    ch_axes={"gamma": 0, "beta": 0, "moving_mean": 0, "moving_variance": 0},
)
_PASS = LayerSpec("passthrough")

_SPECS: dict[str, LayerSpec] = {
    "Conv1D": _CONV,
    "Conv2D": _CONV,
    "Conv3D": _CONV,
    "Dense": _CONV,
    "SeparableConv1D": _SEPARABLE,
    "SeparableConv2D": _SEPARABLE,
    "DepthwiseConv1D": _DEPTHWISE,
    "DepthwiseConv2D": _DEPTHWISE,
    "BatchNormalization": _BATCHNORM,
    "Flatten": LayerSpec("flatten"),
    "Concatenate": LayerSpec("concat"),
    **{
        name: LayerSpec("merge")
        for name in ("Add", "Multiply", "Subtract", "Average", "Maximum", "Minimum")
    },
    **{
        name: LayerSpec("reduce")
        for name in (
            "GlobalAveragePooling1D",
            "GlobalAveragePooling2D",
            "GlobalMaxPooling1D",
            "GlobalMaxPooling2D",
        )
    },
    **{
        name: _PASS
        for name in (
            "Activation",
            "ReLU",
            "LeakyReLU",
            "ELU",
            "ThresholdedReLU",
            "Dropout",
            "SpatialDropout1D",
            "SpatialDropout2D",
            "GaussianNoise",
            "GaussianDropout",
            "AlphaDropout",
            "ActivityRegularization",
            "MaxPooling1D",
            "MaxPooling2D",
            "AveragePooling1D",
            "AveragePooling2D",
            "ZeroPadding1D",
            "ZeroPadding2D",
            "Cropping1D",
            "Cropping2D",
            "UpSampling1D",
            "UpSampling2D",
            "Reshape",  # only when it keeps the channel axis: see opaque_reason
            "Rescaling",  # a scalar scale and offset
        )
    },
}

_CHANNEL_COUPLING_ACTIVATIONS = ("softmax", "log_softmax")


def opaque_reason(layer: Any, rank: int | None = None) -> str | None:
    """Why a layer with a known role must still be treated as opaque, or None.

    Args:
        layer: the Keras layer.
        rank: rank of its (first) input tensor, batch axis included.
    """
    config = layer.get_config()
    if config.get("data_format") == "channels_first":
        return "channels_first data format (only channels_last is supported)"
    if config.get("groups", 1) != 1:
        return "grouped convolution"
    if config.get("depth_multiplier", 1) != 1:
        return "depth_multiplier != 1"
    if couples_channels(layer) and _SPECS.get(type(layer).__name__) != _CONV:
        return f"activation {config['activation']!r} couples channels"
    if type(layer).__name__ == "Reshape" and not keeps_channel_axis(layer):
        return "Reshape that changes the last (channel) axis"
    if type(layer).__name__ == "Rescaling" and not _is_scalar(config):
        return "Rescaling with a per-channel scale or offset"
    axis = config.get("axis")
    if type(layer).__name__ in ("Concatenate", "BatchNormalization") and not _is_last_axis(
        axis, rank
    ):
        return f"works along axis {axis} (not the channel axis)"
    return None


def keeps_channel_axis(layer: Any) -> bool:
    """True for a ``Reshape`` whose last axis is its input's last axis (channel ``c``
    stays channel ``c``: e.g. squeeze-excite's ``Reshape((1, 1, C))`` after pooling)."""
    target = tuple(layer.get_config().get("target_shape") or ())
    try:
        channels = layer.input.shape[-1]
    except (AttributeError, ValueError, RuntimeError):  # unbuilt, or shared: unknown
        return False
    return bool(target) and channels is not None and target[-1] == int(channels)


def _is_scalar(config: dict) -> bool:
    return all(isinstance(config.get(k, 0.0), (int, float)) for k in ("scale", "offset"))


def couples_channels(layer: Any) -> bool:
    """True when the layer's activation mixes its output channels (softmax)."""
    return layer.get_config().get("activation") in _CHANNEL_COUPLING_ACTIVATIONS


def _is_last_axis(axis: Any, rank: int | None) -> bool:
    if isinstance(axis, (list, tuple)):
        if len(axis) != 1:
            return False
        axis = axis[0]
    return axis == -1 or (rank is not None and axis == rank - 1)


def spec_for(layer: Any, rank: int | None = None) -> LayerSpec:
    """The :class:`LayerSpec` of a layer (``opaque`` for unknown types)."""
    if is_layer(layer, "InputLayer"):
        return LayerSpec("input")
    spec = _SPECS.get(type(layer).__name__)
    if spec is None or opaque_reason(layer, rank) is not None:
        return LayerSpec("opaque")
    return _with_layer_attributes(spec, layer)


def _with_layer_attributes(spec: LayerSpec, layer: Any) -> LayerSpec:
    """``spec`` with weight attributes named as ``layer``'s Keras names them."""
    rename = {a: weight_attribute(layer, a) for axes in _axes(spec) for a in axes}
    if all(a == b for a, b in rename.items()):
        return spec
    return LayerSpec(
        spec.role,
        {rename[a]: ax for a, ax in spec.out_axes.items()},
        {rename[a]: ax for a, ax in spec.in_axes.items()},
        {rename[a]: ax for a, ax in spec.ch_axes.items()},
    )


def _axes(spec: LayerSpec) -> tuple[dict[str, int], ...]:
    return (spec.out_axes, spec.in_axes, spec.ch_axes)

"""How each Keras layer type relates to channels (the last axis).

A :class:`LayerSpec` says what a layer does to the channel axis and which axis of
each of its weights indexes input channels, output channels or pass-through
channels. The layer graph uses it to build channel groups; masking and the
``prune_channels`` pass use the same axes to zero or slice weights, and the cost
model to count parameters under a plan. One table, three users.

Roles:
    ``producer``     creates new output channels (Conv, ConvTranspose, Dense, SeparableConv,
                     Embedding) or units (LSTM, GRU, SimpleRNN - all gates and
                     the recurrent kernel together; also inside ``Bidirectional``
                     and ``TimeDistributed``).
    ``attention``    ``MultiHeadAttention``: its heads are a group of their own
                     (query/key/value/output kernels sliced per head); the model
                     width it reads and writes is not pruned.
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

import copy
import dataclasses
from typing import Any

import numpy as np

from tf_balancer._compat import (
    REDUCTIONS,
    KerasOp,
    OpArguments,
    is_layer,
    op_arguments,
    weight_attribute,
)

__all__ = [
    "WeightAxis",
    "LayerSpec",
    "RECURRENT_GATES",
    "spec_for",
    "opaque_reason",
    "is_depthwise_grouped",
    "conv_groups",
    "grouped_index",
    "group_outputs",
    "why_opaque",
    "couples_channels",
    "keeps_channel_axis",
    "weight_of",
    "weights_on",
    "axis_index",
    "per_channel",
    "width_of",
    "resized_config",
    "plan_overrides",
]


@dataclasses.dataclass(frozen=True)
class WeightAxis:
    """The channels of a group along one axis of one weight.

    Attributes:
        attr: attribute path from the layer to the weight, dotted for weights of
            sub-layers (``"cell.kernel"``, ``"_query_dense.bias"``).
        axis: the axis.
        blocks: the axis holds ``blocks`` consecutive copies of the channels: an
            LSTM kernel stacks its 4 gates, so unit ``j`` is at ``j, u+j, 2u+j, 3u+j``.
    """

    attr: str
    axis: int
    blocks: int = 1
    groups: int = 1
    """A grouped convolution's input axis (``groups > 1``): it holds a channel's
    position within its conv group, and group ``b``'s output channels are the
    ``b``-th of ``groups`` runs along the weight's last axis."""


def _axes(**axes: int) -> tuple[WeightAxis, ...]:
    return tuple(WeightAxis(attr, axis) for attr, axis in axes.items())


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """Channel semantics of one layer type.

    Attributes:
        role: see the module docstring.
        out_axes: where a producer's own channels (output channels, recurrent
            units, attention heads) sit in its weights.
        in_axes: where a consumer's input channels sit.
        ch_axes: where a pass-through layer's channels sit.
        width_key: the config entry holding a producer's channel count.
        groups: a grouped convolution's groups: its input and its output channels
            are each split in ``groups`` equal runs, and a plan keeps as many
            channels of every run (see :attr:`ChannelGroup.blocks
            <tf_balancer.graph.layer_graph.ChannelGroup.blocks>`).
    """

    role: str
    out_axes: tuple[WeightAxis, ...] = ()
    in_axes: tuple[WeightAxis, ...] = ()
    ch_axes: tuple[WeightAxis, ...] = ()
    width_key: str | None = None
    groups: int = 1


_CONV = LayerSpec("producer", _axes(kernel=-1, bias=0), _axes(kernel=-2), width_key="filters")
_DENSE = dataclasses.replace(_CONV, width_key="units")
# A transposed convolution's kernel is (*window, filters, input channels).
_CONV_TRANSPOSE = LayerSpec(
    "producer", _axes(kernel=-2, bias=0), _axes(kernel=-1), width_key="filters"
)
_SEPARABLE = LayerSpec(
    "producer",
    _axes(pointwise_kernel=-1, bias=0),
    _axes(depthwise_kernel=-2, pointwise_kernel=-2),
    width_key="filters",
)
_DEPTHWISE = LayerSpec("passthrough", ch_axes=_axes(depthwise_kernel=-2, bias=0))
# Conv(filters=C, groups=C) on C channels is a depthwise conv written as a grouped one
# (ConvNeXt's blocks): its kernel is (*window, 1, C).
_GROUPED_DEPTHWISE = LayerSpec("passthrough", ch_axes=_axes(kernel=-1, bias=0))
_BATCHNORM = LayerSpec(
    "passthrough", ch_axes=_axes(gamma=0, beta=0, moving_mean=0, moving_variance=0)
)
_PASS = LayerSpec("passthrough")


def _recurrent(gates: int) -> LayerSpec:
    """A recurrent layer's units: gate-stacked columns of the input and recurrent
    kernels and the bias, and the recurrent kernel's rows (unit ``j``'s state)."""
    return LayerSpec(
        "producer",
        out_axes=(
            WeightAxis("cell.kernel", -1, gates),
            WeightAxis("cell.recurrent_kernel", -1, gates),
            WeightAxis("cell.recurrent_kernel", 0),
            WeightAxis("cell.bias", -1, gates),
        ),
        in_axes=(WeightAxis("cell.kernel", 0),),
        width_key="units",
    )


RECURRENT_GATES = {"SimpleRNN": 1, "GRU": 3, "LSTM": 4}
"""Gates (stacked kernel blocks) of each recurrent layer type."""

_ATTENTION = LayerSpec(
    "attention",
    out_axes=(
        *(WeightAxis(f"_{p}_dense.kernel", 1) for p in ("query", "key", "value")),
        *(WeightAxis(f"_{p}_dense.bias", 0) for p in ("query", "key", "value")),
        WeightAxis("_output_dense.kernel", 0),
    ),
    width_key="num_heads",
)

_SPECS: dict[str, LayerSpec] = {
    "Conv1D": _CONV,
    "Conv2D": _CONV,
    "Conv3D": _CONV,
    "Conv1DTranspose": _CONV_TRANSPOSE,
    "Conv2DTranspose": _CONV_TRANSPOSE,
    "Conv3DTranspose": _CONV_TRANSPOSE,
    "Dense": _DENSE,
    "SeparableConv1D": _SEPARABLE,
    "SeparableConv2D": _SEPARABLE,
    "DepthwiseConv1D": _DEPTHWISE,
    "DepthwiseConv2D": _DEPTHWISE,
    "BatchNormalization": _BATCHNORM,
    "Embedding": LayerSpec("producer", _axes(embeddings=-1), width_key="output_dim"),
    "MultiHeadAttention": _ATTENTION,
    "PReLU": LayerSpec("passthrough", ch_axes=_axes(alpha=-1)),  # one slope per channel
    **{name: _recurrent(gates) for name, gates in RECURRENT_GATES.items()},
    "Flatten": LayerSpec("flatten"),
    "Concatenate": LayerSpec("concat"),
    **{
        name: LayerSpec("merge")
        for name in ("Add", "Multiply", "Subtract", "Average", "Maximum", "Minimum")
    },
    # Dot-product attention over [query, value(, key)]: query and key channels meet in a
    # sum (a masked channel adds 0), each output channel is a value channel: one group.
    "Attention": LayerSpec("merge"),
    **{
        name: LayerSpec("reduce")
        for name in (
            "GlobalAveragePooling1D",
            "GlobalAveragePooling2D",
            "GlobalAveragePooling3D",
            "GlobalMaxPooling1D",
            "GlobalMaxPooling2D",
            "GlobalMaxPooling3D",
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
            "MaxPooling3D",
            "AveragePooling1D",
            "AveragePooling2D",
            "AveragePooling3D",
            "ZeroPadding1D",
            "ZeroPadding2D",
            "ZeroPadding3D",
            "Cropping1D",
            "Cropping2D",
            "Cropping3D",
            "UpSampling1D",
            "UpSampling2D",
            "UpSampling3D",
            "SpatialDropout3D",
            "Reshape",  # only when it keeps the channel axis: see opaque_reason
            "Rescaling",  # a scalar scale and offset
            "Identity",
            "RepeatVector",  # (n, C) -> (n, T, C)
            "Resizing",  # spatial interpolation, channel by channel
            "CenterCrop",
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
    if config.get("groups", 1) != 1 and type(layer).__name__ not in _GROUPABLE:
        return "grouped convolution"
    if config.get("depth_multiplier", 1) != 1:
        return "depth_multiplier != 1"
    name = type(layer).__name__
    if couples_channels(layer) and (_SPECS[name].role != "producer" or name in RECURRENT_GATES):
        return f"activation {config['activation']!r} couples channels"
    if config.get("stateful"):
        return "stateful recurrent layer (its state is sized by its units)"
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


_CROSS_CHANNEL = {
    "LayerNormalization": "normalises across channels",
    "GroupNormalization": "normalises across channels",
    "UnitNormalization": "normalises across channels",
    "Softmax": "couples channels",
}


_GROUPABLE = ("Conv1D", "Conv2D", "Conv3D")


def conv_groups(layer: Any) -> int:
    """The groups of a grouped ``Conv1D/2D/3D`` (1 for other layers, and for a
    grouped conv that is a depthwise one: :func:`is_depthwise_grouped`)."""
    if type(layer).__name__ not in _GROUPABLE or is_depthwise_grouped(layer):
        return 1
    return int(layer.groups)


def is_depthwise_grouped(layer: Any) -> bool:
    """True for a ``Conv1D/2D/3D`` whose groups each hold one input and one output
    channel (``filters == groups ==`` input channels): a depthwise conv.

    Example:
        >>> conv = keras.layers.Conv2D(8, 3, groups=8)
        >>> conv.build((None, 16, 16, 8))
        >>> is_depthwise_grouped(conv)
        True
    """
    if type(layer).__name__ not in _GROUPABLE or getattr(layer, "groups", 1) == 1:
        return False  # (attributes: get_config is slow, and this runs for every call)
    kernel = getattr(layer, "kernel", None)
    return layer.filters == layer.groups and kernel is not None and int(kernel.shape[-2]) == 1


def why_opaque(layer: Any, rank: int | None = None) -> str:
    """Why the groups a layer touches cannot be pruned, as a phrase for messages."""
    name = type(layer).__name__
    if isinstance(layer, KerasOp):
        return f"an operation ({layer.class_name}) tf_balancer cannot prune through"
    if name in _CROSS_CHANNEL:
        return f"which {_CROSS_CHANNEL[name]}"
    reason = opaque_reason(layer, rank) if name in _SPECS else None
    if reason:
        return f"which tf_balancer cannot prune through: {reason}"
    return "which tf_balancer does not understand"


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


# Keras 3 operations that act on each element alone and stay finite where a masked
# channel is 0. With one tensor argument (the others scalars) they pass channels
# through; the binary ones with two tensors merge like the Add/Multiply layers.
_ELEMENTWISE_OPS = frozenset(
    {
        *("Add", "Subtract", "Multiply", "Divide", "TrueDivide", "Maximum", "Minimum"),
        *("Negative", "Absolute", "Abs", "Square", "Sqrt", "Clip", "Exp", "Tanh", "Cast"),
        *("Relu", "Relu6", "Sigmoid", "Softplus", "Softsign", "Silu", "LogSigmoid"),
        *("ReLU", "Mish"),  # keras.activations.relu (any slope, cap, threshold) and mish
        *("LeakyRelu", "HardSigmoid", "HardSilu", "Elu", "Selu", "Gelu", "Celu", "HardTanh"),
        *("Erf", "Sign", "Round", "Floor", "Ceil", "Sin", "Cos"),
    }
)
_TENSOR_FIRST_OPS = frozenset({"Divide", "TrueDivide"})  # x / c, never c / x
_MERGE_OPS = frozenset({"Add", "Subtract", "Multiply", "Maximum", "Minimum"})


def _op_spec(op: OpArguments, rank: int | None) -> LayerSpec:
    """An element-wise operation passes channels through or merges them; a reduction
    over other axes than the last (``keras.ops.mean(x, axis=(1, 2))``) keeps them."""
    if not op.scalars:
        return LayerSpec("opaque")
    if op.op in REDUCTIONS and op.tensors == 1 and rank:  # over axes other than the channels'
        axes = [op.axis] if isinstance(op.axis, int) else list(op.axis or ())
        keeps_channels = axes and (rank - 1) not in {int(a) % rank for a in axes}
        return LayerSpec("reduce") if keeps_channels else LayerSpec("opaque")
    if op.op not in _ELEMENTWISE_OPS:
        return LayerSpec("opaque")
    if op.tensors == 1 and (op.tensor_first or op.op not in _TENSOR_FIRST_OPS):
        return _PASS
    if op.tensors == 2 and op.op in _MERGE_OPS:
        return LayerSpec("merge")
    return LayerSpec("opaque")


def spec_for(layer: Any, rank: int | None = None) -> LayerSpec:
    """The :class:`LayerSpec` of a layer (``opaque`` for unknown types).

    ``TimeDistributed`` and ``Bidirectional`` take their wrapped layer's spec,
    with weight paths through the wrapper (both directions of a ``Bidirectional``
    keep the same units). Operations (Keras 3's :class:`~tf_balancer._compat.KerasOp`,
    tf_keras' ``TFOpLambda``) that work element by element pass channels through
    (``x + 3.0``) or merge them (``x * y``).
    """
    arguments = op_arguments(layer)  # every KerasOp has them
    if arguments is not None:
        return _op_spec(arguments, rank)
    if is_layer(layer, "InputLayer"):
        return LayerSpec("input")
    wrapped = _wrapped_layers(layer)
    if wrapped:
        return _wrapper_spec(layer, wrapped, rank)
    spec = _SPECS.get(type(layer).__name__)
    if spec is None or opaque_reason(layer, rank) is not None:
        return LayerSpec("opaque")
    if is_depthwise_grouped(layer):
        spec = _GROUPED_DEPTHWISE
    elif conv_groups(layer) > 1:
        groups = conv_groups(layer)
        spec = dataclasses.replace(
            spec, in_axes=(WeightAxis("kernel", -2, groups=groups),), groups=groups
        )
    if type(layer).__name__ == "PReLU" and _channels_share_slope(layer, rank):
        return _PASS  # one slope for every channel: nothing to slice
    return _with_layer_attributes(spec, layer)


def _channels_share_slope(layer: Any, rank: int | None) -> bool:
    shared = layer.get_config().get("shared_axes") or ()
    shared = [shared] if isinstance(shared, int) else list(shared)
    return bool(rank) and any(a == -1 or a == rank - 1 for a in shared)


_WRAPPERS = {"TimeDistributed": ("layer",), "Bidirectional": ("forward_layer", "backward_layer")}


def _wrapped_layers(layer: Any) -> dict[str, Any]:
    """Attribute -> wrapped layer, for the wrappers tf_balancer understands."""
    attrs = _WRAPPERS.get(type(layer).__name__, ())
    return {a: getattr(layer, a) for a in attrs if getattr(layer, a, None) is not None}


def _wrapper_spec(layer: Any, wrapped: dict[str, Any], rank: int | None) -> LayerSpec:
    bidirectional = type(layer).__name__ == "Bidirectional"
    specs = {
        attr: spec_for(inner, None if rank is None else rank - (0 if bidirectional else 1))
        for attr, inner in wrapped.items()
    }
    first = next(iter(specs.values()))
    if first.role != "producer" or first.groups > 1 or any(s != first for s in specs.values()):
        return LayerSpec("opaque")
    if bidirectional and type(wrapped["forward_layer"]).__name__ not in RECURRENT_GATES:
        return LayerSpec("opaque")

    def prefixed(field: str) -> tuple[WeightAxis, ...]:
        return tuple(
            dataclasses.replace(a, attr=f"{attr}.{a.attr}")
            for attr, spec in specs.items()
            for a in getattr(spec, field)
        )

    return LayerSpec(
        "producer", prefixed("out_axes"), prefixed("in_axes"), prefixed("ch_axes"), first.width_key
    )


def _with_layer_attributes(spec: LayerSpec, layer: Any) -> LayerSpec:
    """``spec`` with weight attributes named as ``layer``'s Keras names them."""

    def renamed(axes: tuple[WeightAxis, ...]) -> tuple[WeightAxis, ...]:
        return tuple(
            a if "." in a.attr else dataclasses.replace(a, attr=weight_attribute(layer, a.attr))
            for a in axes
        )

    return dataclasses.replace(
        spec,
        out_axes=renamed(spec.out_axes),
        in_axes=renamed(spec.in_axes),
        ch_axes=renamed(spec.ch_axes),
    )


def weight_of(layer: Any, attr: str) -> Any:
    """The weight at a (dotted) attribute path of ``layer``, or None."""
    target = layer
    for part in attr.split("."):
        target = getattr(target, part, None)
        if target is None:
            return None
    return target


def weights_on(layer: Any, axes: tuple[WeightAxis, ...]) -> list[tuple[WeightAxis, Any]]:
    """``(axis with a non-negative axis, weight)`` for each of ``axes`` the layer has."""
    found = []
    for spec_axis in axes:
        weight = weight_of(layer, spec_axis.attr)
        if weight is not None:
            axis = spec_axis.axis % len(weight.shape)
            found.append((dataclasses.replace(spec_axis, axis=axis), weight))
    return found


def axis_index(channels: Any, length: int, blocks: int = 1) -> np.ndarray:
    """Positions of ``channels`` on an axis of ``length`` holding ``blocks`` copies.

    Example:
        >>> axis_index([1], 8, blocks=4).tolist()   # unit 1 of an LSTM(2) kernel
        [1, 3, 5, 7]
    """
    channels = np.asarray(channels, dtype=np.int64)
    step = length // blocks
    return np.concatenate([b * step + channels for b in range(blocks)])


def grouped_index(channels: Any, axis: WeightAxis, shape: tuple) -> dict[int, np.ndarray]:
    """Where input ``channels`` of a grouped convolution sit in its kernel, per conv
    group: ``{group b: positions on axis.axis}``; group ``b``'s output channels are
    the ``b``-th run of ``shape[-1] / axis.groups`` along the last axis.

    Example:
        >>> axis = WeightAxis("kernel", 2, groups=2)   # kernel (3, 3, 4, 8): 8 inputs
        >>> {b: p.tolist() for b, p in grouped_index([1, 5, 6], axis, (3, 3, 4, 8)).items()}
        {0: [1], 1: [1, 2]}
    """
    per = int(shape[axis.axis])
    found: dict[int, list[int]] = {}
    for c in np.asarray(channels, dtype=np.int64).tolist():
        found.setdefault(c // per, []).append(c % per)
    return {b: np.asarray(p, dtype=np.int64) for b, p in sorted(found.items())}


def group_outputs(block: int, axis: WeightAxis, shape: tuple) -> slice:
    """The last-axis slice of a grouped convolution's kernel that conv group
    ``block`` writes."""
    run = int(shape[-1]) // axis.groups
    return slice(block * run, (block + 1) * run)


def per_channel(values: Any, blocks: int = 1, reduce: Any = np.sum) -> Any:
    """Fold one value per axis position into one per channel (``reduce`` over blocks)."""
    return reduce(np.reshape(values, (blocks, -1)), axis=0)


def width_of(layer: Any) -> int | None:
    """A producer's channel count from its config (the wrapped layer's for wrappers)."""
    wrapped = _wrapped_layers(layer)
    if wrapped:
        return width_of(next(iter(wrapped.values())))
    key = (_SPECS.get(type(layer).__name__) or LayerSpec("opaque")).width_key
    return int(layer.get_config()[key]) if key else None


def plan_overrides(layer: Any, role: str, own: int, out: int) -> dict[str, Any]:
    """Config overrides of a layer call of ``role`` left with ``own`` channels of its
    own (output channels, units, heads) and ``out`` output channels: producers and
    attention are resized, a channel-keeping ``Reshape`` gets the new last axis,
    everything else keeps its config."""
    if role in ("producer", "attention"):
        return resized_config(layer, own)
    if role == "passthrough" and type(layer).__name__ == "Reshape":
        return resized_config(layer, out)
    if role == "passthrough" and is_depthwise_grouped(layer):
        return {"filters": out, "groups": out}
    return {}


def resized_config(layer: Any, width: int) -> dict[str, Any]:
    """Config overrides that give ``layer`` ``width`` channels (its units, filters,
    heads, or a channel-keeping ``Reshape``'s last axis); wrappers resize the
    layers they wrap."""
    config = layer.get_config()
    wrapped = _wrapped_layers(layer)
    if wrapped:
        overrides = {}
        for key in ("layer", "backward_layer"):
            if isinstance(config.get(key), dict):
                inner = copy.deepcopy(config[key])
                inner["config"][_SPECS[inner["class_name"]].width_key] = width
                inner.pop("build_config", None)  # built for the old input width
                overrides[key] = inner
        return overrides
    if type(layer).__name__ == "Reshape":
        return {"target_shape": (*tuple(config["target_shape"])[:-1], width)}
    key = _SPECS[type(layer).__name__].width_key
    return {key: width} if key else {}

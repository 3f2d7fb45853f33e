"""Apply an allocation as channel masks: pruned channels become exact zeros.

For every pruned channel of a group this zeroes the producers' output-side
weights (kernel columns, bias), the per-channel weights of the layers in
between (BatchNorm gamma/beta, depthwise kernels) and the consumers'
input-side weights (kernel rows, at each flattened position for a Dense after
Flatten). Zeroing the consumers' inputs is what makes the masked model compute
exactly what the compacted model (``prune_channels``) computes.

Example:
    >>> masked = masked_copy(graph, plan)      # the user's model is untouched
    >>> apply_masks(graph, plan)                # doctest: +SKIP  (in place, for training)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import tensorflow as tf

from tf_balancer.graph.layer_graph import LayerGraph
from tf_balancer.graph.layer_specs import (
    WeightAxis,
    axis_index,
    group_outputs,
    grouped_index,
    spec_for,
    weight_of,
    weights_on,
)
from tf_balancer.graph.walk import clone_flat

__all__ = ["channel_masks", "apply_masks", "masked_copy", "is_masked"]

_ROLE_AXES = {"producer": "out_axes", "passthrough": "ch_axes", "consumer": "in_axes"}


def channel_masks(graph: LayerGraph, plan: Any) -> dict[tuple[str, str], np.ndarray]:
    """``(node name, weight attribute) -> 0/1 mask`` for every weight the plan touches."""
    masks: dict[tuple[str, str], np.ndarray] = {}
    for gid in plan.keep:
        pruned = plan.pruned(gid)
        if not len(pruned):
            continue
        for member in graph.groups[gid].members:
            node = graph.nodes[member.node]
            spec = spec_for(node.layer, len(node.input_shapes[0]))
            for axis, weight in weights_on(node.layer, getattr(spec, _ROLE_AXES[member.role])):
                mask = masks.setdefault(
                    (member.node, axis.attr),
                    np.ones(weight.shape, dtype=tf.as_dtype(weight.dtype).as_numpy_dtype),
                )
                _zero(mask, axis, member.indices(pruned))
    return masks


def _zero(mask: np.ndarray, axis: WeightAxis, channels: np.ndarray) -> None:
    """Zero ``channels`` along ``axis`` of ``mask``: a slice of the axis, or for a grouped
    convolution's input axis, each channel's position in the outputs of its group."""
    index: list[Any] = [slice(None)] * mask.ndim
    if axis.groups == 1:
        index[axis.axis] = axis_index(channels, mask.shape[axis.axis], axis.blocks)
        mask[tuple(index)] = 0
        return
    for block, positions in grouped_index(channels, axis, mask.shape).items():
        index[axis.axis], index[-1] = positions, group_outputs(block, axis, mask.shape)
        mask[tuple(index)] = 0


def apply_masks(
    graph: LayerGraph,
    plan: Any,
    layers: Mapping[str, Any] | None = None,
    masks: Mapping[tuple[str, str], np.ndarray] | None = None,
) -> None:
    """Multiply the weights by the plan's masks, in place.

    Args:
        graph: the layer graph the plan was made for.
        plan: an :class:`~tf_balancer.attention.balance.Allocation`.
        layers: node name -> layer to mask; defaults to the graph's own layers
            (i.e. the model being trained).
        masks: precomputed :func:`channel_masks` (recomputed when omitted).
    """
    masks = channel_masks(graph, plan) if masks is None else masks
    for (name, attr), mask in masks.items():
        layer = layers[name] if layers is not None else graph.nodes[name].layer
        weight = weight_of(layer, attr)
        weight.assign(weight.numpy() * mask)


def masked_copy(
    graph: LayerGraph, plan: Any, masks: Mapping[tuple[str, str], np.ndarray] | None = None
) -> Any:
    """A masked, independent copy of the graph's model (nested models flattened);
    ``masks`` as in :func:`apply_masks`."""
    model, layers = clone_flat(graph.walk)
    apply_masks(graph, plan, layers, masks)
    return model


def is_masked(graph: LayerGraph, masks: Mapping[tuple[str, str], np.ndarray]) -> bool:
    """Whether the graph's own weights are zero wherever ``masks`` is: masking them
    would change nothing (a model ``BalanceCallback`` trained masked, for example)."""
    for (name, attr), mask in masks.items():
        values = weight_of(graph.nodes[name].layer, attr).numpy()
        if np.any(values[mask == 0]):
            return False
    return True

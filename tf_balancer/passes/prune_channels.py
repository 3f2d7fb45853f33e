"""``prune_channels``: physically remove pruned channels (structured compaction).

Every member of each pruned group is rewritten: producers lose output channels
(``filters``/``units`` shrink; kernel columns and biases are sliced), per-channel
layers lose those channels (BatchNorm statistics, depthwise kernels), and
consumers lose the matching input rows (at every spatial position for a Dense
after Flatten; at the right offset after a Concatenate). The result is a fresh
tf_keras model whose outputs equal the **masked** model's, where pruned
channels are zero (see :mod:`tf_balancer.attention.masks`).

The channels come from ``ctx.plan`` (an Allocation) or, without a plan, from
the model itself: a channel whose producers' output weights and consumers'
input weights are all zero (what masking during training leaves) is removed.

Example:
    >>> result = PruneChannels().run(model, graph, PassContext(plan=plan))  # doctest: +SKIP
    >>> result.model.count_params() < model.count_params()                   # doctest: +SKIP
    True
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tf_balancer.attention.balance import KeepPlan
from tf_balancer.attention.masks import channel_masks, is_masked, masked_copy
from tf_balancer.graph.layer_graph import LayerGraph, Layout
from tf_balancer.graph.layer_specs import (
    WeightAxis,
    axis_index,
    group_outputs,
    grouped_index,
    per_channel,
    plan_overrides,
    spec_for,
    weights_on,
)
from tf_balancer.graph.walk import clone_layer, rebuild, set_layer_weights
from tf_balancer.passes.base import GraphPass, PassContext, PassResult, register_pass

__all__ = ["PruneChannels", "plan_from_masks"]


def _zero_along(weight: Any, axis: int) -> np.ndarray:
    array = np.asarray(weight)
    axis %= array.ndim
    return np.all(array == 0, axis=tuple(i for i in range(array.ndim) if i != axis))


def plan_from_masks(graph: LayerGraph) -> KeepPlan:
    """Channels already masked: producers' outputs and consumers' inputs all zero."""
    keep, sizes = {}, {}
    for group in graph.prunable_groups:
        dead = np.ones(group.size, dtype=bool)
        for member in group.members:
            if member.role == "passthrough":
                continue
            node = graph.nodes[member.node]
            spec = spec_for(node.layer, len(node.input_shapes[0]))
            axes = spec.out_axes if member.role == "producer" else spec.in_axes
            for axis, weight in weights_on(node.layer, axes):
                if axis.groups > 1:  # a grouped conv's inputs: its producers decide
                    continue
                zero = per_channel(_zero_along(weight, axis.axis), axis.blocks, np.all)
                at = member.indices(np.arange(group.size))
                dead &= zero[at].reshape(-1, group.size).all(0)
        keep[group.id], sizes[group.id] = np.flatnonzero(~dead), group.size
    return KeepPlan(keep, sizes)


def _kept_indices(layout: Layout | None, plan: Any, width: int) -> np.ndarray:
    """Indices along a tensor's channel/feature axis that survive ``plan``."""
    if layout is None:
        return np.arange(width)
    blocks = []
    for s in range(layout.spatial):
        for segment, offset in layout.with_offsets():
            kept = plan.keep.get(segment.group, np.arange(segment.size))
            blocks.append(s * layout.width + offset + np.asarray(kept, dtype=np.int64))
    return np.concatenate(blocks)


def _slice_weights(node: Any, plan: Any) -> tuple[list[np.ndarray], dict[str, Any]]:
    """The node's weights with the plan's channels removed, and its config overrides."""
    layer = node.layer
    spec = spec_for(layer, len(node.input_shapes[0]))
    keep_own = _own_kept(node, plan)
    keep_in = _kept_indices(node.in_layouts[0], plan, _width(node.input_shapes[0]))
    keep_out = _kept_indices(node.out_layout, plan, _width(node.output_shape))
    by_var: dict[int, list[tuple[WeightAxis, np.ndarray]]] = {}
    for axes, index in (
        (spec.out_axes, keep_own),
        (spec.in_axes, keep_in),
        (spec.ch_axes, keep_out),
    ):
        for axis, weight in weights_on(layer, axes):
            by_var.setdefault(id(weight), []).append((axis, index))
    arrays = []
    for weight in layer.weights:
        if not hasattr(weight, "numpy"):  # tf_keras lookup layers list a vocabulary handler
            continue
        array = weight.numpy()
        # a grouped conv's input axis is sliced per conv group, after its outputs are
        for axis, index in sorted(by_var.get(id(weight), ()), key=lambda item: item[0].groups):
            array = _take(array, axis, index)
        arrays.append(array)
    return arrays, plan_overrides(layer, spec.role, len(keep_own), len(keep_out))


def _take(array: np.ndarray, axis: WeightAxis, kept: np.ndarray) -> np.ndarray:
    """``array`` with only the ``kept`` channels along ``axis``. A grouped conv's
    input axis keeps, for each conv group, that group's kept inputs (as many in
    every group) in the columns of that group's outputs."""
    if axis.groups == 1:
        return np.take(array, axis_index(kept, array.shape[axis.axis], axis.blocks), axis=axis.axis)
    per_group = {b: p for b, p in grouped_index(kept, axis, array.shape).items()}
    parts = [
        np.take(array[..., group_outputs(b, axis, array.shape)], per_group[b], axis=axis.axis)
        for b in range(axis.groups)
    ]
    return np.concatenate(parts, axis=-1)


def _width(shape: tuple) -> int:
    """Channels of a tensor of ``shape`` as the layer graph counts them (a scalar or a
    vector such as ``tf.range(n)``'s has one)."""
    return int(shape[-1]) if len(shape) > 1 and shape[-1] is not None else 1


def _own_kept(node: Any, plan: Any) -> np.ndarray:
    """Kept channels of the node's own group (output channels, units or heads)."""
    if node.channel_layout is None:
        return np.arange(_width(node.output_shape))
    own = node.channel_layout.segments[0]
    return np.asarray(plan.keep.get(own.group, np.arange(own.size)), dtype=np.int64)


@register_pass("prune_channels")
class PruneChannels(GraphPass):
    """Remove the channels of ``ctx.plan`` (or already-masked channels) physically."""

    def _plan(self, graph: LayerGraph, ctx: PassContext) -> Any:
        return ctx.plan if ctx.plan is not None else plan_from_masks(graph)

    def reference(self, model: Any, graph: LayerGraph, ctx: PassContext) -> Any:
        """The masked model: ``model`` itself when its weights are masked already (as
        ``BalanceCallback`` leaves them; a copy would cost a rebuild: 2.7 s of ResNet50's
        end of training), else a masked copy."""
        plan = self._plan(graph, ctx)
        masks = channel_masks(graph, plan)
        return model if is_masked(graph, masks) else masked_copy(graph, plan, masks)

    def run(self, model: Any, graph: LayerGraph, ctx: PassContext) -> PassResult:
        plan = self._plan(graph, ctx)
        removed = {gid: len(plan.pruned(gid)) for gid in plan.keep if len(plan.pruned(gid))}
        if not removed:
            return PassResult(model, changed=False, message="no channel to remove")
        weights: dict[str, list[np.ndarray]] = {}
        new_layers: dict[str, Any] = {}
        shared: dict[int, Any] = {}  # a shared layer stays one layer (same channels per call)

        def make(call):
            if call.shared and id(call.layer) in shared:
                return shared[id(call.layer)]
            node = graph.nodes[call.name]
            sliced, overrides = _slice_weights(node, plan)
            new = shared[id(call.layer)] = clone_layer(call.layer, **overrides)
            if new is not call.layer:  # not a stateless op or a lookup layer used as it is
                weights[call.name], new_layers[call.name] = sliced, new
            return new

        new_model = rebuild(graph.walk, make, name=model.name)
        for name, layer in new_layers.items():
            set_layer_weights(layer, weights[name])
        channels = sum(removed.values())
        return PassResult(
            new_model,
            changed=True,
            message=f"removed {channels} channels from {len(removed)} groups",
            stats={"channels_removed": channels, "groups_pruned": len(removed)},
        )

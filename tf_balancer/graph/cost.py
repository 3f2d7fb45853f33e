"""Per-layer cost: FLOPs, parameters and activation memory, with or without a plan.

FLOPs follow TF's profiler conventions (a multiply-add counts 2; BiasAdd and
element-wise ops count one per element; FusedBatchNorm and ReLU count 0). Each
layer's FLOPs are split in two parts:

* the **core** - convolution / matmul / bias - computed analytically from the
  layer's shapes and channel counts, so it can be re-evaluated for any pruning
  plan (``keep``: group id -> channels kept);
* the **rest** - whatever else TF emits for the layer (pooling, merges, a
  ``swish``'s multiply, ...) - read per op from TF's registered FLOPs statistics
  on the traced graph, and scaled by the layer's kept fraction of channels.

At full width the total therefore equals the profiler's ``float_ops`` on the
same frozen graph; the tests also check that the analytic core agrees with the
profiler's numbers for the core ops.

Example:
    >>> from tf_balancer._compat import keras
    >>> inp = keras.Input((8, 8, 3))
    >>> model = keras.Model(inp, keras.layers.Conv2D(4, 3, name="c")(inp))
    >>> report = model_cost(LayerGraph.from_model(model), model=model)
    >>> report.layers["c"].flops  # 2*6*6*4*3*3*3 + 6*6*4 (bias)
    7920
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from tf_balancer.graph.layer_graph import LayerGraph, LayerNode, Layout
from tf_balancer.graph.layer_specs import spec_for
from tf_balancer.graph.trace import TracedGraph, op_flops, trace_keras

__all__ = ["LayerCost", "CostReport", "model_cost", "core_flops", "measured_layer_flops"]

_DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8, "int8": 1, "uint8": 1}


@dataclasses.dataclass(frozen=True)
class LayerCost:
    """Cost of one layer call at the report's batch size."""

    name: str
    flops: int
    params: int
    activation_bytes: int


@dataclasses.dataclass(frozen=True)
class CostReport:
    """Per-layer costs in topological order, plus totals."""

    layers: dict[str, LayerCost]
    batch_size: int

    @property
    def flops(self) -> int:
        return sum(c.flops for c in self.layers.values())

    @property
    def params(self) -> int:
        return sum(c.params for c in self.layers.values())

    @property
    def activation_bytes(self) -> int:
        return sum(c.activation_bytes for c in self.layers.values())


def kept_width(layout: Layout | None, keep: Mapping[int, int], full: int) -> int:
    """Channels (features, for flattened tensors) left in a tensor under ``keep``."""
    if layout is None:
        return full
    return layout.spatial * sum(keep.get(s.group, s.size) for s in layout.segments)


def core_flops(node: LayerNode, batch: int, cin: int, cout: int) -> int:
    """Analytic conv/matmul/bias FLOPs of a producer or depthwise layer, else 0."""
    config = node.layer.get_config()
    cls = node.class_name
    in_shape, out_shape = node.input_shapes[0], node.output_shape
    positions = batch * math.prod(int(d) for d in out_shape[1:-1])
    bias = positions * cout if config.get("use_bias", False) else 0
    if cls == "Dense":
        rows = batch * math.prod(int(d) for d in in_shape[1:-1])
        return 2 * rows * cin * cout + (rows * cout if config.get("use_bias") else 0)
    kernel = math.prod(config.get("kernel_size", (1,)))
    if cls in ("Conv1D", "Conv2D", "Conv3D"):
        return 2 * positions * kernel * cin * cout + bias
    if cls in ("SeparableConv1D", "SeparableConv2D"):
        return 2 * positions * kernel * cin + 2 * positions * cin * cout + bias
    if cls in ("DepthwiseConv1D", "DepthwiseConv2D"):
        return 2 * positions * kernel * cout + bias
    return 0


def measured_layer_flops(traced: TracedGraph) -> dict[str, int]:
    """Profiler FLOPs summed per layer via the trace's op -> layer map."""
    per_layer: dict[str, int] = {}
    for op_name, flops in op_flops(traced.graph).items():
        layer = traced.op_to_layer.get(op_name)
        if layer is not None and flops:
            per_layer[layer] = per_layer.get(layer, 0) + flops
    return per_layer


def _params(node: LayerNode, fin: float, fout: float) -> int:
    spec = spec_for(node.layer, len(node.input_shapes[0]) if node.input_shapes else None)
    total = node.layer.count_params()
    for axes, frac in ((spec.out_axes, fout), (spec.in_axes, fin), (spec.ch_axes, fout)):
        for attr in axes:
            weight = getattr(node.layer, attr, None)
            if weight is not None:
                size = int(np.prod(weight.shape))
                total -= size - round(size * frac)
    return total


def _node_cost(
    node: LayerNode, keep: Mapping[int, int], batch: int, measured: int, dtype_bytes: int
) -> LayerCost:
    full_in = int(node.input_shapes[0][-1]) if node.input_shapes else 1
    full_out = int(node.output_shape[-1]) if len(node.output_shape) > 1 else 1
    cin = kept_width(node.in_layouts[0] if node.in_layouts else None, keep, full_in)
    cout = kept_width(node.out_layout, keep, full_out)
    fin, fout = cin / max(full_in, 1), cout / max(full_out, 1)
    core_full = core_flops(node, batch, full_in, full_out)
    rest = max(measured - core_full, 0) * fout
    flops = core_flops(node, batch, cin, cout) + round(rest)
    elements = batch * math.prod(int(d) for d in node.output_shape[1:-1]) * cout
    return LayerCost(node.name, flops, _params(node, fin, fout), elements * dtype_bytes)


def model_cost(
    graph: LayerGraph,
    *,
    batch_size: int = 1,
    keep: Mapping[int, int] | None = None,
    measured: Mapping[str, int] | None = None,
    model: Any = None,
) -> CostReport:
    """Cost every layer of ``graph``, optionally under a plan ``keep``.

    Args:
        graph: the layer graph.
        batch_size: batch size the FLOPs and activation bytes are counted at.
        keep: group id -> kept channels; groups not listed stay whole.
        measured: per-layer profiler FLOPs at ``batch_size`` (from
            :func:`measured_layer_flops`); traced from ``model`` when omitted.
        model: the model ``graph`` was built from, needed only to trace.

    Returns:
        A :class:`CostReport`.
    """
    keep = keep or {}
    if measured is None:
        measured = measured_layer_flops(trace_keras(model, batch_size)) if model else {}
    layers = {}
    for node in graph.nodes.values():
        dtype = graph.walk.dtypes.get(_output_key(graph, node), "float32")
        layers[node.name] = _node_cost(
            node, keep, batch_size, measured.get(node.name, 0), _DTYPE_BYTES.get(dtype, 4)
        )
    return CostReport(layers, batch_size)


def _output_key(graph: LayerGraph, node: LayerNode) -> str:
    for call in graph.walk.calls:
        if call.name == node.name:
            return call.outputs[0]
    return ""

"""Per-layer cost: FLOPs, parameters and activation memory, with or without a plan.

FLOPs follow TF's profiler conventions (a multiply-add counts 2; BiasAdd and
element-wise ops count one per element; ReLU counts 0), except that inference
BatchNorm counts its scale-and-shift, 2 per element, where the profiler says 0
(:func:`~tf_balancer.graph.trace.op_flops`). Each
layer's FLOPs are split in two parts:

* the **core** - convolution / matmul / bias - computed analytically from the
  layer's shapes and channel counts, so it can be re-evaluated for any pruning
  plan (``keep``: group id -> channels kept);
* the **rest** - whatever else TF emits for the layer (pooling, merges, a
  ``swish``'s multiply, ...) - read per op from TF's registered FLOPs statistics
  on the traced graph, and scaled by the layer's kept fraction of channels.

At full width the total therefore equals the profiler's ``float_ops`` on the
same frozen graph plus 2 per BatchNorm output element; the tests also check
that the analytic core agrees with the profiler's numbers for the core ops.

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

from tf_balancer.graph.layer_graph import LayerGraph, LayerNode
from tf_balancer.graph.layer_specs import (
    RECURRENT_GATES,
    is_depthwise_grouped,
    spec_for,
    weights_on,
    width_of,
)
from tf_balancer.graph.trace import TracedGraph, op_flops, trace_keras

__all__ = [
    "LayerCost",
    "CostReport",
    "PlanCoster",
    "QuadraticCost",
    "COST_METRICS",
    "model_cost",
    "core_flops",
    "flops_source",
    "measured_layer_flops",
]

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


def core_coefficients(node: LayerNode, batch: int) -> tuple[float, float, float, float]:
    """``(a, b, c, e)`` with core FLOPs ``a*cin*cout + b*cin + c*cout + e*cout**2``
    (all 0 if the layer has no core)."""
    layer = node.layer
    wrapped = _wrapped(layer)
    if wrapped is not layer and type(layer).__name__ == "Bidirectional":
        return _bidirectional_coefficients(node, wrapped, batch)
    config = wrapped.get_config()
    cls = type(wrapped).__name__
    in_shape, out_shape = node.input_shapes[0], node.output_shape
    positions = batch * math.prod(int(d) for d in out_shape[1:-1])
    bias = positions if config.get("use_bias", False) else 0
    kernel = math.prod(config.get("kernel_size", (1,)))
    if cls in RECURRENT_GATES:
        return _recurrent_coefficients(cls, config, batch * int(in_shape[1]))
    if cls in CONV_RECURRENT:
        return _conv_lstm_coefficients(config, in_shape, out_shape, batch)
    if cls == "Dense":
        rows = batch * math.prod(int(d) for d in in_shape[1:-1])
        return 2 * rows, 0, rows if config.get("use_bias") else 0, 0
    if cls in ("Conv1D", "Conv2D", "Conv3D"):
        if is_depthwise_grouped(wrapped):  # one input channel per output channel
            return 0, 0, 2 * positions * kernel + bias, 0
        # each output channel reads the cin / groups channels of its group
        return 2 * positions * kernel / config.get("groups", 1), 0, bias, 0
    if cls in ("Conv1DTranspose", "Conv2DTranspose", "Conv3DTranspose"):
        # every input position scatters a window of products into the output
        inputs = batch * math.prod(int(d) for d in in_shape[1:-1])
        return 2 * inputs * kernel, 0, bias, 0
    if cls in ("SeparableConv1D", "SeparableConv2D"):
        return 2 * positions, 2 * positions * kernel, bias, 0
    if cls in ("DepthwiseConv1D", "DepthwiseConv2D"):
        return 0, 0, 2 * positions * kernel + bias, 0
    return 0, 0, 0, 0


_GATE_OPS = {"SimpleRNN": 1, "GRU": 8, "LSTM": 8}
"""Element-wise adds and multiplies per unit per step outside the matmuls and bias:
SimpleRNN adds its two products; an LSTM adds them (4 gates) and updates
``c = f*c + i*g`` (3) and ``h = o*tanh(c)`` (1); a GRU adds z and r (2),
``x_h + r*h_r`` (2) and ``h = z*h + (1-z)*hh`` (4). Activations count 0."""


def _recurrent_coefficients(cls: str, config: dict, steps: int) -> tuple[float, ...]:
    """One recurrent layer over ``steps`` = batch x time steps, from its units ``u``:
    ``2*g*cin*u + 2*g*u*u`` multiply-adds, ``g*u`` bias adds (twice for a GRU with
    ``reset_after``) and the gate arithmetic, per step. TF's profiler cannot see
    inside the ``while`` loop that runs the steps, so this count is analytic."""
    gates = RECURRENT_GATES[cls]
    bias = gates * (2 if config.get("reset_after") else 1) if config.get("use_bias", True) else 0
    return 2 * gates * steps, 0, (bias + _GATE_OPS[cls]) * steps, 2 * gates * steps


CONV_RECURRENT = ("ConvLSTM1D", "ConvLSTM2D", "ConvLSTM3D")


def _conv_lstm_coefficients(config: dict, in_shape: tuple, out_shape: tuple, batch: int):
    """A ``ConvLSTM`` over ``T`` steps: per step and output position, an input conv
    (``cin -> 4*u``) and a recurrent conv (``u -> 4*u``, same padding) of the
    kernel's window, the input conv's bias and an LSTM's gate arithmetic."""
    steps = int(in_shape[1])
    spatial = out_shape[2:-1] if config.get("return_sequences") else out_shape[1:-1]
    positions = batch * steps * math.prod(int(d) for d in spatial)
    kernel = math.prod(config.get("kernel_size", (1,)))
    bias = 4 if config.get("use_bias", True) else 0
    return 8 * kernel * positions, 0, (bias + _GATE_OPS["LSTM"]) * positions, 8 * kernel * positions


def _bidirectional_coefficients(node: LayerNode, inner: Any, batch: int) -> tuple[float, ...]:
    """Both directions of a ``Bidirectional`` layer; with ``merge_mode="concat"`` its
    output holds the units twice, so ``cout`` counts them twice."""
    copies = int(node.output_shape[-1]) // width_of(inner)
    config = inner.get_config()
    a, b, c, e = _recurrent_coefficients(
        type(inner).__name__, config, batch * int(node.input_shapes[0][1])
    )
    return 2 * a / copies, 2 * b, 2 * c / copies, 2 * e / copies**2


def _wrapped(layer: Any) -> Any:
    """The layer a ``TimeDistributed``/``Bidirectional`` wraps (its forward layer)."""
    name = type(layer).__name__
    if name == "TimeDistributed":
        return layer.layer
    if name == "Bidirectional":
        return layer.forward_layer
    return layer


def flops_source(node: LayerNode) -> str:
    """``"analytic"`` where TF's profiler has no statistics for a layer's main ops
    (recurrent steps inside a ``while`` loop; ``Einsum`` in attention; a 3-D
    transposed convolution), counted by
    this module's formulas instead; ``"profiler"`` otherwise."""
    inner = _wrapped(node.layer)
    if type(inner).__name__ in CONV_RECURRENT:
        return "analytic"
    if type(inner).__name__ in RECURRENT_GATES and not inner.get_config().get("unroll"):
        return "analytic"
    if type(inner).__name__ in ("MultiHeadAttention", "EinsumDense", "Conv3DTranspose"):
        return "analytic"  # Einsum, Conv3DBackpropInputV2: no profiler statistics
    return "profiler"


def _fixed_flops(node: LayerNode, batch: int) -> int:
    """FLOPs of a layer that no plan changes: an attention layer's output bias (the
    rest of its ops are per head)."""
    if node.role != "attention" or not node.layer.get_config().get("use_bias", True):
        return 0
    return batch * math.prod(int(d) for d in node.output_shape[1:])


def core_flops(node: LayerNode, batch: int, cin: int, cout: int) -> int:
    """Analytic conv/matmul/recurrent/bias FLOPs of a producer or depthwise layer, else 0."""
    a, b, c, e = core_coefficients(node, batch)
    return round(a * cin * cout + b * cin + c * cout + e * cout * cout)


def _param_coefficients(node: LayerNode) -> tuple[int, int, int, int, int]:
    """``(p_io, p_i, p_o, p_oo, p_1)``: params =
    ``p_io*fin*fout + p_i*fin + p_o*fout + p_oo*fout**2 + p_1`` (``fout``: the
    node's own channels; a recurrent kernel has them on two axes)."""
    spec = spec_for(node.layer, len(node.input_shapes[0]) if node.input_shapes else None)
    coef = [0, 0, 0, 0, node.layer.count_params()]
    axes: dict[int, list[int]] = {}  # weight -> [input axes, own axes]
    weights = {}
    for field, slot in (("in_axes", 0), ("out_axes", 1), ("ch_axes", 1)):
        for _, weight in weights_on(node.layer, getattr(spec, field)):
            weights[id(weight)] = weight
            axes.setdefault(id(weight), [0, 0])[slot] += 1
    for key, (n_in, n_own) in axes.items():
        size = int(np.prod(weights[key].shape))
        coef[4] -= size
        coef[{(1, 1): 0, (1, 0): 1, (0, 1): 2, (0, 2): 3}[(min(n_in, 1), min(n_own, 2))]] += size
    return tuple(coef)


@dataclasses.dataclass(frozen=True)
class QuadraticCost:
    """``cost(k) = k @ matrix @ k + linear @ k + constant`` (``matrix`` symmetric, >= 0).

    ``k`` is one keep vector or a batch of them (rows).
    """

    matrix: np.ndarray
    linear: np.ndarray
    constant: float

    def __call__(self, k: np.ndarray) -> np.ndarray | float:
        k = np.asarray(k, dtype=np.float64)
        quad = np.einsum("...i,ij,...j->...", k, self.matrix, k)
        return quad + k @ self.linear + self.constant

    def gradient(self, k: np.ndarray) -> np.ndarray:
        """``d cost / d k`` at ``k``."""
        return 2.0 * self.matrix @ np.asarray(k, dtype=np.float64) + self.linear


class PlanCoster:
    """Vectorized cost of a model under many pruning plans (the balancer's inner loop).

    Each layer's FLOPs are ``a*cin*cout + b*cin + c*cout + e*cout**2 +
    rest*cout/full_out + d`` and its params ``p_io*fin*fout + p_i*fin + p_o*fout +
    p_oo*fout**2 + p_1``, where ``cin`` / ``cout`` (the layer's own channels:
    output channels, recurrent units or attention heads) are linear in the kept
    channels of each group. Evaluating a plan
    is a couple of matrix-vector products.

    Example:
        >>> coster = PlanCoster(graph, measured, batch_size=1)  # doctest: +SKIP
        >>> coster.total({3: 16}, "flops")                      # doctest: +SKIP
    """

    def __init__(self, graph: LayerGraph, measured: Mapping[str, int], batch_size: int = 1):
        self.graph = graph
        self.batch_size = batch_size
        self.names = list(graph.nodes)
        self.group_ids = sorted(graph.groups)
        self.sizes = np.array([graph.groups[g].size for g in self.group_ids], dtype=np.float64)
        index = {g: i for i, g in enumerate(self.group_ids)}
        n, m = len(self.names), len(self.group_ids)
        self.m_in, self.m_out, self.m_act = np.zeros((n, m)), np.zeros((n, m)), np.zeros((n, m))
        coef = np.zeros((n, 11))
        counted: set[int] = set()  # layers whose weights are counted (a shared layer once)
        for row, node in enumerate(graph.nodes.values()):
            layout_in = node.in_layouts[0] if node.in_layouts else None
            for matrix, layout in (
                (self.m_in, layout_in),
                (self.m_out, node.channel_layout),
                (self.m_act, node.out_layout),
            ):
                for segment in layout.segments if layout else ():
                    matrix[row, index[segment.group]] += layout.spatial
            full_in, full_out = self.m_in[row] @ self.sizes, self.m_out[row] @ self.sizes
            a, b, c, e = core_coefficients(node, batch_size)
            core = a * full_in * full_out + b * full_in + c * full_out + e * full_out**2
            fixed = _fixed_flops(node, batch_size)
            # A recurrent layer's steps run in a while loop the profiler sees once, partly:
            # its count is the analytic core alone.
            hidden = flops_source(node) == "analytic" and core > 0
            rest = 0 if hidden else max(measured.get(node.name, 0) - core - fixed, 0)
            coef[row, :6] = a, b, c, e, rest / max(full_out, 1), fixed
            if id(node.layer) not in counted:
                coef[row, 6:] = _param_coefficients(node)
                counted.add(id(node.layer))
            coef[row, 6:10] /= (
                max(full_in * full_out, 1),
                max(full_in, 1),
                max(full_out, 1),
                max(full_out**2, 1),
            )
        self.coef = coef
        self.latency: tuple[np.ndarray, np.ndarray] | None = None  # (t0, slope) per layer
        elements = [
            batch_size * math.prod(int(d) for d in node.output_shape[1:-1])
            for node in graph.nodes.values()
        ]
        self.elements = np.array(elements, dtype=np.float64)

    def keep_vector(self, keep: Mapping[int, int] | None) -> np.ndarray:
        vector = self.sizes.copy()
        for i, gid in enumerate(self.group_ids):
            if keep and gid in keep:
                vector[i] = keep[gid]
        return vector

    def rows(self, metric: str) -> tuple[np.ndarray, ...]:
        """``(pair, in, out, square, const)`` per layer: the layer's ``metric`` is
        ``pair*cin*cout + in*cin + out*cout + square*cout**2 + const``."""
        if metric not in COST_METRICS:
            raise ValueError(f"unknown cost metric {metric!r}; one of {sorted(COST_METRICS)}")
        return COST_METRICS[metric](self)

    def metric_per_layer(self, keep: Mapping[int, int] | None, metric: str) -> np.ndarray:
        """``metric`` of every layer under ``keep``."""
        return self.evaluate(self.rows(metric), keep)

    def evaluate(self, rows: tuple[np.ndarray, ...], keep: Mapping[int, int] | None) -> np.ndarray:
        """Per layer, the quantity whose :meth:`rows` are ``rows``, under ``keep``."""
        k = self.keep_vector(keep)
        cin, cout = self.m_in @ k, self.m_out @ k
        pair, lin_in, lin_out, square, const = rows
        return pair * cin * cout + lin_in * cin + lin_out * cout + square * cout**2 + const

    def per_layer(
        self, keep: Mapping[int, int] | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(flops, params, activation elements)`` per layer under ``keep``."""
        k = self.keep_vector(keep)
        flops = self.metric_per_layer(keep, "flops")
        params = self.metric_per_layer(keep, "params")
        return flops, params, self.elements * (self.m_act @ k)

    def report(self, keep: Mapping[int, int] | None = None) -> CostReport:
        """Per-layer :class:`CostReport` under ``keep`` (activation bytes by output dtype)."""
        flops, params, elements = self.per_layer(keep)
        walk = self.graph.walk
        dtypes = {call.name: walk.dtypes.get(call.outputs[0], "float32") for call in walk.calls}
        layers = {
            name: LayerCost(name, round(f), round(p), round(e) * _DTYPE_BYTES.get(dtypes[name], 4))
            for name, f, p, e in zip(self.names, flops, params, elements, strict=True)
        }
        return CostReport(layers, self.batch_size)

    def total(self, keep: Mapping[int, int] | None, metric: str = "flops") -> float:
        return float(np.sum(self.metric_per_layer(keep, metric)))

    def quadratic(self, metric: str, groups: list[int]) -> QuadraticCost:
        """The exact cost as a quadratic in the keep counts of ``groups`` (others whole).

        Every layer costs ``A*cin*cout + B*cin + C*cout + E*cout**2 + D`` with
        ``cin``/``cout`` linear in the keep vector, so the total is
        ``k @ Q @ k + q @ k + r``.

        Example:
            >>> cost = coster.quadratic("flops", [3, 5])    # doctest: +SKIP
            >>> cost(np.array([16, 8])) == coster.total({3: 16, 5: 8})  # doctest: +SKIP
            True
        """
        pair, lin_in, lin_out, square, const_rows = self.rows(metric)
        const = float(np.sum(const_rows))
        full_q = self.m_in.T @ (pair[:, None] * self.m_out)
        full_q = full_q + self.m_out.T @ (square[:, None] * self.m_out)
        full_lin = self.m_in.T @ lin_in + self.m_out.T @ lin_out
        index = {g: i for i, g in enumerate(self.group_ids)}
        chosen = np.array([index[g] for g in groups], dtype=int)
        fixed = np.setdiff1d(np.arange(len(self.group_ids)), chosen)
        f = self.sizes[fixed]
        q_cc = full_q[np.ix_(chosen, chosen)]
        lin = (
            full_lin[chosen]
            + full_q[np.ix_(chosen, fixed)] @ f
            + full_q[np.ix_(fixed, chosen)].T @ f
        )
        const += float(f @ full_q[np.ix_(fixed, fixed)] @ f + full_lin[fixed] @ f)
        return QuadraticCost((q_cc + q_cc.T) / 2.0, lin, const)

    def work_rows(self) -> tuple[np.ndarray, ...]:
        """What a layer's run time grows with, as :meth:`rows`: its FLOPs, or for a
        layer without FLOPs (ReLU, pooling by the profiler's count, reshapes) the
        elements it writes."""
        pair, lin_in, lin_out, square, const = self.rows("flops")
        has_flops = np.any(np.stack([pair, lin_in, lin_out, square, const]) != 0, axis=0)
        return pair, lin_in, np.where(has_flops, lin_out, self.elements), square, const


def _flops_rows(coster: PlanCoster) -> tuple[np.ndarray, ...]:
    a, b, c, e, rest, d = coster.coef[:, :6].T
    return a, b, c + rest, e, d


def _params_rows(coster: PlanCoster) -> tuple[np.ndarray, ...]:
    p_io, p_i, p_o, p_oo, p_1 = coster.coef[:, 6:].T
    return p_io, p_i, p_o, p_oo, p_1


def _latency_rows(coster: PlanCoster) -> tuple[np.ndarray, ...]:
    """Measured seconds: each layer's ``t0 + slope * work`` (:mod:`tf_balancer.graph.latency`)."""
    if coster.latency is None:
        raise ValueError("no latency table: build one with tf_balancer.graph.latency first")
    t0, slope = coster.latency
    pair, lin_in, lin_out, square, const = coster.work_rows()
    return slope * pair, slope * lin_in, slope * lin_out, slope * square, t0 + slope * const


COST_METRICS = {"flops": _flops_rows, "params": _params_rows, "latency": _latency_rows}
"""Cost metric name -> ``PlanCoster -> (pair, in, out, square, const)`` per layer."""


def measured_layer_flops(traced: TracedGraph) -> dict[str, int]:
    """Profiler FLOPs summed per layer via the trace's op -> layer map."""
    per_layer: dict[str, int] = {}
    for op_name, flops in op_flops(traced.graph).items():
        layer = traced.op_to_layer.get(op_name)
        if layer is not None and flops:
            per_layer[layer] = per_layer.get(layer, 0) + flops
    return per_layer


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
    if measured is None:
        measured = measured_layer_flops(trace_keras(model, batch_size)) if model else {}
    return PlanCoster(graph, measured, batch_size).report(keep)

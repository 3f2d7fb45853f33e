"""One-call model analysis (trace + layer graph + cost) and ``inspect``.

Example:
    >>> from tf_balancer._compat import keras
    >>> inp = keras.Input((8, 8, 3))
    >>> x = keras.layers.Conv2D(4, 3, name="conv")(inp)
    >>> model = keras.Model(inp, keras.layers.Dense(2, name="head")(keras.layers.Flatten()(x)))
    >>> result = inspect(model)
    >>> [row.name for row in result.rows]
    ['conv', 'flatten', 'head']
    >>> result.rows[0].prunable
    True
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from tf_balancer._compat import is_keras3_object, is_keras_model, load_model_file
from tf_balancer._quiet import quietly
from tf_balancer.errors import ConfigError, ModelLoadError
from tf_balancer.graph.cost import CostReport, PlanCoster, flops_source, measured_layer_flops
from tf_balancer.graph.layer_graph import LayerGraph
from tf_balancer.graph.trace import TracedGraph, constant_params, op_flops, trace, trace_keras
from tf_balancer.input_shapes import set_nominal_shapes

__all__ = [
    "ModelAnalysis",
    "analyze",
    "cost_stats",
    "InspectRow",
    "InspectResult",
    "inspect",
    "load_model",
]


@dataclasses.dataclass(frozen=True)
class ModelAnalysis:
    """Everything the balancer and the passes need to know about a model."""

    model: Any
    graph: LayerGraph
    traced: TracedGraph
    measured_flops: dict[str, int]
    coster: PlanCoster
    cost: CostReport

    def cost_under(self, keep: dict[int, int]) -> CostReport:
        """Costs with ``keep[group]`` channels left in each listed group."""
        return self.coster.report(keep)

    def stats(self) -> dict[str, int]:
        """Layers, params and FLOPs, as the optimizer's pass records give them."""
        return cost_stats(self.graph, self.cost)


def cost_stats(graph: LayerGraph, cost: CostReport) -> dict[str, int]:
    """``{"layers", "params", "flops"}`` of a layer graph and its cost."""
    return {"layers": len(graph.nodes), "params": cost.params, "flops": cost.flops}


@quietly
def analyze(
    model: Any, batch_size: int = 1, *, frozen: bool = True, input_shape: Any = None
) -> ModelAnalysis:
    """Trace, build the layer graph and cost a Keras model (not modified).

    The :class:`~tf_balancer.graph.cost.PlanCoster` built here is kept: it costs
    the full model and every plan evaluated later. ``frozen=False`` costs the
    same from an unfrozen trace, faster (``analysis.traced`` then reads variables).
    ``input_shape``: the sizes at which open input axes (``keras.Input((None,))``)
    are costed - a shape without the batch axis, or a list of them - remembered
    for the model (:func:`tf_balancer.input_shapes.set_nominal_shapes`).

    Example:
        >>> from tf_balancer._compat import keras
        >>> inp = keras.Input((None, 4))
        >>> model = keras.Model(inp, keras.layers.Dense(2)(inp))
        >>> analyze(model, input_shape=(10, 4)).cost.flops  # 10 steps x 4 x 2 x 2 + bias
        180
    """
    if input_shape is not None:
        set_nominal_shapes(model, input_shape)
    graph = LayerGraph.from_model(model)
    traced = trace_keras(model, batch_size, frozen=frozen)
    measured = measured_layer_flops(traced)
    coster = PlanCoster(graph, measured, batch_size)
    return ModelAnalysis(model, graph, traced, measured, coster, coster.report())


@dataclasses.dataclass(frozen=True)
class InspectRow:
    """One line of the ``inspect`` table."""

    name: str
    type: str
    output_shape: tuple
    params: int
    flops: int
    flops_pct: float
    activation_bytes: int
    group: int | None
    prunable: bool
    why_not: str
    flops_source: str = "profiler"
    """``"analytic"`` where TF's profiler has no statistics for the layer's main ops
    (recurrent steps, ``Einsum``): the FLOPs come from tf_balancer's formulas."""


@dataclasses.dataclass(frozen=True)
class InspectResult:
    """Structured result of :func:`inspect`."""

    source: str
    batch_size: int
    rows: tuple[InspectRow, ...]
    total_flops: int
    total_params: int
    total_activation_bytes: int
    prunable_groups: int
    groups: int

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def table(self) -> str:
        """A plain-text per-layer table with totals."""
        head = (
            "layer",
            "type",
            "output",
            "params",
            "FLOPs",
            "FLOPs%",
            "act. bytes",
            "group",
            "prunable",
        )
        lines = [head]
        for r in self.rows:
            shape = "x".join("?" if d is None else str(d) for d in r.output_shape[1:])
            group = "" if r.group is None else str(r.group)
            why = "yes" if r.prunable else (f"no: {r.why_not}" if r.why_not else "")
            lines.append(
                (
                    r.name,
                    r.type,
                    shape,
                    f"{r.params:,}",
                    f"{r.flops:,}" + ("*" if r.flops_source == "analytic" else ""),
                    f"{r.flops_pct:.1f}",
                    f"{r.activation_bytes:,}",
                    group,
                    why,
                )
            )
        lines.append(
            (
                "TOTAL",
                "",
                "",
                f"{self.total_params:,}",
                f"{self.total_flops:,}",
                "100.0",
                f"{self.total_activation_bytes:,}",
                f"{self.prunable_groups}/{self.groups}",
                "groups prunable",
            )
        )
        widths = [
            max(len(row[i]) for row in lines[:-1] + [lines[-1][:-1] + ("",)])
            for i in range(len(head))
        ]
        rendered = [
            "  ".join(
                c.ljust(w) if j < 3 or j == 8 else c.rjust(w)
                for j, (c, w) in enumerate(zip(row, widths, strict=True))
            ).rstrip()
            for row in lines
        ]
        rule = "-" * max(len(line) for line in rendered)
        table = [rendered[0], rule, *rendered[1:-1], rule, rendered[-1]]
        if any(r.flops_source == "analytic" for r in self.rows):
            table.append("* analytic FLOPs: TF's profiler does not count these ops")
        return "\n".join(table)


def load_model(path: str | os.PathLike) -> Any:
    """Load a Keras model file/SavedModel (tf_keras or Keras 3), or None for a plain SavedModel."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ModelLoadError(f"{path}: no such file or directory")
    is_file_model = os.path.isfile(path) and path.endswith((".keras", ".h5"))
    if not is_file_model and not os.path.exists(os.path.join(path, "keras_metadata.pb")):
        return None
    try:
        return load_model_file(path)
    except Exception as err:  # a Keras file can fail in many ways; report it in one line
        raise ModelLoadError(f"{path}: could not load the Keras model ({err})") from err


def _rows_from_analysis(analysis: ModelAnalysis) -> list[InspectRow]:
    total = max(analysis.cost.flops, 1)
    rows = []
    for node in analysis.graph.nodes.values():
        c = analysis.cost.layers[node.name]
        gid = analysis.graph.group_of(node.name)
        group = analysis.graph.groups.get(gid) if gid is not None else None
        owns = node.role in ("producer", "attention")
        prunable = bool(group and group.prunable and owns)
        # An opaque layer (not understood, or cutting across channels) says why too.
        explains = owns or node.role == "opaque"
        why = "" if prunable or not explains or group is None else "; ".join(group.reasons)
        rows.append(
            InspectRow(
                node.name,
                node.class_name,
                tuple(node.output_shape),
                c.params,
                c.flops,
                100.0 * c.flops / total,
                c.activation_bytes,
                gid,
                prunable,
                why,
                flops_source(node),
            )
        )
    return rows


def _rows_from_graph(traced: TracedGraph) -> list[InspectRow]:
    """Graph-level rows (one per name scope) for SavedModels without Keras metadata."""
    flops: dict[str, int] = {}
    types: dict[str, tuple[int, str]] = {}  # scope -> (FLOPs, type) of its costliest op
    for op, value in op_flops(traced.graph).items():
        scope = traced.op_to_layer.get(op)
        if scope is None:
            continue
        flops[scope] = flops.get(scope, 0) + value
        if scope not in types or value > types[scope][0]:
            types[scope] = (value, traced.graph.get_operation_by_name(op).type)
    total = max(sum(flops.values()), 1)
    why = "no Keras metadata (graph-level view)"
    return [
        InspectRow(s, types[s][1], (), 0, f, 100.0 * f / total, 0, None, False, why)
        for s, f in flops.items()
    ]


@quietly
def inspect(model_or_path: Any, batch_size: int = 1, *, input_shape: Any = None) -> InspectResult:
    """Analyse a tf_keras model or a SavedModel / Keras file path.

    Args:
        model_or_path: a tf_keras model, a SavedModel directory, or a ``.keras``
            / ``.h5`` file. Nothing is modified.
        batch_size: batch size FLOPs and activation bytes are counted at.
        input_shape: the sizes of open input axes (``keras.Input((None,))``) to
            count at: a shape without the batch axis, or a list of them.

    Returns:
        An :class:`InspectResult` (per-layer rows and totals).

    Raises:
        UnsupportedModelError: a Keras 3 or subclassed model.
        ModelLoadError: a missing path or a directory that is not a SavedModel.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    source = type(model_or_path).__name__
    model = model_or_path
    if isinstance(model_or_path, (str, os.PathLike)):
        source = os.fspath(model_or_path)
        model = load_model(model_or_path)
    if model is not None and (is_keras_model(model) or is_keras3_object(model)):
        analysis = analyze(model, batch_size, input_shape=input_shape)
        groups = [g for g in analysis.graph.groups.values() if g.nodes("producer")]
        return InspectResult(
            source,
            batch_size,
            tuple(_rows_from_analysis(analysis)),
            analysis.cost.flops,
            analysis.cost.params,
            analysis.cost.activation_bytes,
            len(analysis.graph.prunable_groups),
            len(groups),
        )
    traced = trace(model_or_path, batch_size, input_shape)
    rows = _rows_from_graph(traced)
    params = constant_params(traced.graph_def)
    return InspectResult(
        source, batch_size, tuple(rows), sum(r.flops for r in rows), params, 0, 0, 0
    )

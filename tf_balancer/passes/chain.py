"""Several rebuild passes in a row, on one walk: one model built at the end, not one per pass.

``strip_training_ops``, ``fold_batchnorm`` and ``fuse_activation`` each rebuild
the whole model, and the optimizer then analyses and verifies each result: on
EfficientNetB0 that was about 1.5 s of Keras rebuild, 0.7 s of tracing and 0.2 s
of verification per pass. A chain instead applies each pass's
:class:`~tf_balancer.passes._rebuild.Rewrite` to the walk the previous one left:

* a dropped call disappears and its consumers read its input;
* a replaced call gets its new layer, built (called on symbolic inputs, as a
  rebuild would) and with its new weights, so the next pass reads the layer as the rebuilt model
  would have it (``fuse_activation`` fuses into a conv ``fold_batchnorm`` just gave a bias).

Each pass's walk is costed the way :func:`~tf_balancer.analysis.analyze` costs a
model - :meth:`LayerGraph.from_walk <tf_balancer.graph.layer_graph.LayerGraph.from_walk>`
and a :class:`~tf_balancer.graph.cost.PlanCoster` - with the measured FLOPs of the
start model for the calls no pass changed, and those of a trace of the changed
calls alone (:func:`~tf_balancer.graph.trace.trace_walk`) for the others. At the
end one model is built from the start model's walk with every rewrite merged. The
caller verifies it once against the start model (see
:class:`~tf_balancer.optimizer.MetaOptimizer`, which runs the passes one by one,
each verified, when the chain's result fails).

Example:
    >>> from tf_balancer.analysis import analyze                        # doctest: +SKIP
    >>> passes = [get_pass("fold_batchnorm"), get_pass("fuse_activation")]  # doctest: +SKIP
    >>> chain = run_chain(passes, model, analyze(model), PassContext())  # doctest: +SKIP
    >>> [step.stats["flops"] for step in chain.steps]                   # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import tensorflow as tf

from tf_balancer.analysis import cost_stats
from tf_balancer.graph.cost import PlanCoster, measured_layer_flops
from tf_balancer.graph.layer_graph import LayerGraph
from tf_balancer.graph.trace import trace_walk
from tf_balancer.graph.walk import IDENTITY, Call, Walk, call_symbolically, clone_layer
from tf_balancer.passes._rebuild import (
    RebuildPass,
    Replacement,
    Rewrite,
    fill_weights,
    rebuild_with,
)
from tf_balancer.passes.base import GraphPass, PassContext

if TYPE_CHECKING:
    from tf_balancer.analysis import ModelAnalysis

__all__ = ["ChainStep", "Chain", "chainable", "run_chain", "walk_stats"]


@dataclasses.dataclass(frozen=True)
class ChainStep:
    """One pass of a chain: its rewrite (None: nothing to do), its seconds, and the
    stats (layers, params, FLOPs) of the walk after it."""

    rewrite: Rewrite | None
    seconds: float
    stats: dict[str, int]


@dataclasses.dataclass(frozen=True)
class Chain:
    """The model built from all the rewrites (the start model itself when none changed
    anything), the steps in order, and the seconds of that one rebuild."""

    model: Any
    steps: tuple[ChainStep, ...]
    rebuild_seconds: float


def chainable(graph_pass: GraphPass) -> bool:
    """A rebuild pass verified against its input (the default reference)."""
    return (
        isinstance(graph_pass, RebuildPass)
        and graph_pass.preserves_function
        and type(graph_pass).reference is GraphPass.reference
    )


def walk_stats(walk: Walk, measured: Mapping[str, int], batch_size: int) -> dict[str, int]:
    """Layers, params and FLOPs of ``walk`` as :func:`~tf_balancer.analysis.analyze`
    counts them, given each call's measured FLOPs."""
    graph = LayerGraph.from_walk(walk)
    return cost_stats(graph, PlanCoster(graph, measured, batch_size).report())


def run_chain(
    passes: Sequence[RebuildPass], model: Any, analysis: ModelAnalysis, ctx: PassContext
) -> Chain:
    """Apply each pass's rewrite to the walk the previous one left; build one model.

    Args:
        passes: :func:`chainable` passes, in order.
        model: the start model (never modified).
        analysis: its analysis (layers as they are; weights may have changed since).
        ctx: the passes' context.

    Raises:
        Whatever a pass or a rebuild raises; the caller then runs the passes one by one.
    """
    start_walk = walk = analysis.graph.walk
    batch = analysis.coster.batch_size
    measured = dict(analysis.measured_flops)
    merged: dict[str, Any] = {}
    stats = analysis.stats()
    steps = []
    for graph_pass in passes:
        begin = time.perf_counter()
        change = graph_pass.rewrite(walk, ctx)
        if change is not None:
            walk, made = _applied(walk, change.replacements)
            measured.update(_measured(walk, made, batch))
            for name, value in change.replacements.items():
                merged[name] = IDENTITY if value is IDENTITY else Replacement(layer=made[name])
            stats = walk_stats(walk, measured, batch)
        steps.append(ChainStep(change, time.perf_counter() - begin, stats))
    begin = time.perf_counter()
    built = rebuild_with(model, start_walk, merged) if merged else model
    return Chain(built, tuple(steps), time.perf_counter() - begin)


def _applied(walk: Walk, replacements: Mapping[str, Any]) -> tuple[Walk, dict[str, Any]]:
    """``walk`` with the replacements applied, and call name -> the new, built layer."""
    alias: dict[str, str] = {}

    def key(k: str) -> str:
        return alias.get(k, k)

    calls: list[Call] = []
    changed: list[tuple[Call, Any]] = []
    for call in walk.calls:
        value = replacements.get(call.name)
        if value is IDENTITY:
            alias[call.outputs[0]] = key(call.inputs[0])
            continue
        rewired = dataclasses.replace(
            call,
            inputs=tuple(key(k) for k in call.inputs),
            masks=tuple(key(k) for k in call.masks),
        )
        if value is not None:
            changed.append((rewired, value))
        calls.append(rewired)
    made = _made_layers(walk, changed)
    calls = [dataclasses.replace(c, layer=made[c.name]) if c.name in made else c for c in calls]
    new_walk = dataclasses.replace(
        walk, calls=tuple(calls), output_keys=tuple(key(k) for k in walk.output_keys)
    )
    return new_walk, made


def _made_layers(walk: Walk, changed: list[tuple[Call, Replacement]]) -> dict[str, Any]:
    """New layers of the replaced calls: cloned with the overrides, built by a call on
    symbolic inputs (as in a rebuild), then given their weights."""
    if not changed:
        return {}
    fresh = [
        dataclasses.replace(call, layer=clone_layer(call.layer, **value.overrides))
        for call, value in changed
    ]
    call_symbolically(_sub_walk(walk, fresh))  # builds them
    for (call, value), new in zip(changed, fresh, strict=True):
        fill_weights(new.layer, call, value)
    return {new.name: new.layer for new in fresh}


def _measured(walk: Walk, made: Mapping[str, Any], batch_size: int) -> dict[str, int]:
    """Measured FLOPs of the calls whose layers are ``made``, traced alone."""
    if not made:
        return {}
    sub = _sub_walk(walk, [call for call in walk.calls if call.name in made])
    flops = measured_layer_flops(trace_walk(sub, batch_size, frozen=False))
    return {name: flops.get(name, 0) for name in made}


def _sub_walk(walk: Walk, calls: Sequence[Call]) -> Walk:
    """The walk of some calls alone, fed every tensor they read."""
    keys = tuple(dict.fromkeys(k for call in calls for k in call.inputs))
    specs = tuple(tf.TensorSpec(walk.shapes[k], walk.dtypes[k]) for k in keys)
    outputs = tuple(k for call in calls for k in call.outputs)
    return dataclasses.replace(
        walk,
        calls=tuple(calls),
        input_keys=keys,
        output_keys=outputs,
        input_tensors=specs,
        output_structure=None,
        nominal=None,
    )

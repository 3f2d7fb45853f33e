"""Benchmark: how long ``tf_balancer.analysis.analyze`` takes on ResNet50.

Times each stage of :func:`tf_balancer.analysis.analyze` separately (walk +
layer graph, trace + freeze, cost), then ``analyze`` end to end, over a few
repeats, and prints the medians and a one-line verdict against the 5 s target.
The first ``analyze`` call (TensorFlow's one-time start-up included) is timed
on its own as "cold" and is not part of the medians.

Usage::

    python -m benchmarks.bench_analysis [--repeats 3] [--target 5.0] [--batch_size 1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

TARGET_SECONDS = 5.0
STAGES = ("walk/graph", "trace", "cost")


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def time_stages(model: Any, batch_size: int = 1) -> dict[str, float]:
    """Seconds per stage, run exactly as ``analyze`` runs them."""
    from tf_balancer.graph.cost import measured_layer_flops, model_cost
    from tf_balancer.graph.layer_graph import LayerGraph
    from tf_balancer.graph.trace import trace_keras

    graph, t_graph = _timed(lambda: LayerGraph.from_model(model))
    traced, t_trace = _timed(lambda: trace_keras(model, batch_size))
    _, t_cost = _timed(
        lambda: model_cost(graph, batch_size=batch_size, measured=measured_layer_flops(traced))
    )
    return {"walk/graph": t_graph, "trace": t_trace, "cost": t_cost}


def run(repeats: int = 3, batch_size: int = 1) -> dict[str, Any]:
    """Benchmark ``analyze(ResNet50(weights=None))``; returns medians in seconds."""
    from tf_balancer._compat import keras
    from tf_balancer.analysis import analyze

    keras.utils.set_random_seed(0)
    model, t_build = _timed(lambda: keras.applications.ResNet50(weights=None))
    analysis, t_cold = _timed(lambda: analyze(model, batch_size))
    per_stage: dict[str, list[float]] = {stage: [] for stage in STAGES}
    totals = []
    for _ in range(repeats):
        for stage, seconds in time_stages(model, batch_size).items():
            per_stage[stage].append(seconds)
        totals.append(_timed(lambda: analyze(model, batch_size))[1])
    return {
        "layers": len(analysis.graph.nodes),
        "flops": analysis.cost.flops,
        "params": analysis.cost.params,
        "build": t_build,
        "cold": t_cold,
        "stages": {stage: statistics.median(v) for stage, v in per_stage.items()},
        "spread": {stage: (min(v), max(v)) for stage, v in per_stage.items()},
        "total": statistics.median(totals),
        "total_spread": (min(totals), max(totals)),
        "repeats": repeats,
    }


def report(result: dict[str, Any], target: float = TARGET_SECONDS) -> str:
    """The benchmark table and the verdict line."""
    lines = [
        f"analyze(ResNet50(weights=None)): {result['layers']} layers, "
        f"{result['flops'] / 1e9:.2f} GFLOPs, {result['params'] / 1e6:.1f} M params; "
        f"median of {result['repeats']} repeats",
        f"{'stage':<18}{'median s':>10}{'min s':>9}{'max s':>9}",
    ]
    for stage in STAGES:
        low, high = result["spread"][stage]
        lines.append(f"{stage:<18}{result['stages'][stage]:>10.2f}{low:>9.2f}{high:>9.2f}")
    low, high = result["total_spread"]
    lines.append(f"{'total (analyze)':<18}{result['total']:>10.2f}{low:>9.2f}{high:>9.2f}")
    lines.append(f"{'cold first call':<18}{result['cold']:>10.2f}")
    verdict = "PASS" if result["total"] <= target else "FAIL"
    lines.append(
        f"verdict: {verdict}: analyze(ResNet50) median {result['total']:.2f} s "
        f"{'<=' if verdict == 'PASS' else '>'} {target:.1f} s target"
    )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats (default 3)")
    parser.add_argument("--target", type=float, default=TARGET_SECONDS, help="seconds")
    parser.add_argument("--batch_size", type=int, default=1)
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.batch_size < 1:
        parser.error("--repeats and --batch_size must be >= 1")
    print(report(run(args.repeats, args.batch_size), args.target))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Benchmark: how long scoring and allocation take on ResNet50.

Analyses ``ResNet50(weights=None)`` once, then times
``group_scores(graph, None, "magnitude")`` and ``allocate(...)`` for each
strategy at a FLOPs target of 0.5 (median of a few repeats), and prints a table
and a one-line verdict against the 1 s target for allocation (the slowest
strategy must be within it). Analysis itself is benchmarked by
``benchmarks.bench_analysis``.

Usage::

    python -m benchmarks.bench_allocation [--repeats 5] [--target 1.0] [--ratio 0.5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

TARGET_SECONDS = 1.0
STRATEGIES = ("balanced", "uniform", "global")


def _median_time(fn: Callable[[], Any], repeats: int) -> tuple[Any, list[float]]:
    """The last result and the wall time of each of ``repeats`` calls."""
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return result, times


def run(repeats: int = 5, ratio: float = 0.5) -> dict[str, Any]:
    """Time scoring and each strategy on ``analyze(ResNet50(weights=None))``."""
    from tf_balancer._compat import keras
    from tf_balancer.analysis import analyze
    from tf_balancer.attention.balance import allocate
    from tf_balancer.attention.importance import group_scores

    keras.utils.set_random_seed(0)
    start = time.perf_counter()
    analysis = analyze(keras.applications.ResNet50(weights=None))
    t_analyze = time.perf_counter() - start
    scores, score_times = _median_time(
        lambda: group_scores(analysis.graph, None, "magnitude"), repeats
    )
    rows = {"group_scores(magnitude)": (score_times, None)}
    for strategy in STRATEGIES:
        plan, times = _median_time(
            lambda s=strategy: allocate(analysis, scores, ratio, "flops", s), repeats
        )
        rows[f"allocate({strategy})"] = (times, plan.achieved)
    return {
        "groups": len(scores),
        "channels": sum(len(s) for s in scores.values()),
        "analyze": t_analyze,
        "rows": {
            name: (statistics.median(t), min(t), max(t), achieved)
            for name, (t, achieved) in rows.items()
        },
        "repeats": repeats,
        "ratio": ratio,
    }


def report(result: dict[str, Any], target: float = TARGET_SECONDS) -> str:
    """The benchmark table and the verdict line."""
    lines = [
        f"ResNet50(weights=None): {result['groups']} prunable groups, {result['channels']:,} "
        f"channels (analysed once in {result['analyze']:.1f} s); FLOPs target "
        f"{result['ratio']:g}, median of {result['repeats']} repeats",
        f"{'step':<26}{'median s':>10}{'min s':>9}{'max s':>9}{'achieved':>10}",
    ]
    for name, (median, low, high, achieved) in result["rows"].items():
        shown = "" if achieved is None else f"{achieved:.3f}"
        lines.append(f"{name:<26}{median:>10.3f}{low:>9.3f}{high:>9.3f}{shown:>10}")
    allocation = {n: r[0] for n, r in result["rows"].items() if n.startswith("allocate")}
    slowest = max(allocation, key=allocation.get)
    ok = allocation[slowest] <= target
    lines.append(
        f"verdict: {'PASS' if ok else 'FAIL'}: slowest allocation {slowest} median "
        f"{allocation[slowest]:.3f} s {'<=' if ok else '>'} {target:.1f} s target"
    )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats (default 5)")
    parser.add_argument("--target", type=float, default=TARGET_SECONDS, help="seconds")
    parser.add_argument("--ratio", type=float, default=0.5, help="FLOPs target (default 0.5)")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    print(report(run(args.repeats, args.ratio), args.target))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

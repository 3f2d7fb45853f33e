"""Benchmark: how long scoring and allocation take on ResNet50 and DenseNet121.

Analyses each model (``weights=None``) once, then times
``group_scores(graph, None, "magnitude")`` and ``allocate(...)`` for each
strategy at a FLOPs target of 0.5 (median of a few repeats). Prints a table per
model with the kept importance of each plan, and a one-line verdict against the
0.2 s target for allocation (the slowest strategy on every model must be within
it). Analysis itself is benchmarked by ``benchmarks.bench_analysis``.

Usage::

    python -m benchmarks.bench_allocation [--repeats 5] [--target 0.2] [--ratio 0.5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

TARGET_SECONDS = 0.2
MODELS = ("ResNet50", "DenseNet121")
# balanced maximises its default "retained" objective; "sum" (total kept importance) is the
# one the "importance kept" column measures, so it is shown as well.
RUNS = (
    ("balanced", "retained"),
    ("balanced", "sum"),
    ("uniform", "retained"),
    ("global", "retained"),
)


def _median_time(fn: Callable[[], Any], repeats: int) -> tuple[Any, list[float]]:
    """The last result and the wall time of each of ``repeats`` calls."""
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return result, times


def run(repeats: int = 5, ratio: float = 0.5, models: Sequence[str] = MODELS) -> dict[str, Any]:
    """Time scoring and each strategy on each of ``models``."""
    return {name: _run_one(name, repeats, ratio) for name in models}


def _run_one(name: str, repeats: int, ratio: float) -> dict[str, Any]:
    from tf_balancer._compat import keras
    from tf_balancer.analysis import analyze
    from tf_balancer.attention.balance import allocate
    from tf_balancer.attention.importance import group_scores

    keras.utils.set_random_seed(0)
    model = getattr(keras.applications, name)(weights=None, input_shape=(64, 64, 3))
    start = time.perf_counter()
    analysis = analyze(model)
    t_analyze = time.perf_counter() - start
    scores, score_times = _median_time(
        lambda: group_scores(analysis.graph, None, "magnitude"), repeats
    )
    rows = {"group_scores(magnitude)": (score_times, None, None)}
    for strategy, objective in RUNS:
        plan, times = _median_time(
            lambda s=strategy, o=objective: allocate(analysis, scores, ratio, "flops", s, None, o),
            repeats,
        )
        kept = sum(float(scores[g][idx].sum()) for g, idx in plan.keep.items())
        name = f"allocate({strategy}{', sum' if objective == 'sum' else ''})"
        rows[name] = (times, plan.achieved, kept)
    return {
        "groups": len(scores),
        "channels": sum(len(s) for s in scores.values()),
        "analyze": t_analyze,
        "rows": {
            step: (statistics.median(t), min(t), max(t), achieved, kept)
            for step, (t, achieved, kept) in rows.items()
        },
        "repeats": repeats,
        "ratio": ratio,
    }


def report(results: dict[str, Any], target: float = TARGET_SECONDS) -> str:
    """One table per model and the verdict line."""
    lines, slowest = [], ("", "", 0.0)
    for model, result in results.items():
        lines += [
            f"{model}(weights=None, 64x64): {result['groups']} prunable groups, "
            f"{result['channels']:,} channels (analysed once in {result['analyze']:.1f} s); "
            f"FLOPs target {result['ratio']:g}, median of {result['repeats']} repeats",
            f"{'step':<26}{'median s':>10}{'min s':>9}{'max s':>9}{'achieved':>10}"
            f"{'importance kept':>17}",
        ]
        for step, (median, low, high, achieved, kept) in result["rows"].items():
            shown = "" if achieved is None else f"{achieved:.3f}"
            kept_shown = "" if kept is None else f"{kept:.1f}"
            lines.append(
                f"{step:<26}{median:>10.3f}{low:>9.3f}{high:>9.3f}{shown:>10}{kept_shown:>17}"
            )
            if step.startswith("allocate") and median > slowest[2]:
                slowest = (model, step, median)
        lines.append("")
    model, step, seconds = slowest
    ok = seconds <= target
    lines.append(
        f"verdict: {'PASS' if ok else 'FAIL'}: slowest allocation {model} {step} median "
        f"{seconds:.3f} s {'<=' if ok else '>'} {target:.1f} s target"
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

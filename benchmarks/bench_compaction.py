"""Benchmark: does channel compaction (and BN folding) make inference faster?

Four variants of the reference CNN (:mod:`benchmarks.reference_cnn`) are timed
side by side in one process: the dense model, its ``fold_batchnorm`` +
``fuse_activation`` copy ("folded"), and its ``prune_channels`` copies at
``--target`` of the FLOPs (ragged counts, and rounded with ``round_to="auto"``).

What is timed is what a user deploys (``--path serving``, the default): every
model goes through the lossless passes the recipes run after ``prune_channels``
(``strip_training_ops``, ``fold_batchnorm``, ``fuse_activation``; the raw
``dense`` row excepted, it is the folding baseline), is written as a serving
SavedModel and loaded back with ``tf.saved_model.load``, and its
``serving_default`` signature is called (TensorFlow's runtime Grappler fuses
Conv+BiasAdd+activation there). The compaction speed-ups are against the dense
model through the same passes and path ("folded"), so both sides of each ratio
are deployed the same way. ``--path keras`` times the Keras models as before
(a ``tf.function`` of ``model(x, training=False)``, no lossless passes).
``--intra_op_threads`` / ``--inter_op_threads`` set TensorFlow's thread pools
for the whole process (both sides of every ratio): at batch 1 the per-op cost of
handing work to a second pool thread is paid by the dense and the compact model
alike, so it caps the speed-up; 1/1 removes it.

Each callable is warmed up, then timed with the repetitions *interleaved* (one
call of each variant per round, in a shuffled order), so that load from other
processes hits all of them alike. Latencies are medians over rounds; a speedup is the median over rounds of
the paired ratio ``dense seconds / variant seconds`` (robust to load that changes
from round to round); the ratio of the medians is kept in the JSON too.

``efficiency`` = speed-up x FLOPs ratio (1.0: the FLOPs reduction in full).
FLOPs are the Keras models' before the lossless passes (what ``--target`` is
met on).

Every call also pays a cost that no model change touches: the Python-side
signature call, the function-call op, handing the output back. A model that
does next to nothing (:func:`call_cost_model`, a mean over the input) is
deployed the same way and timed in the same rounds; ``net efficiency`` is the
efficiency of the times less that round's per-call cost - what the graph itself
gains, as a caller without the Python layer (TF Serving, a C++ client) would
see it. At batch 64 the difference is nil; at batch 1 the per-call cost is a
fifth of the reference CNN's time. Both are printed; the raw speed-up stays
the verdict, the net one is added beside it below the largest batch.

Verdicts:

* compaction: at the largest batch size, ``speedup >= 0.8 x dense_flops / compact_flops``;
* rounded (``round_to="auto"``: kept counts multiples of the CPU's float32 vector
  width): ``speedup >= 0.9 x`` the FLOPs reduction at the largest batch, ``0.8 x`` at the others;
* two more networks (MobileNetV2-0.35 at 96x96, ResNet50 at 64x64): the rounded
  verdicts above, per network;
* latency target: the plan made with ``target_metric="latency"`` (a latency table
  measured at batch 32) runs at ``--target`` of the dense time within 10%;
* folding: ``speedup >= 0.97`` (folded not slower than dense, allowing 3% noise)
  at every batch size.

The table is printed and the results are written as JSON to
``benchmarks/out/compaction.json``.

Usage::

    python -m benchmarks.bench_compaction [--repeats 40] [--batch_sizes 1 64] [--target 0.5]
        [--path serving|keras] [--intra_op_threads N] [--inter_op_threads N]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

OUT = Path(__file__).parent / "out" / "compaction.json"
COMPACT_MARGIN = 0.8  # speedup must reach 80% of the FLOPs reduction
FOLD_FLOOR = 0.97  # folded may be at most 3% slower (timing noise)
# round_to="auto" (kept counts multiples of the CPU's vector width): the speed-up must
# reach 90% of the FLOPs reduction at the large batch, 80% at the others.
ROUNDED_MARGIN_LARGE, ROUNDED_MARGIN_ONE = 0.9, 0.8
WARMUP = 3


PATHS = ("serving", "keras")
LOSSLESS = ("strip_training_ops", "fold_batchnorm", "fuse_activation")


def lossless(model: Any) -> Any:
    """``model`` after the passes the recipes run after ``prune_channels``."""
    from tf_balancer.optimizer import MetaOptimizer

    return MetaOptimizer(list(LOSSLESS), fail_on_error=True).run(model)[0]


def deployed(model: Any, path: str = "serving") -> Any:
    """``x -> output`` as deployed: ``serving``, the model written as a serving
    SavedModel, loaded back and its ``serving_default`` signature called;
    ``keras``, a ``tf.function`` of ``model(x, training=False)``."""
    import tempfile

    import tensorflow as tf

    from tf_balancer._compat import adapter_for
    from tf_balancer.report import inference_fn

    if path == "keras":
        return inference_fn(model)
    with tempfile.TemporaryDirectory() as directory:  # variables are read at load
        adapter_for(model).save_serving_model(model, directory)
        loaded = tf.saved_model.load(directory)
    signature = loaded.signatures["serving_default"]
    (key,) = signature.structured_input_signature[1]

    def call(x: Any) -> Any:
        return next(iter(signature(**{key: x}).values()))

    call.loaded = loaded  # keeps the resources alive
    return call


def time_interleaved(
    models: dict[str, Any], batch_size: int, repeats: int, seed: int = 0
) -> dict[str, list[float]]:
    """Seconds per call of each Keras model (a ``tf.function`` of it), rounds
    interleaved in shuffled order."""
    fns = {name: deployed(model, "keras") for name, model in models.items()}
    shape = _input_shape(models[next(iter(models))])
    return time_calls(fns, shape, batch_size, repeats, seed)


def time_calls(
    fns: dict[str, Any], shape: Sequence[int], batch_size: int, repeats: int, seed: int = 0
) -> dict[str, list[float]]:
    """Seconds per call of each callable (``x -> tensor``) on a ``(batch_size,
    *shape)`` input, rounds interleaved in shuffled order."""
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    x = tf.constant(rng.random((batch_size, *shape), dtype=np.float32))
    for fn in fns.values():
        for _ in range(WARMUP):
            fn(x).numpy()
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for _ in range(repeats):
        for i in rng.permutation(len(names)):
            fn = fns[names[i]]
            start = time.perf_counter()
            fn(x).numpy()
            times[names[i]].append(time.perf_counter() - start)
    return times


def _input_shape(model: Any) -> tuple[int, ...]:
    return tuple(model.inputs[0].shape[1:])


def _callables(models: dict[str, Any], path: str, raw: Sequence[str] = ()) -> dict[str, Any]:
    """Each model as deployed on ``path``; with ``serving``, after the lossless
    passes (except the models named in ``raw``)."""
    return {
        name: deployed(m if path == "keras" or name in raw else lossless(m), path)
        for name, m in models.items()
    }


def paired_speedup(
    dense: list[float], variant: list[float], flops_ratio: float, margin: float
) -> dict[str, Any]:
    """Median latencies, the median per-round speed-up of ``variant`` over ``dense``,
    and whether it reaches ``margin`` x the FLOPs speed-up ``1 / flops_ratio``."""
    speedup = statistics.median(d / v for d, v in zip(dense, variant, strict=True))
    required = margin / flops_ratio
    return {
        "dense_ms": 1e3 * statistics.median(dense),
        "compact_ms": 1e3 * statistics.median(variant),
        "speedup": speedup,
        "required": required,
        "pass": speedup >= required,
    }


def _row(
    name: str,
    flops: int,
    dense_flops: int,
    seconds: list[float],
    dense: list[float],
    baseline: str = "dense",
    call: list[float] | None = None,
) -> dict:
    """One table row; ``speedup`` is the median of the per-round ratios
    ``baseline`` / this model, ``efficiency`` that x the FLOPs ratio; with ``call``
    (the per-call cost, :func:`call_cost_model`, timed in the same rounds), ``net_*``
    are the same of the times less that round's per-call cost."""
    median = statistics.median(seconds)
    ratios = [d / s for d, s in zip(dense, seconds, strict=True)]
    speedup = statistics.median(ratios)
    net: dict[str, float] = {}
    if call is not None:
        pairs = zip(dense, seconds, call, strict=True)
        net_speedup = statistics.median((d - c) / max(s - c, 1e-9) for d, s, c in pairs)
        net = {
            "call_ms": 1e3 * statistics.median(call),
            "net_speedup": net_speedup,
            "net_efficiency": net_speedup * flops / dense_flops,
        }
    return {
        "model": name,
        "baseline": baseline,
        "flops": flops,
        "flops_ratio": flops / dense_flops,
        "median_ms": 1e3 * median,
        "p10_ms": 1e3 * float(np.percentile(seconds, 10)),
        "p90_ms": 1e3 * float(np.percentile(seconds, 90)),
        "speedup": speedup,
        "efficiency": speedup * flops / dense_flops,
        "speedup_of_medians": statistics.median(dense) / median,
        **net,
    }


def call_cost_model(shape: Sequence[int]) -> Any:
    """A model that does next to nothing (a mean over its input): deployed and timed
    like the others, it measures what every call costs whatever the model - the
    Python-side signature call, the function call op, handing the output back -
    which removing channels cannot reduce (about 0.3 ms of the reference CNN's
    1.6 ms at batch 1)."""
    from tf_balancer._compat import keras

    inp = keras.Input(tuple(shape))
    return keras.Model(inp, keras.layers.GlobalAveragePooling2D()(inp), name="call_cost")


def run(
    repeats: int = 40,
    batch_sizes: Sequence[int] = (1, 64),
    target: float = 0.5,
    width: int = 64,
    path: str = "serving",
    threads: tuple[int, int] = (0, 0),
) -> dict[str, Any]:
    """Build the variants, time them, and return the results with verdicts.

    On the ``serving`` path the compaction rows are against ``folded`` (the dense
    model through the same lossless passes), the ``folded`` row against ``dense``;
    on the ``keras`` path every row is against ``dense``, as before.
    """
    from benchmarks.reference_cnn import dense_and_compact, dense_and_folded
    from tf_balancer.analysis import analyze

    dense, compact = dense_and_compact(target, width)
    _, rounded = dense_and_compact(target, width, round_to="auto")
    _, folded = dense_and_folded(width)
    models = {"dense": dense, "compact": compact, "rounded": rounded, "folded": folded}
    flops = {name: analyze(model).cost.flops for name, model in models.items()}
    # the folded model is already folded; on the keras path nothing is
    fns = _callables(models, path, raw=("dense", "folded"))
    fns["call"] = deployed(call_cost_model(_input_shape(dense)), path)
    base = "folded" if path == "serving" else "dense"
    baselines = {"dense": "dense", "folded": "dense", "compact": base, "rounded": base}
    results: dict[str, Any] = {
        "target": target,
        "width": width,
        "repeats": repeats,
        "path": path,
        "threads": {"intra_op": threads[0], "inter_op": threads[1]},
        "params": {name: model.count_params() for name, model in models.items()},
        "batches": {},
    }
    for batch in batch_sizes:
        times = time_calls(fns, _input_shape(dense), batch, repeats, seed=batch)
        results["batches"][str(batch)] = [
            _row(
                name,
                flops[name],
                flops["dense"],
                times[name],
                times[baselines[name]],
                baselines[name],
                times["call"],
            )
            for name in models
        ]
    results["latency_target"] = latency_target(repeats, target, width)
    results["architectures"] = architectures(repeats, batch_sizes, target, path)
    results["verdicts"] = verdicts(results, max(batch_sizes))
    results["verdicts"]["latency_target"] = {
        "batch": results["latency_target"]["batch"],
        "speedup": 1 / results["latency_target"]["measured"]["latency"],
        "required": 1 / (target * 1.1),
        "pass": results["latency_target"]["pass"],
    }
    return results


def verdicts(results: dict[str, Any], large_batch: int) -> dict[str, dict[str, Any]]:
    """The compaction verdict at ``large_batch`` and the folding verdict at every batch."""
    rows = {r["model"]: r for r in results["batches"][str(large_batch)]}
    needed = COMPACT_MARGIN / rows["compact"]["flops_ratio"]
    out = {
        "compaction": {
            "batch": large_batch,
            "speedup": rows["compact"]["speedup"],
            "required": needed,
            "pass": rows["compact"]["speedup"] >= needed,
        }
    }
    for batch, batch_rows in results["batches"].items():
        out[f"rounded@{batch}"] = _rounded_verdict(
            batch_rows, int(batch) == large_batch, int(batch)
        )
    for batch, batch_rows in results["batches"].items():
        speedup = next(r["speedup"] for r in batch_rows if r["model"] == "folded")
        out[f"folding@{batch}"] = {
            "batch": int(batch),
            "speedup": speedup,
            "required": FOLD_FLOOR,
            "pass": speedup >= FOLD_FLOOR,
        }
    return out


ARCHITECTURES = {
    "MobileNetV2-0.35 96x96": lambda k: k.applications.MobileNetV2(
        alpha=0.35, input_shape=(96, 96, 3), weights=None, classifier_activation=None
    ),
    "ResNet50 64x64": lambda k: k.applications.ResNet50(
        input_shape=(64, 64, 3), weights=None, classifier_activation=None
    ),
}


def architectures(
    repeats: int, batch_sizes: Sequence[int], target: float, path: str = "serving"
) -> dict[str, Any]:
    """Dense vs compact (ragged) vs rounded (``round_to="auto"``) on two more networks,
    all three deployed the same way (:func:`_callables`).

    Their BatchNorm statistics are randomised, as training leaves them: fresh ones
    (mean 0, variance 1, no shift) fold into zero biases, which Grappler removes,
    and a conv with no BiasAdd gets no activation fused in (MobileNetV2-0.35: no
    ``_FusedConv2D`` of 35 convs, against all 35 and 17 depthwise with the
    statistics randomised) - a graph no trained model deploys as."""
    from benchmarks.reference_cnn import compact_copy, randomize_batchnorm
    from tf_balancer._compat import keras
    from tf_balancer.analysis import analyze

    out: dict[str, Any] = {}
    for name, build in ARCHITECTURES.items():
        keras.utils.set_random_seed(0)
        dense = randomize_batchnorm(build(keras), seed=0)
        models = {
            "dense": dense,
            "compact": compact_copy(dense, target),
            "rounded": compact_copy(dense, target, "auto"),
        }
        flops = {n: analyze(m).cost.flops for n, m in models.items()}
        fns = _callables(models, path)
        fns["call"] = deployed(call_cost_model(_input_shape(dense)), path)
        rows: dict[str, Any] = {}
        for batch in batch_sizes:
            times = time_calls(fns, _input_shape(dense), batch, repeats, seed=batch)
            rows[str(batch)] = [
                _row(n, flops[n], flops["dense"], times[n], times["dense"], call=times["call"])
                for n in models
            ]
        out[name] = {"batches": rows}
        large = max(batch_sizes)
        out[name]["verdicts"] = {
            f"rounded@{batch}": _rounded_verdict(batch_rows, int(batch) == large, int(batch))
            for batch, batch_rows in rows.items()
        }
    return out


def _rounded_verdict(batch_rows: list[dict], large: bool, batch: int) -> dict[str, Any]:
    """The rounded model's speed-up against the margin for its batch size; below the
    largest batch also net of the per-call cost (``net_speedup``, ``net_pass``)."""
    row = next(r for r in batch_rows if r["model"] == "rounded")
    margin = ROUNDED_MARGIN_LARGE if large else ROUNDED_MARGIN_ONE
    required = margin / row["flops_ratio"]
    verdict = {
        "batch": batch,
        "speedup": row["speedup"],
        "required": required,
        "pass": row["speedup"] >= required,
    }
    if not large and "net_speedup" in row:
        verdict.update(net_speedup=row["net_speedup"], net_pass=row["net_speedup"] >= required)
    return verdict


def _verdict_line(name: str, v: dict[str, Any]) -> str:
    line = (
        f"verdict {name}: {'PASS' if v['pass'] else 'FAIL'}: speedup {v['speedup']:.2f} at "
        f"batch {v['batch']} {'>=' if v['pass'] else '<'} {v['required']:.2f} required"
    )
    if "net_speedup" in v:
        line += (
            f"; net of the per-call cost: {'PASS' if v['net_pass'] else 'FAIL'} "
            f"({v['net_speedup']:.2f})"
        )
    return line


def latency_target(repeats: int, target: float, width: int) -> dict[str, Any]:
    """The reference CNN pruned with ``target_metric="latency"`` (table at batch 32,
    ``round_to="auto"``), and with ``"flops"`` for comparison: measured latency
    ratios at the table's batch size; the latency plan must land within 10%."""
    from benchmarks.reference_cnn import build_reference_cnn
    from tf_balancer.analysis import analyze
    from tf_balancer.attention.balance import Bounds, allocate
    from tf_balancer.attention.importance import group_scores
    from tf_balancer.graph.latency import BATCH_SIZE, measure_latency
    from tf_balancer.optimizer import MetaOptimizer
    from tf_balancer.passes.base import PassContext

    dense = build_reference_cnn(width)
    analysis = analyze(dense)
    start = time.perf_counter()
    measure_latency(analysis, BATCH_SIZE)
    seconds = time.perf_counter() - start
    scores = group_scores(analysis.graph, None, "magnitude")
    models, predicted = {"dense": dense}, {}
    for metric in ("latency", "flops"):
        plan = allocate(analysis, scores, target, metric, bounds=Bounds(round_to="auto"))
        predicted[metric] = analysis.coster.total(plan.keep_counts, "latency") / (
            analysis.coster.total(None, "latency")
        )
        models[metric], _ = MetaOptimizer(["prune_channels"], fail_on_error=True).run(
            dense, PassContext(plan=plan)
        )
    # the latency table is measured on the Keras models: they are timed the same way
    times = time_interleaved(models, BATCH_SIZE, repeats)
    measured = {
        m: statistics.median(t) / statistics.median(times["dense"]) for m, t in times.items()
    }
    return {
        "batch": BATCH_SIZE,
        "table_seconds": seconds,
        "predicted": predicted,
        "measured": measured,
        "pass": abs(measured["latency"] / target - 1) <= 0.10,
    }


def report(results: dict[str, Any]) -> str:
    """The printed table and one verdict line per check."""
    lines = [
        f"reference CNN (5x Conv3x3+BN+ReLU, width {results['width']}, 32x32x3): "
        f"dense vs compact ({results['target']:.0%} FLOPs target) vs BN-folded; "
        f"median of {results['repeats']} interleaved calls; path {results.get('path', 'keras')}, "
        f"threads {results.get('threads')}",
        f"{'batch':>5}  {'model':<8}{'params':>9}{'MFLOPs':>9}{'FLOPs':>7}"
        f"{'median ms':>11}{'p10 ms':>9}{'p90 ms':>9}{'speedup':>9}{'effic.':>8}"
        f"{'net eff.':>9}  vs",
    ]
    for batch, rows in results["batches"].items():
        for r in rows:
            lines.append(
                f"{batch:>5}  {r['model']:<8}{results['params'][r['model']]:>9,}"
                f"{r['flops'] / 1e6:>9.1f}{r['flops_ratio']:>7.2f}{r['median_ms']:>11.2f}"
                f"{r['p10_ms']:>9.2f}{r['p90_ms']:>9.2f}{r['speedup']:>9.2f}"
                f"{r['efficiency']:>8.2f}{r.get('net_efficiency', math.nan):>9.2f}  {r['baseline']}"
            )
        call_ms = rows[0].get("call_ms")
        if call_ms is not None:
            lines.append(f"{batch:>5}  per-call cost (call_cost_model): {call_ms:.3f} ms")
    lat = results.get("latency_target")
    if lat:
        lines.append(
            f"target_metric='latency' at {results['target']:g}: measured latency ratio "
            f"{lat['measured']['latency']:.3f} at batch {lat['batch']} (table predicted "
            f"{lat['predicted']['latency']:.3f}, built in {lat['table_seconds']:.1f} s); the "
            f"FLOPs-targeted plan measures {lat['measured']['flops']:.3f}"
        )
    for arch, res in results.get("architectures", {}).items():
        for batch, rows in res["batches"].items():
            for r in rows[1:]:
                lines.append(
                    f"{arch} batch {batch}: {r['model']} {r['flops_ratio']:.3f} FLOPs, "
                    f"{r['median_ms']:.2f} ms, speedup {r['speedup']:.2f}, "
                    f"efficiency {r['efficiency']:.2f}, net of "
                    f"{r.get('call_ms', math.nan):.3f} ms per call "
                    f"{r.get('net_efficiency', math.nan):.2f}"
                )
        lines += [_verdict_line(f"{arch} {name}", v) for name, v in res["verdicts"].items()]
    lines += [_verdict_line(name, v) for name, v in results["verdicts"].items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=40, help="timed calls per model (>= 30)")
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--target", type=float, default=0.5, help="FLOPs fraction to keep")
    parser.add_argument("--width", type=int, default=64, help="filters per conv")
    parser.add_argument("--out", type=Path, default=OUT, help="JSON output path")
    parser.add_argument(
        "--path", choices=PATHS, default="serving", help="how the models are called (see above)"
    )
    parser.add_argument("--intra_op_threads", type=int, default=0, help="0: TensorFlow's default")
    parser.add_argument("--inter_op_threads", type=int, default=0, help="0: TensorFlow's default")
    args = parser.parse_args(argv)
    if args.repeats < 30 or min(args.batch_sizes) < 1:
        parser.error("--repeats must be >= 30 and batch sizes >= 1")
    threads = (args.intra_op_threads, args.inter_op_threads)
    if min(threads) < 0:
        parser.error("thread counts must be >= 0")
    import tensorflow as tf  # before any op runs: the pools are fixed at the first one

    tf.config.threading.set_intra_op_parallelism_threads(threads[0])
    tf.config.threading.set_inter_op_parallelism_threads(threads[1])
    results = run(args.repeats, args.batch_sizes, args.target, args.width, args.path, threads)
    print(report(results))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

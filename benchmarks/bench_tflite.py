"""TFLite: does the interpreter see the speed-up compaction buys, and does int8 keep accuracy?

1. Latency: the reference CNN (:mod:`benchmarks.reference_cnn`) dense and
   compacted to 0.5 FLOPs (``round_to="auto"``: counts the vector unit likes), both exported with ``tfb.export_tflite`` (float32,
   verified), timed in the TFLite interpreter at batch 1 and 64 with
   repetitions interleaved in one process. Target: the interpreter's speed-up
   >= 0.85 x the FLOPs speed-up, at both batch sizes.
2. Accuracy: the digits CNN trained 8 epochs, exported float32 and full-integer
   int8 (calibrated on 200 training images): int8 accuracy within 1 point of
   the float model's on the validation split, 3 seeds.

Run: ``.venv/bin/python -m benchmarks.bench_tflite`` (about 2 minutes on 2 cores).
Results: printed, and written to ``benchmarks/out/tflite.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

OUT = Path(__file__).parent / "out" / "tflite.json"
LATENCY_MARGIN = 0.85
ACCURACY_POINTS = 1.0


def _interpreters(paths: dict[str, str], batch: int) -> dict:
    import tensorflow as tf

    out = {}
    for name, path in paths.items():
        interpreter = tf.lite.Interpreter(model_path=path)
        detail = interpreter.get_input_details()[0]
        interpreter.resize_tensor_input(detail["index"], [batch, *detail["shape"][1:]])
        interpreter.allocate_tensors()
        x = np.random.default_rng(0).random((batch, *detail["shape"][1:]), dtype=np.float32)
        interpreter.set_tensor(detail["index"], x)
        interpreter.invoke()  # warm up
        out[name] = interpreter
    return out


def latency(repeats: int, batches: tuple[int, ...]) -> dict:
    from benchmarks.bench_compaction import paired_speedup
    from benchmarks.reference_cnn import dense_and_compact
    from tf_balancer.analysis import analyze
    from tf_balancer.export.tflite import export_tflite

    dense, compact = dense_and_compact(0.5, round_to="auto")
    flops_ratio = analyze(compact).cost.flops / analyze(dense).cost.flops
    tmp = tempfile.mkdtemp(prefix="bench_tflite_")
    paths = {}
    for name, model in (("dense", dense), ("compact", compact)):
        paths[name] = os.path.join(tmp, f"{name}.tflite")
        export_tflite(model, paths[name])
    results = {"flops_ratio": flops_ratio, "batches": {}}
    rng = np.random.default_rng(0)
    for batch in batches:
        interpreters = _interpreters(paths, batch)
        times = {name: [] for name in interpreters}
        for _ in range(repeats):
            for name in rng.permutation(list(interpreters)):
                start = time.perf_counter()
                interpreters[name].invoke()
                times[name].append(time.perf_counter() - start)
        results["batches"][str(batch)] = paired_speedup(
            times["dense"], times["compact"], flops_ratio, LATENCY_MARGIN
        )
    return results


def int8_accuracy(seeds: int) -> dict:
    from tf_balancer.demo import build_digits_cnn, compile_classifier, load_digits_data
    from tf_balancer.export.tflite import export_tflite

    tmp = tempfile.mkdtemp(prefix="bench_tflite_")
    rows = []
    for seed in range(seeds):
        data = load_digits_data(seed)
        model = compile_classifier(build_digits_cnn(seed=seed))
        model.fit(data.x_train, data.y_train, epochs=8, batch_size=32, verbose=0)
        scores = {}
        for quantize in (None, "int8"):
            result = export_tflite(
                model,
                os.path.join(tmp, f"{seed}_{quantize}.tflite"),
                quantize=quantize,
                calibration=data.x_train[:200],
                validation_data=(data.x_val, data.y_val),
            )
            scores[quantize or "float32"] = (result.accuracy, result.bytes, result.latency_ms)
        rows.append(scores)
    float_acc = statistics.mean(r["float32"][0] for r in rows)
    int8_acc = statistics.mean(r["int8"][0] for r in rows)
    return {
        "seeds": rows,
        "float32": float_acc,
        "int8": int8_acc,
        "pass": int8_acc >= float_acc - ACCURACY_POINTS,
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args(argv)
    results = {"latency": latency(args.repeats, (1, 64)), "int8": int8_accuracy(args.seeds)}
    flops = results["latency"]["flops_ratio"]
    for batch, r in results["latency"]["batches"].items():
        print(
            f"{'PASS' if r['pass'] else 'FAIL'}: reference CNN in the TFLite interpreter, batch "
            f"{batch}: {r['dense_ms']:.3f} ms -> {r['compact_ms']:.3f} ms, speed-up "
            f"{r['speedup']:.2f}x at {flops:.3f} FLOPs (target >= {r['required']:.2f}x)"
        )
    r = results["int8"]
    sizes = [(s["float32"][1], s["int8"][1]) for s in r["seeds"]]
    print(
        f"{'PASS' if r['pass'] else 'FAIL'}: digits CNN int8 {r['int8']:.2f}% vs float32 "
        f"{r['float32']:.2f}% ({args.seeds} seeds; {sizes[0][1]:,} vs {sizes[0][0]:,} bytes; "
        "target int8 >= float - 1 point)"
    )
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

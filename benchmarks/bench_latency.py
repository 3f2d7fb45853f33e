"""Latency budgets vs FLOPs budgets on the digits CNN: accuracy and measured speed.

For each seed the digits CNN trains 12 epochs with ``BalanceCallback(target=0.5)``
twice: once with ``target_metric="latency"`` (a per-layer latency table measured
on this machine at batch 32) and once with ``target_metric="flops"``, both with
``round_to="auto"``. Reported per run: validation accuracy of the optimized
model and its measured latency relative to the dense model at batch 32
(``final_latency_ratio``, measured the same way for both). Target: the latency
plan is at least as fast as the FLOPs plan and at least as accurate (mean of 3
seeds).

Run: ``.venv/bin/python -m benchmarks.bench_latency`` (about 4 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import os
import statistics

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

import tf_balancer as tfb  # noqa: E402
from tf_balancer.demo import build_digits_cnn, compile_classifier, load_digits_data  # noqa: E402


def _run(metric: str, seed: int, epochs: int) -> tuple[float, float]:
    data = load_digits_data(seed)
    model = compile_classifier(build_digits_cnn(seed=seed))
    callback = tfb.BalanceCallback(
        target=0.5,
        target_metric=metric,
        round_to="auto",
        validation_data=(data.x_val, data.y_val),
        verbose=0,
    )
    model.fit(
        data.x_train, data.y_train, epochs=epochs, batch_size=32, callbacks=[callback], verbose=0
    )
    predicted = np.asarray(callback.optimized_model.predict(data.x_val, verbose=0)).argmax(-1)
    accuracy = float(np.mean(predicted == data.y_val) * 100)
    ratio = callback.report.get("final_latency_ratio")
    if ratio is None:  # the FLOPs run: measure it the same way
        from tf_balancer.training.finalize import Finalizer

        ratio = Finalizer(callback.finalize_inputs()).latency_ratio(callback.optimized_model)
    return accuracy, ratio


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=12)
    args = parser.parse_args(argv)
    results = {
        metric: [_run(metric, s, args.epochs) for s in range(args.seeds)]
        for metric in ("latency", "flops")
    }
    acc = {m: statistics.mean(r[0] for r in rows) for m, rows in results.items()}
    lat = {m: statistics.mean(r[1] for r in rows) for m, rows in results.items()}
    ok = acc["latency"] >= acc["flops"] and lat["latency"] <= lat["flops"]
    print(
        f"{'PASS' if ok else 'FAIL'}: digits CNN at 0.5, {args.seeds} seeds: latency-targeted "
        f"{acc['latency']:.2f}% at {lat['latency']:.3f} of the dense time vs FLOPs-targeted "
        f"{acc['flops']:.2f}% at {lat['flops']:.3f} (runs: {results})"
    )


if __name__ == "__main__":
    main()

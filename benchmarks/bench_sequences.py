"""Transformer, LSTM and Bidirectional-GRU classifiers on the digits read as 8x8 sequences.

1. Accuracy: for each model and seed, the dense model trained ``--epochs`` epochs
   vs the same model trained the same epochs with ``BalanceCallback(target=0.5)``
   (defaults: Taylor from the training batches, the default schedule), the
   optimized model evaluated on the validation split. Target: mean accuracy of
   the pruned model within 1 point of the dense model's (3 seeds), Keras 3.
   60 epochs by default, where the dense models level off (the dense LSTM is at
   92.9% after 20 epochs, 95.6% after 40, 96.6% after 60): at 20 the comparison
   mostly measures how much slower a half-size network learns.
2. Latency at batch 64: the dense transformer vs its 0.5-FLOPs compaction, timed
   interleaved in one process (``bench_compaction.time_interleaved``), for the
   digits transformer and for a wider one (width 256, FFN 1024, 64 steps) whose
   batches are big enough for the arithmetic to dominate. Target: speed-up
   >= 0.8 x the FLOPs speed-up.

Run: ``.venv/bin/python -m benchmarks.bench_sequences`` (about 12 minutes on 2 cores;
``--epochs 20`` for a quicker look).
Results: printed, and written to ``benchmarks/out/sequences.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402  (Keras 3: what tf.keras is on TF >= 2.16)
import numpy as np  # noqa: E402

import tf_balancer as tfb  # noqa: E402
from benchmarks.bench_compaction import paired_speedup, time_interleaved  # noqa: E402
from tf_balancer.demo_sequences import (  # noqa: E402
    build_digits_bigru,
    build_digits_lstm,
    build_digits_transformer,
    load_digit_sequences,
)

OUT = Path(__file__).parent / "out" / "sequences.json"
BUILDERS = {
    "transformer": build_digits_transformer,
    "lstm": build_digits_lstm,
    "bigru": build_digits_bigru,
}
MARGIN = 1.0  # accuracy points
LATENCY_MARGIN = 0.8


def _compiled(model):
    model.compile(
        keras.optimizers.Adam(3e-3),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


def _accuracy(model, data) -> float:
    predicted = np.asarray(model.predict(data.x_val, verbose=0, batch_size=256)).argmax(-1)
    return float(np.mean(predicted == data.y_val) * 100)


def accuracy(epochs: int, seeds: int) -> dict:
    results = {}
    for name, build in BUILDERS.items():
        dense, pruned, ratios = [], [], []
        for seed in range(seeds):
            data = load_digit_sequences(seed)
            fit = {"epochs": epochs, "batch_size": 32, "verbose": 0}
            model = _compiled(build(keras, seed=seed))
            model.fit(data.x_train, data.y_train, **fit)
            dense.append(_accuracy(model, data))
            model = _compiled(build(keras, seed=seed))
            callback = tfb.BalanceCallback(target=0.5, verbose=0)
            model.fit(data.x_train, data.y_train, callbacks=[callback], **fit)
            pruned.append(_accuracy(callback.optimized_model, data))
            ratios.append(callback.report["final_flops_ratio"])
        gap = statistics.mean(dense) - statistics.mean(pruned)
        results[name] = {
            "dense": dense,
            "pruned": pruned,
            "flops_ratio": ratios,
            "gap": gap,
            "pass": gap <= MARGIN,
        }
    return results


def _wide_transformer():
    from tf_balancer.demo_sequences import position_embedding

    keras.utils.set_random_seed(0)
    layers = keras.layers
    inp = keras.Input((64, 64))
    x = position_embedding(keras)()(layers.Dense(256)(inp))
    for b in range(2):
        attended = layers.MultiHeadAttention(4, 64, name=f"mha{b}")(x, x)
        x = layers.LayerNormalization()(layers.Add()([x, attended]))
        h = layers.Dense(256, name=f"ffn{b}b")(layers.Dense(1024, activation="relu")(x))
        x = layers.LayerNormalization()(layers.Add()([x, h]))
    return keras.Model(inp, layers.Dense(10)(layers.GlobalAveragePooling1D()(x)))


def latency(repeats: int) -> dict:
    from tf_balancer.analysis import analyze

    results = {}
    for name, build in (
        ("digits", lambda: build_digits_transformer(keras)),
        ("wide", _wide_transformer),
    ):
        dense = _compiled(build())
        analysis = analyze(dense)
        small, report = tfb.prune(dense, 0.5, importance="magnitude", finetune_epochs=0)
        flops_ratio = analyze(small).cost.flops / analysis.cost.flops
        times = time_interleaved({"dense": dense, "compact": small}, 64, repeats)
        results[name] = {
            "flops_ratio": flops_ratio,
            **paired_speedup(times["dense"], times["compact"], flops_ratio, LATENCY_MARGIN),
        }
    return results


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--only", choices=("accuracy", "latency"), default=None)
    args = parser.parse_args(argv)
    results = {"epochs": args.epochs, "seeds": args.seeds}
    if args.only in (None, "latency"):
        results["latency"] = latency(args.repeats)
        for name, r in results["latency"].items():
            print(
                f"{'PASS' if r['pass'] else 'FAIL'}: {name} transformer at batch 64: "
                f"{r['dense_ms']:.2f} ms -> {r['compact_ms']:.2f} ms, speed-up {r['speedup']:.2f}x "
                f"at {r['flops_ratio']:.3f} FLOPs (target >= {r['required']:.2f}x)"
            )
    if args.only in (None, "accuracy"):
        results["accuracy"] = accuracy(args.epochs, args.seeds)
        for name, r in results["accuracy"].items():
            print(
                f"{'PASS' if r['pass'] else 'FAIL'}: {name} ({args.epochs} epochs, "
                f"{args.seeds} seeds): dense {statistics.mean(r['dense']):.2f}% "
                f"{np.round(r['dense'], 2).tolist()}, BalanceCallback(0.5) "
                f"{statistics.mean(r['pruned']):.2f}% {np.round(r['pruned'], 2).tolist()} at "
                f"{statistics.mean(r['flops_ratio']):.3f} FLOPs; gap {r['gap']:.2f} (target <= 1)"
            )
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

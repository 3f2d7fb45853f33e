"""Training-time overhead of BalanceCallback vs tfmot's UpdatePruningStep.

Same model, data, epochs and final sparsity (80%), measured side by side in one
run with interleaved repetitions. The time counted is ``fit`` from the call up
to ``on_train_end`` (the training loop with every per-epoch rebalance, and the
callback's model analysis at ``set_model``); the callback's end-of-training work
(compaction, fine-tuning, report) is timed separately, since tfmot has no
counterpart for it.

Run: ``.venv/bin/python -m benchmarks.bench_overhead``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import tensorflow_model_optimization as tfmot

from tf_balancer import BalanceCallback
from tf_balancer._compat import keras
from tf_balancer.demo import build_digits_cnn, compile_classifier, load_digits_data
from tf_balancer.sparse import wrapping

SPARSITY, EPOCHS, BATCH = 0.8, 6, 32


class _LoopTimer(keras.callbacks.Callback):
    """Listed first: records when ``on_train_end`` starts."""

    def on_train_end(self, logs=None):
        self.end = time.perf_counter()


def _run(kind: str, data) -> tuple[float, float]:
    steps = int(np.ceil(len(data.x_train) / BATCH))
    base = build_digits_cnn(seed=0)
    timer = _LoopTimer()
    if kind == "tfmot":
        schedule = tfmot.sparsity.keras.PolynomialDecay(
            0.0, SPARSITY, 0, steps * (EPOCHS - 1), frequency=10
        )
        model = tfmot.sparsity.keras.prune_low_magnitude(base, pruning_schedule=schedule)
        callbacks = [timer, tfmot.sparsity.keras.UpdatePruningStep()]
    else:
        names = list(wrapping.prunable_kernels(base))
        model, _ = wrapping.wrap_for_pruning(
            base, {n: 0.0 for n in names}, end_step=0, frequency=10, prune_after_end=True
        )
        callback = BalanceCallback(
            target=1 - SPARSITY, mode="sparse", importance="magnitude", verbose=0
        )
        callbacks = [timer, callback]
    compile_classifier(model)
    start = time.perf_counter()
    model.fit(
        data.x_train, data.y_train, epochs=EPOCHS, batch_size=BATCH, callbacks=callbacks, verbose=0
    )
    end = time.perf_counter()
    return timer.end - start, end - timer.end


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    data = load_digits_data(0)
    times: dict[str, list[tuple[float, float]]] = {"tfmot": [], "tf_balancer": []}
    for _ in range(args.repeats):
        for kind in times:  # interleaved, so drift hits both alike
            times[kind].append(_run(kind, data))
    loop = {k: float(np.median([t[0] for t in v])) for k, v in times.items()}
    final = float(np.median([t[1] for t in times["tf_balancer"]]))
    ratio = loop["tf_balancer"] / loop["tfmot"]
    print(f"fit loop, median of {args.repeats} ({EPOCHS} epochs, {SPARSITY:.0%} sparsity):")
    print(f"  tfmot UpdatePruningStep : {loop['tfmot']:.2f} s")
    print(f"  tf_balancer sparse mode : {loop['tf_balancer']:.2f} s")
    print(
        f"  ratio                   : {ratio:.3f}  (target <= 1.15: {'PASS' if ratio <= 1.15 else 'FAIL'})"
    )
    print(
        f"  + tf_balancer end-of-training compaction/report: {final:.2f} s (no tfmot counterpart)"
    )


if __name__ == "__main__":
    main()

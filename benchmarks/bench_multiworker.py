"""Training throughput with and without ``BalanceCallback`` on two workers.

Two worker processes on 127.0.0.1 train the digits CNN under
``MultiWorkerMirroredStrategy`` (``TF_CONFIG`` from
:func:`tf_balancer.training.cluster.local_tf_configs`). Each worker runs, in one
process and interleaved, ``fit`` without any callback and ``fit`` with
``BalanceCallback(target=0.5)`` (streamed Taylor, rebalances included), a fresh
model each time, and times the training epochs after the first (which traces the
train step in both). End-of-training work (compaction, report) is timed apart.

Target: steps per second without / with the callback <= 1.15 (chief's medians).

Run: ``.venv/bin/python -m benchmarks.bench_multiworker`` (about 3 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

EPOCHS, BATCH, SAMPLES = 6, 64, 1024


def worker(out: str, repeats: int) -> None:
    """One worker: interleaved plain and balanced fits; writes its timings to ``out``."""
    import numpy as np
    import tensorflow as tf

    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    from tf_balancer import BalanceCallback
    from tf_balancer._compat import keras
    from tf_balancer.demo import build_digits_cnn, compile_classifier, load_digits_data

    class EpochTimer(keras.callbacks.Callback):
        """Listed first: an epoch from before the balancer's rebalance to after its logs."""

        def __init__(self):
            super().__init__()
            self.epochs, self.start, self.train_end = [], 0.0, 0.0

        def on_epoch_begin(self, epoch, logs=None):
            self.start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.epochs.append(time.perf_counter() - self.start)

        def on_train_end(self, logs=None):
            self.train_end = time.perf_counter()

    data = load_digits_data(0)
    x, y = data.x_train[:SAMPLES], data.y_train[:SAMPLES]
    steps = SAMPLES // BATCH
    timings = {k: [] for k in ("none", "callback", "none_last_epoch", "callback_last_epoch")}
    timings["end_of_training"] = []
    for _ in range(repeats):
        for kind in ("none", "callback"):
            with strategy.scope():
                model = compile_classifier(build_digits_cnn(seed=0))
            timer, done = EpochTimer(), EpochTimer()  # done: listed last, when the balancer ends
            callbacks = [timer]
            if kind == "callback":
                callbacks.append(BalanceCallback(target=0.5, verbose=0))
            callbacks.append(done)
            model.fit(x, y, epochs=EPOCHS, batch_size=BATCH, callbacks=callbacks, verbose=0)
            timings[kind].append(steps * (EPOCHS - 1) / sum(timer.epochs[1:]))
            timings[f"{kind}_last_epoch"].append(steps / timer.epochs[-1])  # no rebalance
            if kind == "callback":
                # not until fit returns: its iterator's teardown waits for tf.data's
                # autotuning thread (see bench_pipeline.end_of_training)
                timings["end_of_training"].append(done.train_end - timer.train_end)
    result = {k: [float(v) for v in values] for k, values in timings.items()}
    result["median"] = {k: float(np.median(v)) for k, v in timings.items()}
    with open(out, "w", encoding="utf-8") as handle:
        json.dump(result, handle)


def launch(repeats: int, timeout: float) -> dict:
    """Start two workers, wait (bounded), always reap them; the chief's timings."""
    from tf_balancer.training.cluster import local_tf_configs

    with tempfile.TemporaryDirectory() as tmp:
        procs = []
        for index, config in enumerate(local_tf_configs(2)):
            env = {**os.environ, "TF_CONFIG": config, "TF_CPP_MIN_LOG_LEVEL": "2"}
            out = os.path.join(tmp, f"worker{index}.json")
            command = [sys.executable, "-m", "benchmarks.bench_multiworker", "--worker", out]
            command += ["--repeats", str(repeats)]
            log = open(os.path.join(tmp, f"worker{index}.log"), "w", encoding="utf-8")  # noqa: SIM115
            procs.append(subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT))
            log.close()
        deadline = time.monotonic() + timeout
        try:
            codes = [p.wait(timeout=max(deadline - time.monotonic(), 0.1)) for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        if codes != [0, 0]:
            with open(os.path.join(tmp, "worker0.log"), encoding="utf-8") as handle:
                raise RuntimeError(f"workers exited {codes}:\n{handle.read()[-3000:]}")
        with open(os.path.join(tmp, "worker0.json"), encoding="utf-8") as handle:
            return json.load(handle)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.repeats)
        return
    result = launch(args.repeats, timeout=1800)
    median = result["median"]
    ratio = median["none"] / median["callback"]
    verdict = "PASS" if ratio <= 1.15 else "FAIL"
    print(
        f"two workers, digits CNN, {SAMPLES} samples, global batch {BATCH}, {EPOCHS} epochs "
        f"x {args.repeats} interleaved repeats (chief's medians)"
    )
    print(f"  steps/s without callback: {median['none']:.1f}  {result['none']}")
    print(f"  steps/s with callback:    {median['callback']:.1f}  {result['callback']}")
    steady = median["none_last_epoch"] / median["callback_last_epoch"]
    print(f"  last epoch only (no rebalance): ratio {steady:.3f}")
    print(f"  end of training (compaction, report): {median['end_of_training']:.1f} s")
    print(f"{verdict}: throughput ratio without/with = {ratio:.3f}; target <= 1.15")


if __name__ == "__main__":
    main()

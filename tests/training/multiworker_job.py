"""One worker of the two-worker tests in ``test_multiworker.py`` (run as a script).

Usage: ``TF_CONFIG=... python multiworker_job.py JOB WORKDIR``

* ``criteria``: one ``fit`` per importance criterion and mode, each worker with its
  own probe batch; writes the kept channels after every rebalance and digests of
  the trained and optimized weights to ``WORKDIR/worker<i>.json``.
* ``fault``: the default ``BalanceCallback(target=0.5)`` with ``BackupAndRestore``,
  TensorBoard logs and an export; with ``KILL_AFTER_EPOCH=n`` in its environment
  the worker kills itself (SIGKILL) at the end of epoch ``n``.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

STRATEGY = tf.distribute.MultiWorkerMirroredStrategy()  # before any other TF op

from tf_balancer import BalanceCallback  # noqa: E402
from tf_balancer._compat import keras  # noqa: E402
from tf_balancer.demo import build_digits_cnn, compile_classifier, load_digits_data  # noqa: E402
from tf_balancer.sparse import wrapping  # noqa: E402

TASK = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
CRITERIA = {
    "taylor_streamed": {},
    "taylor_probe": {"importance": "taylor", "probe": True},
    "magnitude": {"importance": "magnitude"},
    "activation": {"importance": "activation", "probe": True},
    "apoz": {"importance": "apoz", "probe": True},
    "bn_scale": {"importance": "bn_scale"},
    "mix": {"importance": {"taylor": 0.5, "activation": 0.5}, "probe": True},
    "sparse_magnitude": {"importance": "magnitude", "mode": "sparse"},
}


def digest(weights) -> str:
    return hashlib.sha256(b"".join(np.ascontiguousarray(w).tobytes() for w in weights)).hexdigest()


class PlanRecorder(keras.callbacks.Callback):
    """Kept channels after each epoch's rebalance (listed after the balancer)."""

    def __init__(self, balancer, kill_after: int = -1):
        super().__init__()
        self.balancer, self.kill_after = balancer, kill_after
        self.plans: dict[int, dict[str, list[int]]] = {}

    def on_epoch_begin(self, epoch, logs=None):
        keep = self.balancer.state.keep_indices()
        self.plans[epoch] = {str(g): v.tolist() for g, v in keep.items()}

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.kill_after:  # after BackupAndRestore saved this epoch
            os.kill(os.getpid(), signal.SIGKILL)


def model_for(mode: str):
    base = build_digits_cnn(width=8, seed=0)
    if mode == "sparse":
        names = list(wrapping.prunable_kernels(base))
        base, _ = wrapping.wrap_for_pruning(
            base, {n: 0.0 for n in names}, end_step=0, frequency=1, prune_after_end=True
        )
    return compile_classifier(base)


def run_criteria(workdir: str) -> dict:
    data = load_digits_data(0)
    x, y = data.x_train[:256], data.y_train[:256]
    probe = (data.x_train[512 + 64 * TASK :][:64], data.y_train[512 + 64 * TASK :][:64])
    results = {}
    for name, spec in CRITERIA.items():
        mode = spec.get("mode", "structured")
        with STRATEGY.scope():
            model = model_for(mode)
        balancer = BalanceCallback(
            target=0.5,
            mode=mode,
            importance=spec.get("importance", "taylor"),
            probe_data=probe if spec.get("probe") else None,
            passes=["prune_channels"] if mode == "structured" else ["strip_training_ops"],
            verbose=0,
        )
        recorder = PlanRecorder(balancer)
        history = model.fit(
            x, y, epochs=4, batch_size=64, shuffle=False, callbacks=[balancer, recorder], verbose=0
        )
        rates = [k for k in history.history if k.endswith(("accuracy", "macro_recall", "macro_f1"))]
        results[name] = {
            "plans": recorder.plans,
            "trained": digest(model.get_weights()),
            "optimized": digest(balancer.optimized_model.get_weights()),
            "flops_ratio": balancer.report["final_flops_ratio"],
            "logged_rates": {k: history.history[k] for k in rates},
            "rebalances": int(balancer.state.rebalances.numpy()),
            "sparsity": history.history["balancer/sparsity"][-1],
        }
    return results


def run_fault(workdir: str) -> dict:
    tf.config.experimental.enable_op_determinism()
    data = load_digits_data(0)
    with STRATEGY.scope():
        model = model_for("structured")
    balancer = BalanceCallback(target=0.5, log_dir=os.path.join(workdir, "logs"), verbose=0)
    recorder = PlanRecorder(balancer, int(os.environ.get("KILL_AFTER_EPOCH", "-1")))
    backup = keras.callbacks.BackupAndRestore(os.path.join(workdir, "backup"))
    model.fit(
        data.x_train[:512],
        data.y_train[:512],
        epochs=5,
        batch_size=64,
        shuffle=False,
        callbacks=[backup, balancer, recorder],
        verbose=0,
    )
    balancer.export(os.path.join(workdir, "export"))
    keep = balancer.state.keep_indices()
    return {
        "plans": recorder.plans,
        "final": {str(g): v.tolist() for g, v in keep.items()},
        "rebalances": int(balancer.state.rebalances.numpy()),
        "optimized": digest(balancer.optimized_model.get_weights()),
    }


if __name__ == "__main__":
    job, workdir = sys.argv[1], sys.argv[2]
    result = {"criteria": run_criteria, "fault": run_fault}[job](workdir)
    with open(os.path.join(workdir, f"worker{TASK}.json"), "w", encoding="utf-8") as handle:
        json.dump(result, handle)

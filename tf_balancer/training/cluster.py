"""Training on several workers: one plan for all of them, files from the chief only.

Under ``tf.distribute.MultiWorkerMirroredStrategy`` every worker runs its own
copy of :class:`~tf_balancer.training.callback.BalanceCallback` in lockstep. The
weights are mirrored, but importance computed from each worker's own probe
batch is not, and a tie may break differently on two machines. So at every
rebalance:

1. scores computed from each worker's own probe batch are averaged over all
   replicas of all workers (one all-reduce): every worker balances the same
   scores (streamed Taylor sums are read summed over every replica, and weights
   are mirrored, so those scores agree without it);
2. the chief's kept channels are sent to every worker (one more all-reduce, of
   a 0/1 vector): the masks are identical even if float rounding differed.

Only the chief writes files; the other workers write to a temporary directory
next to the target and remove it, as Keras' own callbacks do (so the work, and
any collective op inside it, stays the same on every worker).

``ParameterServerStrategy`` trains asynchronously from a coordinator, where
per-batch masks cannot be kept in step with the workers' updates: it is refused.

Example:
    >>> cluster = Cluster.current()            # in a callback, inside fit's strategy scope
    >>> cluster.is_chief, cluster.num_workers
    (True, 1)
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from collections.abc import Mapping
from typing import Any

import numpy as np
import tensorflow as tf

from tf_balancer.errors import ConfigError

__all__ = ["Cluster", "SUPPORTED_STRATEGIES", "local_tf_configs", "supports"]

SUPPORTED_STRATEGIES = (
    "the default strategy, OneDeviceStrategy, MirroredStrategy and MultiWorkerMirroredStrategy"
)
_REFUSED = ("ParameterServerStrategy", "ParameterServerStrategyV2")


class Cluster:
    """This worker's place in the cluster and the two all-reduces the callback needs.

    Args:
        strategy: the ``tf.distribute`` strategy ``fit`` runs under (the default
            strategy outside any scope).
    """

    def __init__(self, strategy: Any):
        self.strategy = strategy
        spec, task_type, task_id = _cluster_of(strategy)
        self.task_type, self.task_id = task_type, task_id
        self.num_workers = max(1, len(spec.get("chief", ())) + len(spec.get("worker", ())))
        if task_type in (None, "chief"):
            self.is_chief = True
        else:  # worker 0 leads when the cluster names no chief; evaluators never do
            self.is_chief = task_type == "worker" and task_id == 0 and "chief" not in spec

    @classmethod
    def current(cls) -> Cluster:
        """The cluster of the strategy in scope.

        Raises:
            ConfigError: a strategy the callback cannot keep in step (parameter servers).
        """
        strategy = tf.distribute.get_strategy()
        if not supports(strategy):
            raise ConfigError(
                f"BalanceCallback does not support {type(strategy).__name__.removesuffix('V2')}; "
                f"it supports {SUPPORTED_STRATEGIES}"
            )
        return cls(strategy)

    @property
    def multi_worker(self) -> bool:
        return self.num_workers > 1

    # ------------------------------------------------------------ agreement
    def mean_scores(self, scores: Mapping[int, np.ndarray]) -> dict[int, np.ndarray]:
        """``scores`` averaged over every replica of every worker (unchanged on one worker)."""
        if not self.multi_worker:
            return dict(scores)
        keys = sorted(scores)
        flat = np.concatenate([np.asarray(scores[k], np.float64).ravel() for k in keys])
        values = self.strategy.experimental_distribute_values_from_function(
            lambda _: tf.constant(flat)
        )
        mean = self.strategy.reduce(tf.distribute.ReduceOp.MEAN, values, axis=None).numpy()
        return _split(mean, keys, [np.asarray(scores[k]).shape for k in keys])

    def chief_keep(
        self, keep: Mapping[int, np.ndarray] | None, sizes: Mapping[int, int]
    ) -> dict[int, np.ndarray]:
        """The chief's kept-channel indices per group, on every worker.

        ``keep`` is read on the chief only: other workers may pass None (and so
        skip computing a plan that would be discarded).
        """
        if not self.multi_worker:
            return dict(keep)
        keys = sorted(sizes)
        flat = np.zeros(sum(sizes[k] for k in keys), np.float32)
        offset = 0
        for k in keys:
            if self.is_chief:
                flat[offset + np.asarray(keep[k], np.int64)] = 1.0
            offset += sizes[k]

        def chief_only(context: Any) -> tf.Tensor:
            first = context.replica_id_in_sync_group == 0  # the chief's first replica
            return tf.constant(flat if (first and self.is_chief) else np.zeros_like(flat))

        values = self.strategy.experimental_distribute_values_from_function(chief_only)
        agreed = self.strategy.reduce(tf.distribute.ReduceOp.SUM, values, axis=None).numpy()
        parts = _split(agreed, keys, [(sizes[k],) for k in keys])
        return {k: np.flatnonzero(parts[k] > 0.5) for k in keys}

    # ---------------------------------------------------------------- files
    def write_dir(self, path: str) -> str:
        """``path`` on the chief; a temporary ``workertemp_<id>`` inside it elsewhere.

        The same layout as Keras' ``ModelCheckpoint``/``TensorBoard`` under a
        multi-worker strategy; :meth:`remove_temp` deletes it.
        """
        if self.is_chief:
            return path
        return os.path.join(path, f"workertemp_{self.task_id}")

    def write_path(self, path: str) -> str:
        """A path for a file or directory the chief writes at ``path``: ``path`` itself
        on the chief, a temporary sibling elsewhere."""
        if self.is_chief:
            return path
        parent, name = os.path.split(os.path.abspath(path))
        return os.path.join(parent, f".{name}.workertemp_{self.task_id}")

    def remove_temp(self, written: str, path: str) -> None:
        """Delete what a worker wrote at ``written`` instead of ``path`` (chief: nothing)."""
        if self.is_chief or written == path:
            return
        shutil.rmtree(written, ignore_errors=True)
        parent = os.path.dirname(written)
        if os.path.abspath(parent) == os.path.abspath(path) and os.path.isdir(parent):
            try:
                os.rmdir(parent)  # the chief's directory, created just for the temp one
            except OSError:
                pass


def supports(strategy: Any) -> bool:
    """False for strategies the callback cannot keep in step (parameter servers)."""
    return type(strategy).__name__ not in _REFUSED


def local_tf_configs(num_workers: int = 2, host: str = "127.0.0.1") -> list[str]:
    """``TF_CONFIG`` values for ``num_workers`` worker processes on this machine.

    Each worker gets a free port; set ``TF_CONFIG`` to the i-th value in the
    environment of the i-th process before it creates its strategy (worker 0 is
    the chief). For trying multi-worker training on one machine; a cluster
    scheduler writes ``TF_CONFIG`` itself.

    Example:
        >>> import json
        >>> json.loads(local_tf_configs(2)[1])["task"]
        {'type': 'worker', 'index': 1}
    """
    sockets = [socket.socket() for _ in range(num_workers)]
    try:  # all bound at once, so no two workers get the same port
        for sock in sockets:
            sock.bind((host, 0))
        addresses = [f"{host}:{sock.getsockname()[1]}" for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()
    cluster = {"worker": addresses}
    return [
        json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}})
        for i in range(num_workers)
    ]


def _cluster_of(strategy: Any) -> tuple[dict[str, list[str]], str | None, int | None]:
    """``(cluster spec, task type, task id)``; empty and None outside multi-worker training."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None:
        return {}, None, None
    spec = resolver.cluster_spec().as_dict()
    if not spec:
        config = json.loads(os.environ.get("TF_CONFIG", "{}") or "{}")
        spec = config.get("cluster", {})
    return spec, resolver.task_type, resolver.task_id


def _split(flat: np.ndarray, keys: list[int], shapes: list[tuple]) -> dict[int, np.ndarray]:
    out, offset = {}, 0
    for key, shape in zip(keys, shapes, strict=True):
        n = int(np.prod(shape))
        out[key] = flat[offset : offset + n].reshape(shape)
        offset += n
    return out

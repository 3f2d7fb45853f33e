"""First-order Taylor importance streamed from the training batches' own gradients.

:class:`GradientStream` accumulates, for every output channel of every producer,
``|sum_w w * dL/dw|`` over the weights of that channel, once per training batch
(Molchanov et al., 2019, "Importance Estimation for Neural Network Pruning"). It
is fed the ``(gradient, variable)`` pairs the optimizer applies, so it costs one
multiply-and-reduce per producer weight per step: no extra forward or backward
pass, no probe data, and the model keeps its compiled loss, optimizer and metrics.
Whatever the compiled loss is (weighted multi-output losses included), these are
its gradients.

All the sums and the batch count live in one ``ON_READ``/``SUM`` variable: under a
``tf.distribute`` strategy every replica adds its own batch, and one read sums the
replicas (a single all-reduce per rebalance on several workers). A step adds one
vector to it.

A stream is passed to :func:`~tf_balancer.attention.importance.group_scores` in
place of :class:`~tf_balancer.attention.importance.ProbeData`; the ``taylor``
criterion then reads it instead of running probe batches.

Example:
    >>> stream = GradientStream(graph)                    # doctest: +SKIP
    >>> stream.update(zip(grads, model.trainable_variables))  # inside train_step
    >>> group_scores(graph, stream, "taylor")             # doctest: +SKIP
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import tensorflow as tf

from tf_balancer._compat import assign_local, unwrap_variable
from tf_balancer.graph.layer_graph import LayerGraph
from tf_balancer.graph.layer_specs import WeightAxis, spec_for, weights_on

__all__ = ["GradientStream", "producer_weights", "weight_times_gradient"]


def producer_weights(graph: LayerGraph) -> list[tuple[str, Any, WeightAxis]]:
    """``(producer name, weight variable, its channel axis)`` of every prunable producer
    (a weight with channels on two axes, like a recurrent kernel, is listed twice)."""
    out = []
    for group in graph.prunable_groups:
        for name in group.nodes("producer"):
            node = graph.nodes[name]
            spec = spec_for(node.layer, len(node.input_shapes[0]))
            out.extend(
                (name, weight, axis) for axis, weight in weights_on(node.layer, spec.out_axes)
            )
    return out


def weight_times_gradient(weight: Any, grad: Any, axes: Iterable[int] = ()) -> tf.Tensor:
    """``w * dL/dw`` in float32: the terms first-order Taylor importance sums per channel.

    A sparse gradient (``tf.IndexedSlices``, an ``Embedding``'s) gives the products
    of the rows it touches, ``gather(w, indices) * values``: summed over every axis
    but a channel axis they equal the dense product's sums, without a
    vocabulary-sized tensor per step. ``axes``: the channel axes the products are
    summed for; a sparse gradient is made dense when one of them is axis 0 (rows).
    """
    w = tf.cast(tf.convert_to_tensor(weight), tf.float32)
    if isinstance(grad, tf.IndexedSlices):
        if 0 not in list(axes):
            return tf.gather(w, grad.indices) * tf.cast(grad.values, tf.float32)
        grad = tf.convert_to_tensor(grad)
    return w * tf.cast(grad, tf.float32)


def _sum_except(tensor: tf.Tensor, axis: int) -> tf.Tensor:
    rank = tensor.shape.rank
    return tf.reduce_sum(tensor, axis=[i for i in range(rank) if i != axis])


class GradientStream:
    """Per-channel first-order Taylor scores accumulated from applied gradients.

    Args:
        graph: the layer graph whose prunable producers are scored.
    """

    def __init__(self, graph: LayerGraph):
        self.owners = producer_weights(graph)
        self._by_variable: dict[Any, list[int]] = {}
        for i, (_, weight, _) in enumerate(self.owners):
            self._by_variable.setdefault(_key(weight), []).append(i)
        sizes: dict[str, int] = {}
        for name, weight, axis in self.owners:
            sizes.setdefault(name, int(weight.shape[axis.axis]) // axis.blocks)
        self.names = list(sizes)
        self._bounds = np.cumsum([0, *sizes.values()])  # name i: [bounds[i], bounds[i + 1])
        # The sums of every producer, then the number of batches, in one accumulator.
        self.sums = tf.Variable(
            tf.zeros(int(self._bounds[-1]) + 1, tf.float32),
            name="taylor",
            synchronization=tf.VariableSynchronization.ON_READ,
            aggregation=tf.VariableAggregation.SUM,
            trainable=False,
        )
        # 1 while a rebalance is still to come (read in the step: no retrace to turn off).
        self.active = tf.Variable(
            1.0,
            name="taylor_active",
            synchronization=tf.VariableSynchronization.ON_READ,
            aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
            trainable=False,
        )
        self.checkpoint = tf.train.Checkpoint(sums=self.sums)
        self._frozen: np.ndarray | None = None  # the sums of a snapshot()

    def set_active(self, active: bool) -> None:
        """Accumulate (True) or skip the work in the train step (False: no rebalance is
        left to use the sums, e.g. in the epochs that recover after the last one)."""
        assign_local(self.active, 1.0 if active else 0.0)

    def update(self, grads_and_vars: Iterable[tuple[Any, Any]], scale: Any = 1.0) -> None:
        """Add one batch: ``|sum over a channel's weights of w * g|`` per channel.

        Graph-mode safe (called inside the traced train step). Pairs whose variable
        is not a producer weight, or whose gradient is None, are ignored.

        Under mixed precision the loss is scaled: Keras 3 hands the optimizer
        gradients multiplied by the loss scale (``scale``; they are divided by it
        here), and a batch whose gradients overflowed (any inf/NaN) is skipped, as
        the loss-scale optimizer skips that step.

        Args:
            grads_and_vars: the ``(gradient, variable)`` pairs the optimizer applies.
            scale: the factor the gradients are multiplied by (the loss scale). Defaults to 1.
        """
        pairs = [(g, v) for g, v in grads_and_vars if g is not None]
        tf.cond(self.active > 0.5, lambda: self._accumulate(pairs, scale), lambda: None)

    def _accumulate(self, pairs: list[tuple[Any, Any]], scale: Any) -> None:
        values = [g.values if isinstance(g, tf.IndexedSlices) else g for g, _ in pairs]
        finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(g)) for g in values] or [True])
        per_channel: dict[str, tf.Tensor] = {}
        for grad, var in pairs:
            owners = self._by_variable.get(_key(var), ())
            if not owners:
                continue
            weight = self.owners[owners[0]][1]  # one product per variable, however many axes
            axes = [self.owners[i][2].axis for i in owners]
            product = weight_times_gradient(weight, grad, axes)
            for index in owners:
                name, _, axis = self.owners[index]
                contribution = _sum_except(product, axis.axis)
                if axis.blocks > 1:
                    contribution = tf.reduce_sum(tf.reshape(contribution, (axis.blocks, -1)), 0)
                per_channel[name] = (
                    per_channel[name] + contribution if name in per_channel else contribution
                )
        parts = [
            per_channel[name] if name in per_channel else tf.zeros(self._size(i), tf.float32)
            for i, name in enumerate(self.names)
        ]
        batch = tf.abs(tf.concat(parts, 0)) / tf.cast(scale, tf.float32)
        batch = tf.concat([batch, tf.ones(1, tf.float32)], 0)  # the batch count
        self.sums.assign_add(tf.where(finite, batch, tf.zeros_like(batch)))

    def _size(self, index: int) -> int:
        return int(self._bounds[index + 1] - self._bounds[index])

    def _read(self) -> np.ndarray:
        # Under a strategy every read of the sums is an all-reduce (across workers too).
        return self._frozen if self._frozen is not None else self.sums.numpy()

    def snapshot(self) -> GradientStream:
        """A read-only copy of the stream as it is now: its :attr:`batches` and
        :meth:`scores` come from one read of the sums (one all-reduce on several
        workers) instead of one each."""
        frozen = copy.copy(self)
        frozen._frozen = np.array(self.sums.numpy())
        return frozen

    @property
    def batches(self) -> int:
        """Training batches accumulated since the last :meth:`reset`."""
        return int(round(float(self._read()[-1])))

    def scores(self) -> dict[str, np.ndarray]:
        """Producer name -> float64 per-channel scores accumulated so far."""
        flat = self._read().astype(np.float64)
        bounds = self._bounds
        return {name: flat[bounds[i] : bounds[i + 1]] for i, name in enumerate(self.names)}

    def reset(self) -> None:
        """Start a new accumulation window (e.g. after a rebalance)."""
        assign_local(self.sums, tf.zeros(self.sums.shape, tf.float32))  # every replica's sums

    def load(self, scores: Mapping[str, np.ndarray], batches: int = 0) -> None:
        """Set the accumulators (tests and checkpoint restore)."""
        flat = np.array(self.sums.numpy(), np.float32)
        for i, name in enumerate(self.names):
            if name in scores:
                flat[self._bounds[i] : self._bounds[i + 1]] = np.asarray(scores[name], np.float32)
        flat[-1] = batches
        self.sums.assign(flat)


def _key(variable: Any) -> Any:
    """A hashable identity for a variable, the same for a Keras 3 variable and its value."""
    target = unwrap_variable(variable)
    handle = getattr(target, "_unique_id", None)
    return handle if handle is not None else id(target)

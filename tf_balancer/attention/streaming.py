"""First-order Taylor importance streamed from the training batches' own gradients.

:class:`GradientStream` accumulates, for every output channel of every producer,
``|sum_w w * dL/dw|`` over the weights of that channel, once per training batch
(Molchanov et al., 2019, "Importance Estimation for Neural Network Pruning"). It
is fed the ``(gradient, variable)`` pairs the optimizer applies, so it costs one
multiply-and-reduce per producer weight per step: no extra forward or backward
pass, no probe data, and the model keeps its compiled loss, optimizer and metrics.
Whatever the compiled loss is (weighted multi-output losses included), these are
its gradients.

The accumulators are ``ON_READ``/``SUM`` variables: under a ``tf.distribute``
strategy every replica adds its own batch, and reading sums the replicas.

A stream is passed to :func:`~tf_balancer.attention.importance.group_scores` in
place of :class:`~tf_balancer.attention.importance.ProbeData`; the ``taylor``
criterion then reads it instead of running probe batches.

Example:
    >>> stream = GradientStream(graph)                    # doctest: +SKIP
    >>> stream.update(zip(grads, model.trainable_variables))  # inside train_step
    >>> group_scores(graph, stream, "taylor")             # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import tensorflow as tf

from tf_balancer.graph.layer_graph import LayerGraph
from tf_balancer.graph.layer_specs import WeightAxis, spec_for, weights_on

__all__ = ["GradientStream", "producer_weights"]


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
        sizes = {
            name: int(weight.shape[axis.axis]) // axis.blocks for name, weight, axis in self.owners
        }
        accumulate = {
            "synchronization": tf.VariableSynchronization.ON_READ,
            "aggregation": tf.VariableAggregation.SUM,
            "trainable": False,
        }
        self.scores_var = {
            name: tf.Variable(tf.zeros(sizes[name], tf.float32), name="taylor", **accumulate)
            for name in sizes
        }
        self.steps = tf.Variable(0, dtype=tf.int64, name="taylor_steps", **accumulate)
        self.checkpoint = tf.train.Checkpoint(scores=dict(self.scores_var), steps=self.steps)

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
        dense = [g for g, _ in pairs if not isinstance(g, tf.IndexedSlices)]
        finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(g)) for g in dense] or [True])
        inverse = 1.0 / tf.cast(scale, tf.float32)
        per_channel: dict[str, tf.Tensor] = {}
        for grad, var in pairs:
            if isinstance(grad, tf.IndexedSlices):
                continue
            owners = self._by_variable.get(_key(var), ())
            if not owners:
                continue
            weight = self.owners[owners[0]][1]  # one product per variable, however many axes
            product = tf.cast(tf.convert_to_tensor(weight), tf.float32) * tf.cast(grad, tf.float32)
            for index in owners:
                name, _, axis = self.owners[index]
                contribution = _sum_except(product, axis.axis) * inverse
                if axis.blocks > 1:
                    contribution = tf.reduce_sum(tf.reshape(contribution, (axis.blocks, -1)), 0)
                per_channel[name] = (
                    per_channel[name] + contribution if name in per_channel else contribution
                )
        for name, value in per_channel.items():
            value = tf.where(finite, tf.abs(value), tf.zeros_like(value))
            self.scores_var[name].assign_add(value)
        self.steps.assign_add(tf.cast(finite, tf.int64))

    @property
    def batches(self) -> int:
        """Training batches accumulated since the last :meth:`reset`."""
        return int(self.steps.numpy())

    def scores(self) -> dict[str, np.ndarray]:
        """Producer name -> float64 per-channel scores accumulated so far."""
        return {name: var.numpy().astype(np.float64) for name, var in self.scores_var.items()}

    def reset(self) -> None:
        """Start a new accumulation window (e.g. after a rebalance)."""
        for var in self.scores_var.values():
            var.assign(tf.zeros_like(var))
        self.steps.assign(0)

    def load(self, scores: Mapping[str, np.ndarray]) -> None:
        """Set the accumulators (tests and checkpoint restore)."""
        for name, value in scores.items():
            self.scores_var[name].assign(np.asarray(value, np.float32))


def _key(variable: Any) -> Any:
    """A hashable identity for a variable, the same for a Keras 3 variable and its value."""
    value = getattr(variable, "value", None)
    target = value if isinstance(value, tf.Variable) else variable
    handle = getattr(target, "_unique_id", None)
    return handle if handle is not None else id(target)

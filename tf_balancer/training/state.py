"""State the callback keeps during ``fit``: kept channels, targets, history.

The state lives in ``tf.Variable``\\ s grouped in a ``tf.train.Checkpoint`` that
is attached to the model as ``model._tf_balancer_state``: it is then saved and
restored with the model's TF-format checkpoints (``BackupAndRestore``,
``ModelCheckpoint`` with TF-format weights) without appearing in
``model.weights``; on a Keras 3 model a Keras saveable attached next to it
carries the same variables in Keras 3's weight files (its ``BackupAndRestore``
writes ``.weights.h5``).

Masks are re-applied after every training batch by one ``tf.function`` whose
mask tensors are variables too, so a rebalance changes values, never the
traced function: nothing is recompiled.

The target ramp itself is :func:`tf_balancer.training.ramp.polynomial_ramp`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import tensorflow as tf

from tf_balancer._compat import (
    assign_local,
    is_keras3_object,
    keras3_weights_saveable,
    local_copies,
    unwrap_variable,
)
from tf_balancer.attention.balance import KeepPlan
from tf_balancer.attention.masks import channel_masks
from tf_balancer.graph.layer_graph import LayerGraph
from tf_balancer.graph.layer_specs import weight_of

__all__ = ["BalanceState", "MaskApplier"]

STATE_ATTRIBUTE = "_tf_balancer_state"


class BalanceState:
    """Checkpointable callback state for one model and its prunable groups."""

    def __init__(self, group_sizes: Mapping[int, int], max_rebalances: int):
        self.group_ids = sorted(group_sizes)
        self.keep = {
            g: tf.Variable(tf.ones([n]), trainable=False, name=f"keep_{g}")
            for g, n in group_sizes.items()
        }
        self.epoch = tf.Variable(-1, trainable=False, dtype=tf.int64, name="last_rebalance")
        self.target = tf.Variable(1.0, trainable=False, dtype=tf.float64, name="target")
        self.rebalances = tf.Variable(0, trainable=False, dtype=tf.int64, name="rebalances")
        shape = [max(max_rebalances, 1), max(len(self.group_ids), 1)]
        self.attention = tf.Variable(tf.zeros(shape, tf.float64), trainable=False, name="attention")
        self.checkpoint = tf.train.Checkpoint(
            keep={str(g): v for g, v in self.keep.items()},
            epoch=self.epoch,
            target=self.target,
            rebalances=self.rebalances,
            attention=self.attention,
        )

    def track(self, name: str, trackable: Any) -> None:
        """Save and restore ``trackable`` (e.g. the streamed Taylor sums) with the state."""
        setattr(self.checkpoint, name, trackable)

    def untrack(self, name: str) -> None:
        """Stop saving ``name`` with the state (e.g. once training is over)."""
        if hasattr(self.checkpoint, name):
            delattr(self.checkpoint, name)

    def attach(self, model: Any) -> None:
        """Save and restore this state with ``model``'s checkpoints: TF-format ones
        (tf_keras) through the ``tf.train.Checkpoint``, Keras 3's weight files
        (``BackupAndRestore``, ``save_weights``) through a Keras saveable."""
        setattr(model, STATE_ATTRIBUTE, self.checkpoint)
        if is_keras3_object(model):
            setattr(model, STATE_ATTRIBUTE + "_keras", keras3_weights_saveable(self.variables))

    def variables(self) -> list[tf.Variable]:
        """Every variable of the state and of what it tracks, in a fixed order."""
        found = tf.train.TrackableView(self.checkpoint).descendants()
        return [v for v in found if isinstance(v, tf.Variable)]

    def keep_indices(self) -> dict[int, np.ndarray]:
        return {g: np.flatnonzero(v.numpy() > 0.5) for g, v in self.keep.items()}

    def record(
        self,
        epoch: int,
        target: float,
        keep: Mapping[int, np.ndarray],
        attention: Mapping[int, float],
    ) -> None:
        for g, var in self.keep.items():
            vector = np.zeros(var.shape, dtype=np.float32)
            vector[keep[g]] = 1.0
            var.assign(vector)
        row = int(self.rebalances.numpy())
        if row < self.attention.shape[0]:
            values = [attention.get(g, 0.0) for g in self.group_ids]
            history = self.attention.numpy()  # whole-variable assign: works for mirrored vars
            history[row, : len(values)] = values
            self.attention.assign(history)
        self.rebalances.assign_add(1)
        self.epoch.assign(epoch)
        self.target.assign(target)

    def attention_history(self) -> np.ndarray:
        return self.attention.numpy()[: min(int(self.rebalances.numpy()), self.attention.shape[0])]


class MaskApplier:
    """Multiplies masked weights by their masks after each update.

    During ``fit`` the multiply runs inside the train step itself (see
    :class:`~tf_balancer.training.hooks.FitHooks`), under a ``tf.distribute``
    strategy too.
    """

    def __init__(self, graph: LayerGraph):
        self.graph = graph
        everything = KeepPlan(
            {g.id: np.arange(0) for g in graph.prunable_groups},
            {g.id: g.size for g in graph.prunable_groups},
        )
        keys = sorted(channel_masks(graph, everything))  # every weight any plan may mask
        self.weights = [weight_of(graph.nodes[node].layer, attr) for node, attr in keys]
        self.keys = keys
        self.masks = [
            tf.Variable(tf.ones(w.shape, w.dtype), trainable=False, name="mask")
            for w in self.weights
        ]
        self.active = False

    def set_plan(self, plan: Any) -> None:
        """Load the masks of ``plan`` (new values only; no retracing)."""
        masks = channel_masks(self.graph, plan)
        for key, mask in zip(self.keys, self.masks, strict=True):
            value = masks.get(key)
            value = np.ones(mask.shape, mask.dtype.as_numpy_dtype) if value is None else value
            assign_local(mask, value)
        self.active = bool(masks)

    def apply(self) -> None:
        """Mask every weight now, eagerly (between batches).

        Under a ``tf.distribute`` strategy each device's copy of a mirrored weight
        is masked directly: every worker runs this at the same point with the same
        masks, as a mirrored update from cross-replica context would, without its
        per-weight dispatch cost.
        """
        if not self.active:
            return
        for weight, mask in zip(self.weights, self.masks, strict=True):
            value = tf.convert_to_tensor(mask)
            for copy in local_copies(weight):
                copy.assign(copy * value)

    def apply_in_step(self) -> None:
        """Mask the trainable weights inside the traced train step, after the update.

        Only what the optimizer changes is masked here; non-trainable weights (a
        BatchNorm's moving statistics) are masked by :meth:`apply` at each
        rebalance and stay at zero, since a pruned channel's input is zero. (Where
        it is not - a sigmoid between conv and BatchNorm - the masked scale and
        offset still zero the channel's output.)

        Unconditional (the masks are all ones before the first rebalance), since a
        Python flag would be frozen into the trace. Under a ``tf.distribute``
        strategy the step runs per replica, and mirrored weights are updated the
        way the optimizer updates them: once, from cross-replica context
        (``merge_call``), on every device.
        """
        if not tf.distribute.has_strategy():
            for weight, mask in self._trainable():
                weight.assign(weight * mask)
            return
        tf.distribute.get_replica_context().merge_call(self._apply_mirrored)

    def _trainable(self) -> list[tuple[Any, tf.Variable]]:
        pairs = zip(self.weights, self.masks, strict=True)
        return [(weight, mask) for weight, mask in pairs if weight.trainable]

    def _apply_mirrored(self, strategy: Any) -> None:
        for weight, mask in self._trainable():
            strategy.extended.update(
                unwrap_variable(weight), lambda w, m: w.assign(w * m), args=(mask,), group=False
            )

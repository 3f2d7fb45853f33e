"""What the callback adds inside ``fit``'s own train and test steps, and takes away after.

Keras callbacks see neither gradients nor labels. Two documented extension points
of ``Model`` do: the optimizer's update (``apply_gradients`` in tf_keras; ``apply``
in Keras 3, which its ``apply_gradients`` and custom train steps call) and
``Model.compute_metrics`` (called by ``train_step`` and ``test_step``; Keras
documents overriding it to add metrics). :class:`FitHooks` wraps both *on the
instances*, for the duration of one ``fit``, so that

* the :class:`~tf_balancer.attention.streaming.GradientStream` receives every
  training batch's gradients (streamed Taylor importance), and
* task metrics (macro recall and F1 for classifiers) accumulate on the batches
  ``fit`` already runs, and are read once per epoch and once per evaluation where
  Keras builds those logs from its own metrics' results (the adapter's
  ``epoch_logs_method``). History, CSVLogger, TensorBoard and the progress bar's
  epoch line get ``macro_recall``/``macro_f1`` and, on
  ``validation_data``/``validation_split``, ``val_macro_recall``/``val_macro_f1``.
  The step's own outputs are unchanged, so no per-step read (and, under a
  multi-worker strategy, no per-step all-reduce) is added, and Keras keeps
  taking the epoch's logs from its correctly aggregated metrics.

No extra forward or backward pass runs, and nothing is recompiled: the train and
test functions are re-traced (``make_train_function(force=True)``) so the wrappers
are part of them, and re-traced again when the hooks are removed. The compiled
loss, the optimizer's state and the user's metrics are untouched.

Example:
    >>> hooks = FitHooks(model, stream, metrics)  # doctest: +SKIP
    >>> hooks.install(); ...; hooks.remove()      # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import tensorflow as tf

from tf_balancer._compat import adapter_for
from tf_balancer.attention.streaming import GradientStream

__all__ = ["FitHooks"]


class FitHooks:
    """Instance-level wrappers around the optimizer's update, ``compute_metrics`` and the
    method that builds epoch logs.

    Args:
        model: the compiled model being trained.
        stream: receives each batch's ``(gradient, variable)`` pairs, or None.
        after_update: run inside the train step right after the optimizer's
            update (the channel masks), or None.
        metrics: Keras metrics updated with ``(y, y_pred, sample_weight)`` of
            every train and test batch; reset by :meth:`reset_metrics`.
    """

    def __init__(
        self,
        model: Any,
        stream: GradientStream | None,
        metrics: Sequence[Any],
        after_update: Callable[[], None] | None = None,
    ):
        self.model = model
        self.stream = stream
        self.metrics = list(metrics)
        self.after_update = after_update
        self.batch_size = tf.Variable(0, dtype=tf.int64, trainable=False, name="batch_size")
        self.updates = tf.Variable(
            0,
            dtype=tf.int64,
            trainable=False,
            name="optimizer_updates",
            aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
        )
        """Optimizer updates the wrapper saw: 0 after a train step means the step
        updates the weights some other way (a custom ``train_step``)."""
        self.metric_updates = tf.Variable(
            0,
            dtype=tf.int64,
            trainable=False,
            name="task_metric_updates",
            aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
        )
        """Batches the task metrics saw since their reset: 0 when a custom
        ``train_step`` does not call ``compute_metrics`` (their keys are then left out)."""
        self._update_method = ""
        self._optimizer = None
        self._epoch_logs = ""
        self.installed = False

    def install(self) -> None:
        """Wrap the optimizer and the model, then re-trace the train and test functions."""
        if self.installed:
            return
        if self.stream is not None or self.after_update is not None:
            self._optimizer = self.model.optimizer
            adapter = adapter_for(self.model)
            self._update_method = adapter.optimizer_update_method
            original = getattr(self._optimizer, self._update_method)
            stream, after_update = self.stream, self.after_update
            optimizer, updates = self._optimizer, self.updates

            def update(*args, **kwargs):
                args, pairs = adapter.gradient_pairs(optimizer, args, kwargs)
                if stream is not None:  # before the update, which may change the loss scale
                    stream.update(pairs, scale=adapter.gradient_scale(optimizer))
                result = original(*args, **kwargs)
                if after_update is not None:  # tf.function keeps stateful ops in order
                    after_update()
                updates.assign_add(1)
                return result

            setattr(self._optimizer, self._update_method, update)
        original_metrics = self.model.compute_metrics

        def compute_metrics(x, y, y_pred, sample_weight=None):
            results = original_metrics(x, y, y_pred, sample_weight)
            self._update(y, y_pred, sample_weight)
            return results

        self.model.compute_metrics = compute_metrics
        self._epoch_logs = adapter_for(self.model).epoch_logs_method
        original_logs = getattr(self.model, self._epoch_logs)

        def epoch_logs(logs):
            logs = original_logs(logs)
            if not self.metrics or not isinstance(logs, dict) or not self.metric_updates.numpy():
                return logs
            return {**logs, **{m.name: float(m.result()) for m in self.metrics}}

        setattr(self.model, self._epoch_logs, epoch_logs)
        self.installed = True
        _retrace(self.model)

    def _update(self, y: Any, y_pred: Any, sample_weight: Any) -> None:
        rows = tf.shape(tf.nest.flatten(y_pred)[0], out_type=tf.int64)[0]
        self.batch_size.assign(tf.maximum(self.batch_size, rows))
        for metric in self.metrics:
            metric.update_state(y, y_pred, sample_weight)
        self.metric_updates.assign_add(1)

    def reset_metrics(self) -> None:
        """Zero the task metrics (at each epoch's and each evaluation's start)."""
        for metric in self.metrics:
            metric.reset_state()
        self.metric_updates.assign(0)

    def remove(self) -> None:
        """Take the wrappers off and re-trace, so later ``fit``/``evaluate`` calls are plain."""
        if not self.installed:
            return
        if self._optimizer is not None:
            self._optimizer.__dict__.pop(self._update_method, None)
        self.model.__dict__.pop("compute_metrics", None)
        self.model.__dict__.pop(self._epoch_logs, None)
        self.installed = False
        _retrace(self.model)


def _retrace(model: Any) -> None:
    """Rebuild the train function now (``fit`` holds it) and the test function on next use."""
    function = model.make_train_function(force=True)
    if function is not None:  # tf_keras returns it; Keras 3 sets model.train_function
        model.train_function = function
    model.test_function = None

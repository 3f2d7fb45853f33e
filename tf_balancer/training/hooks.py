"""What the callback adds inside ``fit``'s own train and test steps, and takes away after.

Keras callbacks see neither gradients nor labels. Two documented extension points
of ``Model`` do: the optimizer's ``apply_gradients`` (called by ``train_step`` in
tf_keras and in Keras 3) and ``Model.compute_metrics`` (called by ``train_step``
and ``test_step``; Keras documents overriding it to add metrics). :class:`FitHooks`
wraps both *on the instances*, for the duration of one ``fit``, so that

* the :class:`~tf_balancer.attention.streaming.GradientStream` receives every
  training batch's gradients (streamed Taylor importance), and
* task metrics (macro recall and F1 for classifiers) are updated on the batches
  ``fit`` already runs; Keras then logs them as ``macro_recall`` and, on
  ``validation_data``/``validation_split``, ``val_macro_recall`` — in History,
  CSVLogger and TensorBoard like any compiled metric. ``Model.get_metrics_result``
  is wrapped too: Keras takes an epoch's logs from it (the metrics' own, correctly
  aggregated values; under a multi-worker strategy the step's values are summed
  over the workers) only when its keys are the step's keys.

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
    """Instance-level wrappers around ``apply_gradients`` and ``compute_metrics``.

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
        self._optimizer = None
        self.installed = False

    def install(self) -> None:
        """Wrap the optimizer and the model, then re-trace the train and test functions."""
        if self.installed:
            return
        if self.stream is not None or self.after_update is not None:
            self._optimizer = self.model.optimizer
            original_apply = self._optimizer.apply_gradients
            stream, after_update = self.stream, self.after_update
            optimizer, adapter = self._optimizer, adapter_for(self.model)

            def apply_gradients(grads_and_vars, *args, **kwargs):
                pairs = list(grads_and_vars)
                if stream is not None:  # before the update, which may change the loss scale
                    stream.update(pairs, scale=adapter.gradient_scale(optimizer))
                result = original_apply(pairs, *args, **kwargs)
                if after_update is not None:  # tf.function keeps stateful ops in order
                    after_update()
                return result

            self._optimizer.apply_gradients = apply_gradients
        original_metrics = self.model.compute_metrics

        def compute_metrics(x, y, y_pred, sample_weight=None):
            results = original_metrics(x, y, y_pred, sample_weight)
            return self._update(results, y, y_pred, sample_weight)

        self.model.compute_metrics = compute_metrics
        original_results = self.model.get_metrics_result

        def get_metrics_result():
            # Keras reads the epoch's logs from here when its keys match the step's
            # (under multi-worker strategies the step's values are summed over workers).
            results = dict(original_results())
            results.update({metric.name: metric.result() for metric in self.metrics})
            return results

        self.model.get_metrics_result = get_metrics_result
        self.installed = True
        _retrace(self.model)

    def _update(self, results: Any, y: Any, y_pred: Any, sample_weight: Any) -> Any:
        rows = tf.shape(tf.nest.flatten(y_pred)[0], out_type=tf.int64)[0]
        self.batch_size.assign(tf.maximum(self.batch_size, rows))
        if not self.metrics or not isinstance(results, dict):
            return results
        results = dict(results)
        for metric in self.metrics:
            metric.update_state(y, y_pred, sample_weight)
            results[metric.name] = metric.result()
        return results

    def reset_metrics(self) -> None:
        """Zero the task metrics (at each epoch's and each evaluation's start)."""
        for metric in self.metrics:
            metric.reset_state()

    def remove(self) -> None:
        """Take the wrappers off and re-trace, so later ``fit``/``evaluate`` calls are plain."""
        if not self.installed:
            return
        if self._optimizer is not None:
            self._optimizer.__dict__.pop("apply_gradients", None)
        self.model.__dict__.pop("compute_metrics", None)
        self.model.__dict__.pop("get_metrics_result", None)
        self.installed = False
        _retrace(self.model)


def _retrace(model: Any) -> None:
    """Rebuild the train function now (``fit`` holds it) and the test function on next use."""
    function = model.make_train_function(force=True)
    if function is not None:  # tf_keras returns it; Keras 3 sets model.train_function
        model.train_function = function
    model.test_function = None

"""A tfmot pruning schedule whose target sparsity is a ``tf.Variable``.

:class:`VariablePolynomialDecay` is what :func:`~tf_balancer.sparse.wrapping.wrap_for_pruning`
gives every wrapped layer, so the balancer can move a layer's target mid-``fit``
without recompiling. It is re-exported by :mod:`tf_balancer.sparse.wrapping` and
registered with Keras as ``tf_balancer>VariablePolynomialDecay``.

Example:
    >>> schedule = VariablePolynomialDecay(0.0, 0.5, begin_step=0, end_step=10)
    >>> _ = schedule.final_sparsity.assign(0.8)  # e.g. from a callback, mid-fit
    >>> round(float(schedule(tf.constant(10, tf.int64))[1]), 6)
    0.8
"""

from __future__ import annotations

from typing import Any

import tensorflow as tf

from tf_balancer._compat import keras
from tf_balancer.config.checks import check_sparsity
from tf_balancer.errors import ConfigError
from tf_balancer.sparse._tfmot import tfmot

__all__ = ["VariablePolynomialDecay"]


@keras.utils.register_keras_serializable(package="tf_balancer")
class VariablePolynomialDecay(tfmot.sparsity.keras.PruningSchedule):
    """tfmot's ``PolynomialDecay`` whose final sparsity is a ``tf.Variable``.

    ``sparsity(step) = final + (initial - final) * (1 - p) ** power`` with
    ``p = clip((step - begin_step) / (end_step - begin_step), 0, 1)`` (``p = 1``
    from ``begin_step`` on when ``begin_step == end_step``); masks are updated
    every ``frequency`` steps in ``[begin_step, end_step]`` (tfmot's rule), or
    from ``begin_step`` on with ``prune_after_end=True``. ``__call__`` reads
    :attr:`final_sparsity` inside the graph, so assigning the variable changes
    the target of an already compiled ``train_function``: no recompile. The new
    target takes effect at the next mask update: after ``end_step`` only with
    ``prune_after_end=True``.

    Args:
        initial_sparsity: sparsity at ``begin_step``, in [0, 1). Defaults to 0.
        final_sparsity: a float in [0, 1) (a new variable is made) or a scalar
            float32 ``tf.Variable`` to share.
        begin_step: first pruning step, >= 0. Defaults to 0.
        end_step: step at which ``final_sparsity`` is reached. Defaults to 1000.
        power: exponent of the decay. Defaults to 3.
        frequency: steps between mask updates, > 0. Defaults to 100.
        prune_after_end: keep updating masks (at the final sparsity) after
            ``end_step``, so later target changes apply. Defaults to False.

    Raises:
        ConfigError: for an invalid sparsity or step range.

    Example:
        >>> schedule = VariablePolynomialDecay(0.0, 0.5, begin_step=0, end_step=10)
        >>> float(schedule(tf.constant(10, tf.int64))[1])
        0.5
    """

    def __init__(
        self,
        initial_sparsity: float = 0.0,
        final_sparsity: float | tf.Variable = 0.5,
        begin_step: int = 0,
        end_step: int = 1000,
        power: float = 3,
        frequency: int = 100,
        prune_after_end: bool = False,
    ) -> None:
        if not 0 <= int(begin_step) <= int(end_step) or int(frequency) <= 0:
            raise ConfigError(
                f"need 0 <= begin_step <= end_step and frequency > 0, got begin_step="
                f"{begin_step}, end_step={end_step}, frequency={frequency}"
            )
        self.initial_sparsity = check_sparsity("initial_sparsity", initial_sparsity)
        if not isinstance(final_sparsity, tf.Variable):
            value = check_sparsity("final_sparsity", final_sparsity)
            final_sparsity = tf.Variable(value, trainable=False, dtype=tf.float32)
        self.final_sparsity = final_sparsity
        self.begin_step, self.end_step = int(begin_step), int(end_step)
        self.power, self.frequency = power, int(frequency)
        self.prune_after_end = bool(prune_after_end)

    def __call__(self, step: Any) -> tuple[tf.Tensor, tf.Tensor]:
        with tf.name_scope("variable_polynomial_decay_pruning_schedule"):
            offset = tf.cast(step - self.begin_step, tf.float32)
            span = self.end_step - self.begin_step
            if span == 0:
                p = tf.cast(offset >= 0.0, tf.float32)
            else:
                p = tf.clip_by_value(offset / float(span), 0.0, 1.0)
            final = tf.cast(self.final_sparsity, tf.float32)  # read at run time
            decay = tf.pow(1.0 - p, float(self.power))
            sparsity = final + (self.initial_sparsity - final) * decay
        should_prune = self._should_prune_in_step(
            step, self.begin_step, -1 if self.prune_after_end else self.end_step, self.frequency
        )
        return should_prune, sparsity

    def get_config(self) -> dict[str, Any]:
        """tfmot's schedule config; ``final_sparsity`` is the variable's current value."""
        return {
            "class_name": keras.utils.get_registered_name(type(self)),
            "config": {
                "initial_sparsity": self.initial_sparsity,
                "final_sparsity": float(self.final_sparsity.numpy()),
                "begin_step": self.begin_step,
                "end_step": self.end_step,
                "power": self.power,
                "frequency": self.frequency,
                "prune_after_end": self.prune_after_end,
            },
        }

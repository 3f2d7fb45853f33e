"""``fit`` with a ``train_step`` of the user's own, written the ways Keras' guides write it."""

from __future__ import annotations

import logging
import warnings

import keras as keras3
import numpy as np
import pytest
import tensorflow as tf

import tf_balancer as tfb
from tf_balancer._compat import keras
from tf_balancer.demo import load_digits_data


def _data():
    d = load_digits_data(seed=0)
    return d.x_train[:192], d.y_train[:192], d.x_val[:64], d.y_val[:64]


class GuideStepApply(keras3.Model):
    """Keras 3's guide: ``self.optimizer.apply(grads, variables)``, no ``compute_metrics``."""

    def train_step(self, data):
        x, y = data
        with tf.GradientTape() as tape:
            loss = self.compute_loss(y=y, y_pred=self(x, training=True))
        self.optimizer.apply(
            tape.gradient(loss, self.trainable_variables), self.trainable_variables
        )
        return {"loss": loss}


class StepAssignsWeights(keras3.Model):
    """Plain SGD by ``assign_sub``: the optimizer never sees the update."""

    def train_step(self, data):
        x, y = data
        with tf.GradientTape() as tape:
            loss = self.compute_loss(y=y, y_pred=self(x, training=True))
        for var, grad in zip(
            self.trainable_variables, tape.gradient(loss, self.trainable_variables), strict=True
        ):
            var.assign_sub(0.05 * grad)
        return {"loss": loss}


class GuideStepCompiledMetrics(keras.Model):
    """tf_keras' guide: ``apply_gradients`` and ``compiled_metrics``, no ``compute_metrics``."""

    def train_step(self, data):
        x, y = data
        with tf.GradientTape() as tape:
            y_pred = self(x, training=True)
            loss = self.compiled_loss(y, y_pred)
        grads = tape.gradient(loss, self.trainable_variables)
        self.optimizer.apply_gradients(zip(grads, self.trainable_variables, strict=True))
        self.compiled_metrics.update_state(y, y_pred)
        return {m.name: m.result() for m in self.metrics}


def _cnn(kx, cls):
    kx.utils.set_random_seed(0)
    inp = kx.Input((16, 16, 1))
    y = kx.layers.Conv2D(16, 3, padding="same", activation="relu", name="conv_a")(inp)
    y = kx.layers.Conv2D(32, 3, padding="same", activation="relu", name="conv_b")(y)
    y = kx.layers.Flatten()(kx.layers.MaxPooling2D()(y))
    model = cls(inp, kx.layers.Dense(10)(kx.layers.Dense(32, activation="relu")(y)))
    model.compile("adam", kx.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def _fit(model, **callback_args):
    x, y, xv, yv = _data()
    callback = tfb.BalanceCallback(verbose=0, **callback_args)
    history = model.fit(x, y, validation_data=(xv, yv), epochs=4, batch_size=32, verbose=0,
                        callbacks=[callback])  # fmt: skip
    return callback, history, xv


def _zero_channels(model, name):
    kernel = model.get_layer(name).kernel.numpy()
    return int((np.abs(kernel).reshape(-1, kernel.shape[-1]).sum(0) == 0).sum())


def test_a_keras3_step_calling_optimizer_apply_streams_and_masks_in_step(caplog):
    """Before: the wrapper sat on ``apply_gradients`` only; this step bypassed it, every
    rebalance fell back to magnitude, masked channels regrew under Adam, and the
    optimized model differed from the trained one by 0.2, with no warning."""
    model = _cnn(keras3, GuideStepApply)
    with caplog.at_level(logging.INFO, logger="tf_balancer"):
        callback, _, xv = _fit(model)
    assert callback.stream is not None
    assert not [r for r in caplog.records if "no training batch seen" in r.getMessage()]
    assert (
        _zero_channels(model, "conv_a") == 16 - callback.optimized_model.get_layer("conv_a").filters
    )
    np.testing.assert_allclose(
        callback.optimized_model.predict(xv, verbose=0), model.predict(xv, verbose=0), 1e-4, 1e-4
    )


def test_a_step_that_assigns_weights_itself_is_named_and_still_compacts_exactly():
    model = _cnn(keras3, StepAssignsWeights)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        callback, _, xv = _fit(model)
    messages = [str(w.message) for w in caught if "model.optimizer" in str(w.message)]
    assert len(messages) == 1 and "apply_gradients" in messages[0]
    assert callback.report["final_flops_ratio"] <= 0.505
    np.testing.assert_allclose(
        callback.optimized_model.predict(xv, verbose=0), model.predict(xv, verbose=0), 1e-4, 1e-4
    )


@pytest.mark.parametrize("kx, cls", [(keras, GuideStepCompiledMetrics), (keras3, GuideStepApply)])
def test_macro_scores_are_left_out_when_the_step_does_not_compute_metrics(kx, cls):
    """Before: ``macro_f1`` 0.0 every epoch while accuracy rose. The validation ones,
    from Keras' own ``test_step``, stay."""
    _, history, _ = _fit(_cnn(kx, cls))
    assert "macro_f1" not in history.history and "macro_recall" not in history.history
    assert len(history.history["val_macro_f1"]) == 4
    assert max(history.history["val_macro_f1"]) > 0.0

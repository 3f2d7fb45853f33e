"""Training the masked network is training the compacted one.

Masks set at epoch 0 (magnitude, nothing trained yet) and a ``fit`` with the
callback must follow, loss for loss, the ``fit`` of the small model that
``tfb.prune`` cuts out of the same initial weights: the masks touch nothing the
kept channels compute with, and the optimizer's updates of the kept weights are
those of the small model. Checked on a Keras 3 LSTM and a tf_keras CNN with
BatchNormalization (whose statistics of masked channels must stay out of the way).
"""

from __future__ import annotations

import keras as keras3
import numpy as np
import pytest
import tf_keras

import tf_balancer as tfb
from tf_balancer.demo import load_digits_data
from tf_balancer.demo_sequences import build_digits_lstm, load_digit_sequences

EPOCHS = 3


def _compiled(k, model):
    # SGD with momentum: Adam would divide float round-off in near-zero gradients
    # (a conv bias before BatchNorm) by their own size and make it visible.
    model.compile(
        k.optimizers.SGD(0.05, momentum=0.9),
        k.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


def _cnn():
    """Conv+BN+ReLU with a residual block, no dropout (its random masks would differ)."""
    tf_keras.utils.set_random_seed(0)
    layers = tf_keras.layers
    inp = tf_keras.Input((16, 16, 1))
    x = layers.ReLU()(layers.BatchNormalization()(layers.Conv2D(8, 3, use_bias=False)(inp)))
    y = layers.ReLU()(layers.BatchNormalization()(layers.Conv2D(8, 3, padding="same")(x)))
    x = layers.Add()([x, layers.BatchNormalization()(layers.Conv2D(8, 1)(y))])
    x = layers.Conv2D(16, 3, strides=2, activation="relu")(x)
    x = layers.Dense(16, activation="relu")(layers.GlobalAveragePooling2D()(x))
    return tf_keras.Model(inp, layers.Dense(10)(x))


CASES = {
    "lstm-keras3": (keras3, lambda: build_digits_lstm(keras3, units=16), load_digit_sequences),
    "cnn-tf_keras": (tf_keras, _cnn, load_digits_data),
}


@pytest.mark.parametrize("case", list(CASES))
def test_masked_fit_follows_the_fit_of_the_compacted_model(case):
    k, build, load = CASES[case]
    data = load(0)
    x, y = data.x_train[:256], data.y_train[:256]
    fit = {"epochs": EPOCHS, "batch_size": 32, "verbose": 0, "shuffle": False}

    dense = _compiled(k, build())
    small, _ = tfb.prune(
        dense, 0.5, importance="magnitude", finetune_epochs=0, passes=["prune_channels"]
    )  # BatchNorm kept (folded, it would train differently)
    small = _compiled(k, small)
    small_history = small.fit(x, y, **fit).history["loss"]

    callback = tfb.BalanceCallback(
        target=0.5, importance="magnitude", begin_epoch=0, end_epoch=0, verbose=0
    )
    masked = _compiled(k, build())
    masked_history = masked.fit(x, y, callbacks=[callback], **fit).history["loss"]

    assert callback.optimized_model.count_params() < dense.count_params()
    np.testing.assert_allclose(masked_history, small_history, rtol=1e-4)
    np.testing.assert_allclose(
        callback.optimized_model.predict(data.x_val[:64], verbose=0),
        small.predict(data.x_val[:64], verbose=0),
        rtol=1e-4,
        atol=1e-5,
    )

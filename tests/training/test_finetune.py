"""Fine-tuning: the documented learning rate, the user's loss and metrics, the best epoch kept."""

from __future__ import annotations

import numpy as np
import pytest

from tf_balancer._compat import keras
from tf_balancer.demo import build_digits_cnn, compile_classifier
from tf_balancer.metrics import MacroF1
from tf_balancer.training.finetune import (
    FINETUNE_LR_SCALE,
    FinetuneSettings,
    current_learning_rate,
    finetune,
)


def _trained(optimizer):
    model = build_digits_cnn(width=4, seed=0)
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy", MacroF1(num_classes=10)],
    )
    return model


def test_tf_keras_optimizer_config_holds_a_numpy_float():
    # why a plain isinstance(config["learning_rate"], float) check never scaled anything
    config = keras.optimizers.Adam(3e-3).get_config()
    assert not isinstance(config["learning_rate"], float)


def test_current_learning_rate_of_a_constant_and_a_schedule(digits):
    assert current_learning_rate(keras.optimizers.Adam(3e-3)) == pytest.approx(3e-3)
    schedule = keras.optimizers.schedules.ExponentialDecay(1e-2, decay_steps=1, decay_rate=0.5)
    model = _trained(keras.optimizers.SGD(schedule))
    model.fit(digits.x_train[:96], digits.y_train[:96], batch_size=32, epochs=1, verbose=0)
    assert int(model.optimizer.iterations.numpy()) == 3
    assert current_learning_rate(model.optimizer) == pytest.approx(1e-2 * 0.5**3)


@pytest.mark.parametrize("schedule", [False, True])
def test_finetune_runs_at_the_documented_fraction_of_the_current_rate(digits, schedule):
    rate = (
        keras.optimizers.schedules.ExponentialDecay(4e-3, decay_steps=1, decay_rate=0.5)
        if schedule
        else 4e-3
    )
    trained = _trained(keras.optimizers.Adam(rate))
    trained.fit(digits.x_train[:64], digits.y_train[:64], batch_size=32, epochs=1, verbose=0)
    expected = FINETUNE_LR_SCALE * current_learning_rate(trained.optimizer)
    compacted = build_digits_cnn(width=4, seed=1)
    settings = FinetuneSettings(epochs=1, data=(digits.x_train[:64], digits.y_train[:64]))
    model, log = finetune(compacted, trained, settings, (digits.x_val[:64], digits.y_val[:64]))
    assert log["learning_rate"] == pytest.approx(expected)
    assert float(np.asarray(model.optimizer.learning_rate)) == pytest.approx(expected)
    assert isinstance(model.optimizer, keras.optimizers.Adam)
    assert model.optimizer is not trained.optimizer


def test_finetune_keeps_the_users_loss_and_metrics(digits):
    trained = _trained(keras.optimizers.Adam(1e-3))
    compacted = build_digits_cnn(width=4, seed=1)
    settings = FinetuneSettings(epochs=1, data=(digits.x_train[:64], digits.y_train[:64]))
    model, _ = finetune(compacted, trained, settings, (digits.x_val[:64], digits.y_val[:64]))
    logs = model.evaluate(digits.x_val[:64], digits.y_val[:64], verbose=0, return_dict=True)
    assert {"loss", "accuracy", "macro_f1"} <= set(logs)
    assert isinstance(model.loss, keras.losses.SparseCategoricalCrossentropy)
    assert model.loss.get_config()["from_logits"] is True


def test_finetune_never_ends_below_the_model_it_started_from(digits):
    trained = compile_classifier(build_digits_cnn(width=8, seed=0))
    trained.fit(digits.x_train, digits.y_train, batch_size=64, epochs=3, verbose=0)
    compacted = keras.models.clone_model(trained)
    compacted.set_weights(trained.get_weights())
    before = compacted.get_weights()
    # a learning rate that wrecks the weights: every fine-tuned epoch scores worse
    settings = FinetuneSettings(epochs=2, data=(digits.x_train, digits.y_train), learning_rate=5.0)
    model, log = finetune(compacted, trained, settings, (digits.x_val, digits.y_val))
    assert log["best_epoch"] == 0
    assert max(log["scores"][1:]) < log["scores"][0]
    for got, want in zip(model.get_weights(), before, strict=True):
        np.testing.assert_array_equal(got, want)


def test_finetune_uses_the_given_batch_size(digits):
    trained = _trained(keras.optimizers.Adam(1e-3))
    compacted = build_digits_cnn(width=4, seed=1)
    seen = []

    class Batches(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            seen.append(batch)

    settings = FinetuneSettings(
        epochs=1, data=(digits.x_train[:100], digits.y_train[:100]), batch_size=25
    )
    original_fit = compacted.fit
    compacted.fit = lambda *a, **k: original_fit(*a, callbacks=[Batches()], **k)
    finetune(compacted, trained, settings, (digits.x_val[:32], digits.y_val[:32]))
    assert len(seen) == 4  # 100 samples / 25


def _match_rate(y_true, y_pred):
    """A metric written as a plain function: Keras serializes it by name only."""
    import tensorflow as tf

    labels = tf.cast(tf.reshape(y_true, [-1]), tf.int64)
    return tf.reduce_mean(tf.cast(tf.equal(labels, tf.argmax(y_pred, -1)), tf.float32))


@pytest.mark.parametrize("keras_version", [2, 3])
def test_compile_like_keeps_every_metric_when_one_is_a_plain_function(keras_version, digits):
    """A plain-function metric cannot be deserialized from the compile config, and
    compile_like then dropped *all* the user's metrics, weighted metrics and
    steps_per_execution: the optimized model evaluated and trained with the loss only."""
    import keras as keras3

    from tf_balancer.training.finetune import compile_like

    k = keras if keras_version == 2 else keras3
    inp = k.Input((8, 8, 1))
    hidden = k.layers.Dense(10)(k.layers.Flatten()(inp))
    trained = k.Model(inp, hidden)
    trained.compile(
        optimizer=k.optimizers.Adam(1e-2),
        loss=k.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[k.metrics.SparseCategoricalAccuracy(name="acc"), _match_rate],
        weighted_metrics=["accuracy"],
        steps_per_execution=2,
    )
    x, y = digits.x_train[:64, ::2, ::2], digits.y_train[:64]
    trained.fit(x, y, epochs=1, verbose=0)
    copy = k.Model.from_config(trained.get_config())  # (Keras 3's clone_model recompiles)
    compile_like(copy, trained, 1e-3)
    scores = copy.evaluate(x, y, verbose=0, return_dict=True)
    assert {"loss", "acc", "_match_rate", "accuracy"} <= set(scores)
    assert scores["acc"] == pytest.approx(scores["_match_rate"])
    assert int(np.asarray(copy.steps_per_execution)) == 2
    # the Metric object is the copy's own (a metric's state belongs to one model)
    given = trained._compile_config.config["metrics"][0]
    copied = copy._compile_config.config["metrics"][0]
    assert copied is not given and copied.name == "acc"


@pytest.mark.parametrize("save_as", ["m.h5", "saved_model"])
def test_tf_keras_accuracy_stays_sparse_when_the_compiled_copy_is_saved_first(
    save_as, digits, tmp_path
):
    """tf_keras resolves "accuracy" from the labels at the first batch, or, when the
    model is saved before one, from its outputs alone (categorical_accuracy): the
    optimized model, returned compiled and saved straight away, then scored sparse
    labels at about 1/10 (keras-team/tf-keras#277)."""
    from tf_balancer.training.finetune import compile_like

    inp = keras.Input((8, 8, 1))
    trained = keras.Model(inp, keras.layers.Dense(10)(keras.layers.Flatten()(inp)))
    trained.compile(
        "adam",
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy", "ce"],
    )
    x, y = digits.x_train[:256, ::2, ::2], digits.y_train[:256]
    trained.fit(x, y, epochs=3, verbose=0)
    copy = keras.Model.from_config(trained.get_config())
    copy.set_weights(trained.get_weights())
    compile_like(copy, trained, 1e-3)
    copy.save(str(tmp_path / save_as))
    expected = trained.evaluate(x, y, verbose=0, return_dict=True)
    scores = copy.evaluate(x, y, verbose=0, return_dict=True)
    assert scores["accuracy"] == pytest.approx(expected["accuracy"])
    assert scores["ce"] == pytest.approx(expected["ce"], rel=1e-5)
    loaded = keras.models.load_model(str(tmp_path / save_as))
    assert loaded.evaluate(x, y, verbose=0, return_dict=True)["accuracy"] == pytest.approx(
        expected["accuracy"]
    )


def test_tf_keras_accuracy_of_a_sparse_head_stays_sparse_when_the_copy_is_saved_first(
    digits, tmp_path
):
    """The same for one head of a model with several outputs (metrics by output name)."""
    from tf_balancer.training.finetune import compile_like

    inp = keras.Input((8, 8, 1))
    hidden = keras.layers.Flatten()(inp)
    outputs = {"cls": keras.layers.Dense(10, name="cls")(hidden)}
    outputs["reg"] = keras.layers.Dense(1, name="reg")(hidden)
    trained = keras.Model(inp, outputs)
    trained.compile(
        "adam",
        {"cls": keras.losses.SparseCategoricalCrossentropy(from_logits=True), "reg": "mse"},
        metrics={"cls": ["accuracy"], "reg": ["mae"]},
    )
    x, y = digits.x_train[:256, ::2, ::2], digits.y_train[:256]
    labels = {"cls": y, "reg": x.mean(axis=(1, 2, 3))[:, None]}
    trained.fit(x, labels, epochs=3, verbose=0)
    copy = keras.Model.from_config(trained.get_config())
    copy.set_weights(trained.get_weights())
    compile_like(copy, trained, 1e-3)
    copy.save(str(tmp_path / "m.h5"))
    expected = trained.evaluate(x, labels, verbose=0, return_dict=True)
    scores = copy.evaluate(x, labels, verbose=0, return_dict=True)
    assert scores["cls_accuracy"] == pytest.approx(expected["cls_accuracy"])
    assert scores["reg_mae"] == pytest.approx(expected["reg_mae"], rel=1e-5)

"""``BalanceCallback()`` with no arguments, inside a real ``fit``: streamed Taylor importance,
the default schedule, task metrics in History, and the hooks taken off afterwards."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import small_cnn_head
from sklearn.metrics import f1_score, recall_score

from tf_balancer._compat import keras
from tf_balancer.demo import build_digits_cnn, compile_classifier
from tf_balancer.training.callback import BalanceCallback

pytestmark = pytest.mark.slow

EPOCHS = 8


class _ValPredictions(keras.callbacks.Callback):
    """Predicts the validation set at each epoch end (after fit's own evaluation)."""

    def __init__(self, x):
        super().__init__()
        self.x, self.predictions = x, []

    def on_epoch_end(self, epoch, logs=None):
        self.predictions.append(self.model.predict(self.x, verbose=0, batch_size=256))


@pytest.fixture(scope="module")
def default_fit(digits):
    model = compile_classifier(build_digits_cnn(width=16, seed=0))
    callback = BalanceCallback(verbose=0)
    recorder = _ValPredictions(digits.x_val)
    history = model.fit(
        digits.x_train,
        digits.y_train,
        validation_data=(digits.x_val, digits.y_val),
        epochs=EPOCHS,
        batch_size=64,
        callbacks=[callback, recorder],
        verbose=0,
    )
    return model, callback, history, recorder


def test_no_argument_callback_meets_half_the_flops(default_fit):
    _, callback, history, _ = default_fit
    assert callback.schedule == [1, 2, 3, 4, 5]
    assert history.history["balancer/flops_ratio"][-1] <= 0.5 + 1e-3
    report = callback.report
    assert report["final"]["flops"] <= 0.5 * report["dense"]["flops"] * 1.01
    assert report["dense"]["trained_epochs"] == 1  # the snapshot at the first rebalance


def test_history_has_validation_macro_f1_equal_to_sklearn_every_epoch(default_fit, digits):
    _, _, history, recorder = default_fit
    f1 = history.history["val_macro_f1"]
    recall = history.history["val_macro_recall"]
    assert len(f1) == len(recall) == EPOCHS
    for epoch, logits in enumerate(recorder.predictions):
        predicted = logits.argmax(-1)
        expected_f1 = f1_score(digits.y_val, predicted, average="macro", labels=range(10))
        expected_recall = recall_score(digits.y_val, predicted, average="macro", labels=range(10))
        assert f1[epoch] == pytest.approx(expected_f1, abs=1e-6), epoch
        assert recall[epoch] == pytest.approx(expected_recall, abs=1e-6), epoch
    assert "macro_f1" in history.history  # the training-side counterpart


def test_streamed_importance_saw_the_training_batches(default_fit, digits):
    _, callback, _, _ = default_fit
    # every rebalance had the batches since the one before (no magnitude fallback); the
    # stream is reset at each rebalance and idles after the last one (epoch 5 of 8)
    assert callback.schedule[-1] == 5 and not callback._fallback_logged
    assert callback.stream.batches == 0 and float(callback.stream.active.numpy()) == 0.0
    assert callback.hooks.batch_size.numpy() == 64


def test_hooks_are_removed_after_fit(default_fit, digits):
    model, _, _, _ = default_fit
    assert "compute_metrics" not in model.__dict__
    assert "apply_gradients" not in model.optimizer.__dict__
    logs = model.evaluate(digits.x_val, digits.y_val, verbose=0, return_dict=True)
    assert "macro_f1" not in logs and "accuracy" in logs


def test_regression_model_gets_no_recall_or_f1_and_no_error(digits):
    model = small_cnn_head()
    y = digits.y_train.astype("float32")
    history = model.fit(
        digits.x_train[:256],
        y[:256],
        validation_data=(digits.x_val[:64], digits.y_val[:64].astype("float32")),
        epochs=3,
        batch_size=64,
        callbacks=[BalanceCallback(verbose=0)],
        verbose=0,
    )
    assert not any("macro" in key for key in history.history)
    assert len(history.history["val_loss"]) == 3
    assert history.history["balancer/flops_ratio"][-1] <= 0.5 + 1e-3


def test_regression_with_callback_validation_data_logs_mae_and_reports_it(digits):
    model = small_cnn_head()
    y = digits.y_train.astype("float32")  # values 0-9: not class ids of a 1-wide output
    xv, yv = digits.x_val[:64], digits.y_val[:64].astype("float32")
    callback = BalanceCallback(validation_data=(xv, yv), verbose=0)
    history = model.fit(
        digits.x_train[:256], y[:256], epochs=3, batch_size=64, callbacks=[callback], verbose=0
    )
    logged = history.history
    assert len(logged["balancer/val_mae"]) == 3 and len(logged["balancer/val_rmse"]) == 3
    assert not any(
        key.startswith("balancer/val_") and "mae" not in key and "rmse" not in key for key in logged
    )
    error = model.predict(xv, verbose=0).reshape(-1).astype("float64") - yv
    assert logged["balancer/val_mae"][-1] == pytest.approx(np.abs(error).mean(), abs=1e-5)
    assert logged["balancer/val_rmse"][-1] == pytest.approx(np.sqrt((error**2).mean()), abs=1e-5)
    final = callback.report["final"]
    assert {"mae", "rmse"} <= set(final)
    assert not {"accuracy", "recall", "f1"} & set(final)
    assert {"mae", "rmse"} <= set(callback.report["dense"])


def test_binary_sigmoid_classifier_gets_val_macro_f1(digits):
    model = small_cnn_head(activation="sigmoid", loss="binary_crossentropy")
    y_train, y_val = (digits.y_train < 5).astype("float32"), (digits.y_val < 5).astype("float32")
    history = model.fit(
        digits.x_train[:256],
        y_train[:256],
        validation_data=(digits.x_val[:128], y_val[:128]),
        epochs=2,
        batch_size=64,
        callbacks=[BalanceCallback(verbose=0)],
        verbose=0,
    )
    predicted = (model.predict(digits.x_val[:128], verbose=0)[:, 0] > 0.5).astype(int)
    expected = f1_score(y_val[:128], predicted, average="macro", labels=[0, 1])
    assert history.history["val_macro_f1"][-1] == pytest.approx(expected, abs=1e-6)


def test_fit_returns_a_full_history_when_nothing_is_compacted(digits):
    # evaluating the user's own model at train end must not replace fit's History
    model = compile_classifier(build_digits_cnn(width=8, seed=0))
    validation = (digits.x_val[:64], digits.y_val[:64])
    history = model.fit(
        digits.x_train[:256],
        digits.y_train[:256],
        validation_data=validation,
        epochs=2,
        callbacks=[BalanceCallback(target=1.0, passes=(), validation_data=validation, verbose=0)],
        verbose=0,
    )
    assert history is model.history
    assert len(history.history["val_loss"]) == 2
    assert len(history.history["balancer/flops_ratio"]) == 2


def test_two_input_two_output_model_gets_per_head_metrics_and_meets_the_target(digits):
    """Streamed Taylor uses the compiled, weighted losses of both heads; the classification
    head gets `val_cls_macro_f1`, the regression head no recall/F1."""
    keras.utils.set_random_seed(0)
    image, meta = keras.Input((16, 16, 1), name="image"), keras.Input((4,), name="meta")
    x = keras.layers.Conv2D(16, 3, activation="relu")(image)
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(16, 3, activation="relu")(x))
    x = keras.layers.Concatenate()([x, keras.layers.Dense(8, activation="relu")(meta)])
    hidden = keras.layers.Dense(32, activation="relu")(x)
    outputs = [
        keras.layers.Dense(10, name="cls")(hidden),
        keras.layers.Dense(1, name="reg")(hidden),
    ]
    model = keras.Model([image, meta], outputs)
    model.compile(
        optimizer="adam",
        loss={"cls": keras.losses.SparseCategoricalCrossentropy(from_logits=True), "reg": "mse"},
        loss_weights={"cls": 1.0, "reg": 0.1},
    )
    rng = np.random.default_rng(0)
    meta_train = rng.random((len(digits.x_train), 4), dtype=np.float32)
    meta_val = rng.random((len(digits.x_val), 4), dtype=np.float32)
    y_val = {"cls": digits.y_val, "reg": digits.y_val.astype("float32")}
    history = model.fit(
        [digits.x_train, meta_train],
        {"cls": digits.y_train, "reg": digits.y_train.astype("float32")},
        validation_data=([digits.x_val, meta_val], y_val),
        epochs=3,
        batch_size=64,
        callbacks=[BalanceCallback(verbose=0)],
        verbose=0,
    )
    assert history.history["balancer/flops_ratio"][-1] <= 0.5 + 1e-3
    assert not any(key.startswith(("reg_macro", "val_reg_macro")) for key in history.history)
    predicted = model.predict([digits.x_val, meta_val], verbose=0)[0].argmax(-1)
    expected = f1_score(digits.y_val, predicted, average="macro", labels=range(10))
    assert history.history["val_cls_macro_f1"][-1] == pytest.approx(expected, abs=1e-6)

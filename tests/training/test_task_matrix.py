"""Every training setup gets a result: {binary, multi-class one-hot, multi-label,
regression, two-input two-output} x {float32, mixed_float16} with
``BalanceCallback(target=0.5)`` and ``validation_data``.

Each run must meet the target, log the task's metrics in History for every epoch
and keep History whole (or be refused at ``on_train_begin`` with one line; none is).
"""

from __future__ import annotations

import numpy as np
import pytest

from tf_balancer._compat import keras
from tf_balancer.training.callback import BalanceCallback

pytestmark = pytest.mark.slow

L = keras.layers
EPOCHS, N = 4, 96
TASKS = ("binary", "multiclass_one_hot", "multi_label", "regression", "two_in_two_out")


@pytest.fixture(params=["float32", "mixed_float16"])
def policy(request):
    keras.mixed_precision.set_global_policy(request.param)
    try:
        yield request.param
    finally:
        keras.mixed_precision.set_global_policy("float32")


def _trunk(image):
    x = L.Conv2D(16, 3, padding="same", activation="relu")(image)
    x = L.Conv2D(16, 3, padding="same", activation="relu")(x)
    return L.Dense(16, activation="relu")(L.GlobalAveragePooling2D()(x))


def _setup(task: str, rng: np.random.Generator):
    """``(model compiled for the task, x, y, History keys the task must log)``."""
    keras.utils.set_random_seed(0)
    image = keras.Input((8, 8, 1), name="image")
    x_image = rng.normal(size=(N, 8, 8, 1)).astype("float32")
    features = _trunk(image)
    head = {"dtype": "float32"}  # outputs in float32 under mixed precision (Keras' advice)
    if task == "two_in_two_out":
        extra = keras.Input((5,), name="extra")
        joined = L.Concatenate()([features, L.Dense(8, activation="relu")(extra)])
        cls = L.Dense(3, activation="softmax", name="cls", **head)(joined)
        reg = L.Dense(1, name="reg", **head)(joined)
        model = keras.Model([image, extra], [cls, reg])
        model.compile("adam", {"cls": "sparse_categorical_crossentropy", "reg": "mse"})
        x = [x_image, rng.normal(size=(N, 5)).astype("float32")]
        y = {"cls": rng.integers(0, 3, N), "reg": rng.normal(size=(N, 1)).astype("float32")}
        return model, x, y, ("val_cls_macro_f1", "val_cls_macro_recall", "val_loss")
    if task == "binary":
        out, loss = L.Dense(1, activation="sigmoid", **head), "binary_crossentropy"
        y = rng.integers(0, 2, (N, 1)).astype("float32")
    elif task == "multiclass_one_hot":
        out, loss = L.Dense(4, activation="softmax", **head), "categorical_crossentropy"
        y = np.eye(4, dtype="float32")[rng.integers(0, 4, N)]
    elif task == "multi_label":
        out, loss = L.Dense(3, activation="sigmoid", **head), "binary_crossentropy"
        y = rng.integers(0, 2, (N, 3)).astype("float32")
    else:
        out, loss = L.Dense(1, **head), "mse"
        y = rng.normal(size=(N, 1)).astype("float32")
    model = keras.Model(image, out(features))
    metrics = ["mae"] if task == "regression" else []
    model.compile("adam", loss, metrics=metrics)
    keys = ("val_mae", "val_loss") if task == "regression" else ("val_macro_f1", "val_macro_recall")
    return model, x_image, y, keys


def _split(value, cut):
    if isinstance(value, dict):
        return {k: v[:cut] for k, v in value.items()}, {k: v[cut:] for k, v in value.items()}
    if isinstance(value, list):
        return [v[:cut] for v in value], [v[cut:] for v in value]
    return value[:cut], value[cut:]


@pytest.mark.parametrize("task", TASKS)
def test_every_task_meets_the_target_with_its_metrics_in_history(task, policy):
    model, x, y, keys = _setup(task, np.random.default_rng(0))
    (x_train, x_val), (y_train, y_val) = _split(x, 64), _split(y, 64)
    callback = BalanceCallback(target=0.5, verbose=0)
    history = model.fit(
        x_train,
        y_train,
        validation_data=(x_val, y_val),
        epochs=EPOCHS,
        batch_size=16,
        callbacks=[callback],
        verbose=0,
    ).history
    assert len(history["loss"]) == EPOCHS, sorted(history)
    for key in (*keys, "balancer/flops_ratio"):
        assert len(history.get(key, ())) == EPOCHS, (key, sorted(history))
        assert np.all(np.isfinite(history[key])), (key, history[key])
    assert history["balancer/flops_ratio"][-1] <= 0.5 + 1e-9
    report = callback.report
    assert report["final_flops_ratio"] <= 0.5 + 1e-9, report["passes"]
    applied = {p["name"] for p in report["passes"] if p["status"] == "applied"}
    assert "prune_channels" in applied, report["passes"]

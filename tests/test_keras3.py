"""The structured path on both Kerases: tf_keras (Keras 2) and Keras 3 (``tf.keras`` in TF >= 2.16).

Every test that takes ``kx`` runs once per Keras, on the same architecture, through
the same code (the adapter in ``tf_balancer._compat`` is the only difference).
"""

from __future__ import annotations

import os

import keras as keras3
import numpy as np
import pytest
import tensorflow as tf
from conftest import (
    assert_model_unchanged,
    profiler_flops,
    randomize_batchnorm,
    residual_concat_cnn,
    snapshot_model,
)

import tf_balancer as tfb
from tf_balancer._compat import adapter_for, keras
from tf_balancer.analysis import analyze
from tf_balancer.attention.balance import allocate
from tf_balancer.attention.importance import group_scores
from tf_balancer.attention.masks import masked_copy
from tf_balancer.errors import UnsupportedModelError
from tf_balancer.optimizer import MetaOptimizer
from tf_balancer.passes.base import PassContext
from tf_balancer.passes.prune_channels import PruneChannels

KERASES = {"tf_keras": keras, "keras3": keras3}


@pytest.fixture(params=sorted(KERASES))
def kx(request):
    return KERASES[request.param]


def _x(model, batch=4, seed=0):
    shape = (batch, *model.inputs[0].shape[1:])
    return np.random.default_rng(seed).normal(size=shape).astype("float32")


def _sequential_cnn(k):
    k.utils.set_random_seed(0)
    return k.Sequential(
        [
            k.Input((16, 16, 1)),
            k.layers.Conv2D(16, 3, padding="same", use_bias=False),
            k.layers.BatchNormalization(),
            k.layers.ReLU(),
            k.layers.Conv2D(32, 3, padding="same"),
            k.layers.ReLU(),
            k.layers.MaxPooling2D(),
            k.layers.Flatten(),
            k.layers.Dropout(0.2),
            k.layers.Dense(32, activation="relu"),
            k.layers.Dense(10),
        ]
    )


def test_adapter_follows_the_models_keras(kx):
    model = residual_concat_cnn(k=kx)
    assert adapter_for(model).keras is kx
    assert adapter_for(model).version == (3 if kx is keras3 else 2)


def test_analysis_is_the_same_on_both_kerases_and_matches_the_profiler(kx):
    model = randomize_batchnorm(residual_concat_cnn(k=kx))
    analysis = analyze(model)
    assert analysis.cost.flops == profiler_flops(analysis.traced.graph)
    assert analysis.cost.params == model.count_params()
    reference = analyze(residual_concat_cnn())  # tf_keras, same architecture
    # Convolutions and matmuls cost the same. BatchNorm: tf_keras runs FusedBatchNormV3
    # (counted as its multiply and add per element), Keras 3 explicit multiply-adds plus a
    # few per-channel ops (rsqrt of the variance, ...).
    for name in ("a", "b", "c", "d", "e", "fc", "out"):
        assert analysis.cost.layers[name].flops == reference.cost.layers[name].flops, name
    bn, bn_reference = analysis.cost.layers["a_bn"].flops, reference.cost.layers["a_bn"].flops
    assert bn_reference == 2 * 10 * 10 * 8
    assert bn_reference <= bn <= 1.05 * bn_reference
    groups = sorted((g.size, g.prunable) for g in analysis.graph.groups.values())
    assert groups == sorted((g.size, g.prunable) for g in reference.graph.groups.values())


def test_compaction_equals_the_masked_model_on_both_kerases(kx):
    model = randomize_batchnorm(residual_concat_cnn(k=kx))
    snapshot = snapshot_model(model)
    analysis = analyze(model)
    plan = allocate(analysis, group_scores(analysis.graph, None, "magnitude"), 0.5)
    result = PruneChannels().run(model, analysis.graph, PassContext(plan=plan))
    assert result.changed and adapter_for(result.model).keras is kx
    masked = masked_copy(analysis.graph, plan)
    x = _x(model)
    expected = np.asarray(masked(x, training=False))
    assert np.abs(expected).max() > 1e-3
    np.testing.assert_allclose(np.asarray(result.model(x, training=False)), expected, 1e-4, 1e-4)
    ratio = analyze(result.model).cost.flops / analysis.cost.flops
    assert ratio == pytest.approx(plan.achieved, rel=0.02)
    assert_model_unchanged(model, snapshot)


def test_lossless_passes_apply_and_keep_the_outputs_on_both_kerases(kx):
    model = randomize_batchnorm(_sequential_cnn(kx))
    x = _x(model)
    passes = ["strip_training_ops", "fold_batchnorm", "fuse_activation"]
    optimized, report = MetaOptimizer(passes).run(model, PassContext(probe_inputs=x))
    assert [r.status for r in report.records] == ["applied"] * 3
    np.testing.assert_allclose(
        np.asarray(optimized(x, training=False)), np.asarray(model(x, training=False)), 1e-4, 1e-5
    )
    names = {type(layer).__name__ for layer in optimized.layers}
    assert not names & {"Dropout", "BatchNormalization", "ReLU"}


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["mobilenet_v2", "resnet50"])
def test_keras3_applications_cost_and_compaction(arch):
    keras3.utils.set_random_seed(0)
    if arch == "mobilenet_v2":
        model = keras3.applications.MobileNetV2(
            alpha=0.35, input_shape=(96, 96, 3), weights=None, classifier_activation=None
        )
    else:
        model = keras3.applications.ResNet50(
            input_shape=(64, 64, 3), weights=None, classifier_activation=None
        )
    randomize_batchnorm(model)
    analysis = analyze(model)
    assert analysis.cost.flops == pytest.approx(profiler_flops(analysis.traced.graph), rel=0.01)
    plan = allocate(analysis, group_scores(analysis.graph, None, "magnitude"), 0.5)
    result = PruneChannels().run(model, analysis.graph, PassContext(plan=plan))
    x = _x(model, batch=2)
    expected = np.asarray(masked_copy(analysis.graph, plan)(x, training=False))
    np.testing.assert_allclose(np.asarray(result.model(x, training=False)), expected, 1e-4, 1e-4)
    ratio = analyze(result.model).cost.flops / analysis.cost.flops
    assert ratio == pytest.approx(plan.achieved, rel=0.02) and ratio <= 0.5 + 1e-3


@pytest.mark.slow
def test_tf_keras_sequential_on_digits_end_to_end(digits, tmp_path):
    """The Keras 3 Sequential model most users write (``tf.keras`` in a fresh process; here
    ``keras`` itself, since a test that imported tfmot earlier pins ``tf.keras`` to tf_keras;
    ``colab/quickstart.ipynb`` runs the same path through ``tf.keras`` in CI)."""
    model = _sequential_cnn(keras3)
    model.compile(
        optimizer="adam",
        loss=keras3.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    callback = tfb.BalanceCallback(target=0.5, verbose=0)
    history = model.fit(
        digits.x_train,
        digits.y_train,
        validation_data=(digits.x_val, digits.y_val),
        epochs=4,
        batch_size=64,
        callbacks=[callback],
        verbose=0,
    )
    assert history.history["balancer/flops_ratio"][-1] <= 0.5 + 1e-3
    assert len(history.history["val_macro_f1"]) == 4
    report = callback.report
    assert report["final"]["flops"] <= 0.5 * report["dense"]["flops"] * 1.01
    optimized = callback.optimized_model
    assert adapter_for(optimized).version == 3
    x = digits.x_val[:16]
    np.testing.assert_allclose(
        optimized.predict(x, verbose=0), model.predict(x, verbose=0), 1e-4, 1e-4
    )
    path = callback.export(str(tmp_path / "out"))
    loaded = tf.saved_model.load(os.path.join(path, "saved_model"))
    np.testing.assert_allclose(
        loaded.serve(tf.constant(x)).numpy(), optimized.predict(x, verbose=0), 1e-5, 1e-5
    )
    assert "serving_default" in loaded.signatures


def test_keras3_file_is_inspected_with_keras3(tmp_path):
    model = _sequential_cnn(keras3)
    path = str(tmp_path / "model.keras")
    model.save(path)
    result = tfb.inspect(path)
    assert result.rows and "Conv2D" in result.table()
    assert sum(r.flops for r in result.rows) == analyze(model).cost.flops


def test_sparse_mode_refuses_keras3_saying_structured_works():
    model = _sequential_cnn(keras3)
    model.compile(optimizer="adam", loss="mse")
    callback = tfb.BalanceCallback(mode="sparse", importance="magnitude")
    callback.set_model(model)
    callback.set_params({"epochs": 2})
    with pytest.raises(UnsupportedModelError, match="tf_keras.*structured"):
        callback.on_train_begin()


def _my_model(k):
    """The TensorFlow tutorial's subclassed model."""

    class MyModel(k.Model):
        def __init__(self):
            super().__init__()
            self.dense1 = k.layers.Dense(64, activation="relu")
            self.dense2 = k.layers.Dense(10, activation="softmax")

        def call(self, inputs):
            return self.dense2(self.dense1(inputs))

    return MyModel()


def _residual_subclassed(k):
    """A subclassed Conv-BN-ReLU net with a residual Add."""

    class Residual(k.Model):
        def __init__(self):
            super().__init__()
            self.conv1 = k.layers.Conv2D(16, 3, padding="same", use_bias=False)
            self.bn1 = k.layers.BatchNormalization()
            self.relu1 = k.layers.ReLU()
            self.conv2 = k.layers.Conv2D(16, 3, padding="same", use_bias=False)
            self.bn2 = k.layers.BatchNormalization()
            self.add = k.layers.Add()
            self.relu2 = k.layers.ReLU()
            self.pool = k.layers.MaxPooling2D()
            self.flat = k.layers.Flatten()
            self.fc = k.layers.Dense(32, activation="relu")
            self.logits = k.layers.Dense(10)

        def call(self, x):
            y = self.relu1(self.bn1(self.conv1(x)))
            z = self.bn2(self.conv2(y))
            x = self.pool(self.relu2(self.add([y, z])))
            return self.logits(self.fc(self.flat(x)))

    return Residual()


def _fit_balanced(model, train, validation, epochs):
    """``fit`` with ``BalanceCallback()`` (target 0.5) on its defaults; History and callback."""
    callback = tfb.BalanceCallback(target=0.5, verbose=0)
    history = model.fit(
        *train,
        validation_data=validation,
        epochs=epochs,
        batch_size=64,
        callbacks=[callback],
        verbose=0,
    )
    return history, callback


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["my_model", "residual"])
def test_subclassed_models_are_pruned_during_fit_on_both_kerases(kx, arch, digits, tmp_path):
    kx.utils.set_random_seed(0)
    if arch == "my_model":
        model, loss = _my_model(kx), "sparse_categorical_crossentropy"
        x_train = digits.x_train.reshape(len(digits.x_train), -1)
        x_val = digits.x_val.reshape(len(digits.x_val), -1)
    else:
        model = _residual_subclassed(kx)
        loss = kx.losses.SparseCategoricalCrossentropy(from_logits=True)
        x_train, x_val = digits.x_train, digits.x_val
    model(x_train[:1])  # built, as after any first call
    model.compile(optimizer="adam", loss=loss, metrics=["accuracy"])
    assert tfb.inspect(model).rows  # analysed through its functional twin
    history, callback = _fit_balanced(model, (x_train, digits.y_train), (x_val, digits.y_val), 10)
    assert history.history["balancer/flops_ratio"][-1] <= 0.5 + 1e-3
    optimized = callback.optimized_model
    assert callback.report["final"]["flops"] <= 0.5 * callback.report["dense"]["flops"] * 1.01
    if arch == "my_model":
        assert optimized.get_layer(model.dense1.name).units < 64
    expected = model.predict(x_val[:32], verbose=0)
    np.testing.assert_allclose(optimized.predict(x_val[:32], verbose=0), expected, 1e-4, 1e-4)
    path = callback.export(str(tmp_path / "out"))
    loaded = tf.saved_model.load(os.path.join(path, "saved_model"))
    served = loaded.signatures["serving_default"](tf.constant(x_val[:32]))
    np.testing.assert_allclose(next(iter(served.values())).numpy(), expected, 1e-4, 1e-4)
    accuracy = np.mean(optimized.predict(x_val, verbose=0).argmax(-1) == digits.y_val)
    assert accuracy >= 0.9


def _unbuilt(k, arch):
    """Models whose input shape only fit's first train step tells: never called."""
    k.utils.set_random_seed(0)
    if arch == "subclassed":
        return _my_model(k), "sparse_categorical_crossentropy"
    model = k.Sequential(  # no Input: the most common Sequential of the tutorials
        [
            k.layers.Dense(48, activation="relu"),
            k.layers.Dropout(0.1),
            k.layers.Dense(24, activation="relu"),
            k.layers.Dense(10),
        ]
    )
    return model, k.losses.SparseCategoricalCrossentropy(from_logits=True)


@pytest.mark.parametrize("arch", ["subclassed", "sequential"])
def test_unbuilt_models_are_pruned_from_fits_first_step_on_both_kerases(kx, arch, digits):
    model, loss = _unbuilt(kx, arch)
    model.compile(optimizer="adam", loss=loss, metrics=["accuracy"])
    assert not model.built
    x_train = digits.x_train.reshape(len(digits.x_train), -1)
    x_val = digits.x_val.reshape(len(digits.x_val), -1)
    history, callback = _fit_balanced(model, (x_train, digits.y_train), (x_val, digits.y_val), 4)
    assert history.history["balancer/flops_ratio"][-1] <= 0.5 + 1e-3
    assert len(history.history["val_macro_f1"]) == 4  # subclassed too (its twin's outputs)
    assert not callback._fallback_logged  # every rebalance had streamed batches
    assert callback.report["final"]["flops"] <= 0.5 * callback.report["dense"]["flops"] * 1.01
    expected = model.predict(x_val[:32], verbose=0)
    optimized = callback.optimized_model
    np.testing.assert_allclose(optimized.predict(x_val[:32], verbose=0), expected, 1e-4, 1e-4)
    assert optimized.count_params() < model.count_params()


def test_an_unbuilt_model_rebalanced_at_epoch_0_is_masked_from_the_second_step(kx, digits):
    model, loss = _unbuilt(kx, "sequential")
    model.compile(optimizer="sgd", loss=loss)
    x_train = digits.x_train.reshape(len(digits.x_train), -1)
    callback = tfb.BalanceCallback(begin_epoch=0, end_epoch=0, verbose=0)
    model.fit(x_train, digits.y_train, epochs=1, batch_size=64, callbacks=[callback], verbose=0)
    assert callback.state.epoch.numpy() == 0 and callback.state.rebalances.numpy() == 1
    first = model.layers[0]
    (group,) = [
        g for g in callback.analysis.graph.prunable_groups if first.name in g.nodes("producer")
    ]
    kernel = first.kernel.numpy()  # masked columns stay zero after the last step
    pruned = np.setdiff1d(np.arange(48), callback.state.keep_indices()[group.id])
    assert pruned.size and not np.any(kernel[:, pruned])


def test_an_unbuilt_model_whose_call_cannot_be_traced_fails_fit_naming_the_fix():
    class Branchy(keras.Model):  # a Python branch on a tensor's value
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(2)

        def call(self, x):
            if tf.reduce_sum(x) > 0:
                return self.dense(x)
            return -self.dense(x)

    model = Branchy()
    model.compile(optimizer="adam", loss="mse")
    x = np.ones((8, 4), "float32")
    with pytest.raises(UnsupportedModelError, match="Functional or Sequential"):
        model.fit(x, x[:, :2], epochs=1, callbacks=[tfb.BalanceCallback(verbose=0)], verbose=0)


def test_prune_one_shot_works_on_a_keras3_model(digits):
    model = _sequential_cnn(keras3)
    model.compile(
        optimizer="adam",
        loss=keras3.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    model.fit(digits.x_train, digits.y_train, epochs=2, batch_size=64, verbose=0)
    weights = [w.copy() for w in model.get_weights()]
    small, report = tfb.prune(
        model,
        0.5,
        (digits.x_train[:512], digits.y_train[:512]),
        validation_data=(digits.x_val, digits.y_val),
        finetune_epochs=1,
    )
    assert adapter_for(small).version == 3
    assert report["final"]["flops"] <= 0.5 * report["dense"]["flops"] * 1.01
    assert report["final"]["accuracy"] >= report["finetune"]["scores"][0] - 1e-6
    assert len(report["finetune"]["scores"]) == 2  # the compacted model, one fine-tuned epoch
    for got, want in zip(model.get_weights(), weights, strict=True):
        np.testing.assert_array_equal(got, want)


def test_balance_callback_prunes_a_keras3_unet_with_transposed_convolutions():
    # A regression U-Net: Conv2DTranspose up-sampling, BatchNorm, a skip Concatenate.
    layers = keras3.layers
    keras3.utils.set_random_seed(0)
    inp = keras3.Input((16, 16, 1))
    down = layers.Conv2D(16, 3, padding="same", activation="relu", name="down")(inp)
    deep = layers.Conv2D(32, 3, strides=2, padding="same", activation="relu", name="deep")(down)
    up = layers.Conv2DTranspose(16, 3, strides=2, padding="same", name="up")(deep)
    up = layers.ReLU()(layers.BatchNormalization()(up))
    x = layers.Conv2D(16, 3, padding="same", activation="relu", name="merge")(
        layers.Concatenate()([up, down])
    )
    model = keras3.Model(inp, layers.Conv2D(1, 1, name="out")(x))
    model.compile(optimizer="adam", loss="mse")
    images = np.random.default_rng(0).random((192, 16, 16, 1)).astype("float32")
    callback = tfb.BalanceCallback(verbose=0, validation_data=(images[:32], images[:32]))
    model.fit(images, images, epochs=4, batch_size=32, callbacks=[callback], verbose=0)
    report = callback.report
    assert report["final"]["flops"] <= 0.5 * report["dense"]["flops"] * 1.01
    assert callback.optimized_model.get_layer("up").filters < 16
    passes = {p["name"]: p["status"] for p in report["passes"]}
    assert passes["fold_batchnorm"] == passes["fuse_activation"] == "applied"
    assert {"mae", "rmse"} <= set(report["final"])
    np.testing.assert_allclose(
        callback.optimized_model.predict(images[:8], verbose=0),
        model.predict(images[:8], verbose=0),
        rtol=1e-4,
        atol=1e-4,
    )

"""Shared fixtures: small real models, built once per test session (per xdist worker)."""

from __future__ import annotations

import contextlib
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

from tf_balancer._compat import is_layer, keras  # noqa: E402

# CI runs the property tests with a fixed example sequence (reproducible); local runs explore.
settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


def profiler_flops(graph) -> int:
    """TF's profiler total, plus 2 per element of every BatchNorm op.

    The profiler counts ``FusedBatchNorm*`` as 0; tf_balancer counts its inference
    scale-and-shift (a multiply and an add per element, as Keras 3 emits it), so a
    model with BatchNorm costs the same on both Kerases and folding never adds FLOPs.
    """
    import tensorflow as tf

    options = tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()
    options["output"] = "none"
    total = tf.compat.v1.profiler.profile(graph=graph, options=options).total_float_ops
    for op in graph.get_operations():
        if op.type.startswith("FusedBatchNorm") or op.type == "_FusedBatchNormEx":
            total += 2 * op.outputs[0].shape.num_elements()
    return total


def subclassed_cnn(k, filters: int = 8, classes: int = 10):
    """The TensorFlow tutorial's kind of subclassed model, in Keras ``k``: Conv2D, global
    average pooling, Dense logits (not built)."""

    class Net(k.Model):
        def __init__(self):
            super().__init__()
            self.conv = k.layers.Conv2D(filters, 3, activation="relu")
            self.pool = k.layers.GlobalAveragePooling2D()
            self.head = k.layers.Dense(classes)

        def call(self, x):
            return self.head(self.pool(self.conv(x)))

    return Net()


def randomize_batchnorm(model, seed: int = 0):
    """Give every BatchNormalization non-trivial statistics (in place; test models only)."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        inner = getattr(layer, "layers", None)
        if inner:
            randomize_batchnorm(layer, seed + 1)
        if is_layer(layer, "BatchNormalization"):
            weights = []
            for w in layer.weights:
                name = w.name.split("/")[-1]
                shape = w.shape
                if "moving_variance" in name:
                    weights.append(rng.uniform(0.5, 2.0, shape).astype("float32"))
                elif "gamma" in name:
                    weights.append(rng.uniform(0.5, 1.5, shape).astype("float32"))
                else:
                    weights.append(rng.normal(0.0, 0.2, shape).astype("float32"))
            layer.set_weights(weights)
    return model


@pytest.fixture(scope="session")
def resnet50():
    """tf_keras ResNet50, weights=None, random BN statistics (do not mutate)."""
    keras.utils.set_random_seed(0)
    return randomize_batchnorm(keras.applications.ResNet50(weights=None))


@pytest.fixture(scope="session")
def mobilenet_v2():
    """tf_keras MobileNetV2(alpha=0.35, 96x96), weights=None, random BN statistics."""
    keras.utils.set_random_seed(0)
    model = keras.applications.MobileNetV2(alpha=0.35, input_shape=(96, 96, 3), weights=None)
    return randomize_batchnorm(model)


@pytest.fixture(scope="session")
def digits():
    from tf_balancer.demo import load_digits_data

    return load_digits_data(seed=0)


@pytest.fixture(scope="session")
def trained_digits_cnn(digits):
    """The digits CNN (width 16) trained 3 epochs: a small model to prune after training.
    Tests must not modify it (they assert as much with :func:`snapshot_model`)."""
    from tf_balancer.demo import build_digits_cnn, compile_classifier

    model = compile_classifier(build_digits_cnn(width=16, seed=0))
    model.fit(digits.x_train, digits.y_train, epochs=3, batch_size=64, verbose=0)
    return model


def snapshot_model(model):
    """Layer count and a copy of every weight, to prove a model was not modified."""
    return len(model.layers), [w.copy() for w in model.get_weights()]


def assert_model_unchanged(model, snapshot):
    n_layers, weights = snapshot
    assert len(model.layers) == n_layers
    for old, new in zip(weights, model.get_weights(), strict=True):
        np.testing.assert_array_equal(old, new)


def subclassed_model():
    """A built subclassed tf_keras model whose ``call`` Keras cannot trace symbolically
    (a Python branch on a tensor's value), so its layer graph stays unknown."""
    import tensorflow as tf

    class Sub(keras.Model):
        def __init__(self):
            super().__init__(name="sub")
            self.dense = keras.layers.Dense(2)

        def call(self, x):
            if tf.reduce_sum(x) > 0:  # data-dependent: no symbolic graph records it
                return self.dense(x)
            return -self.dense(x)

    model = Sub()
    model(tf.zeros((1, 4)))
    return model


def residual_concat_cnn(input_name: str | None = None, k=keras):
    """Residual Add (a/b), Concatenate (c | d), BN after `a`, Flatten -> Dense head.

    ``k`` is the Keras module to build with (tf_keras by default, or Keras 3).
    """
    layers = k.layers
    k.utils.set_random_seed(0)
    inp = k.Input((12, 12, 3), name=input_name)
    a = layers.Conv2D(8, 3, name="a")(inp)
    a = layers.ReLU(name="a_relu")(layers.BatchNormalization(name="a_bn")(a))
    b = layers.Conv2D(8, 3, padding="same", name="b")(a)
    x = layers.Add(name="add")([a, b])
    c = layers.Conv2D(6, 1, name="c")(x)
    d = layers.Conv2D(10, 3, padding="same", name="d")(x)
    e = layers.Conv2D(12, 3, name="e")(layers.Concatenate(name="cat")([c, d]))
    e = layers.Flatten(name="flat")(layers.MaxPooling2D(name="pool")(e))
    f = layers.Dense(16, activation="relu", name="fc")(e)
    return k.Model(inp, layers.Dense(5, name="out")(f))


def small_cnn_head(units: int = 1, activation=None, loss="mse"):
    """Two convs, global pooling and a Dense(units) head on 16x16x1 digits, compiled.

    ``units=1`` with ``loss="mse"`` is a regressor; with ``activation="sigmoid"`` and
    ``loss="binary_crossentropy"`` a binary classifier.
    """
    keras.utils.set_random_seed(0)
    inputs = keras.Input((16, 16, 1))
    x = keras.layers.Conv2D(8, 3, activation="relu")(inputs)
    x = keras.layers.Conv2D(8, 3, activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(units, activation=activation)(x))
    model.compile(optimizer="adam", loss=loss)
    return model


@contextlib.contextmanager
def passes_registered(passes):
    """Register test passes (name -> class) for the block, unregister them after."""
    from tf_balancer.passes.base import register_pass, unregister_pass

    for name, cls in passes.items():
        register_pass(name)(cls)
    try:
        yield passes
    finally:
        for name in passes:
            unregister_pass(name)

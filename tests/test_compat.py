"""Tests for tf_balancer._compat: the Keras boundary, both Kerases, and where Keras 2 is required."""

from __future__ import annotations

import keras as keras3  # the Keras 3 package (installed alongside tf_keras)
import numpy as np
import pytest
import tensorflow as tf
import tf_keras

from tf_balancer import _compat
from tf_balancer._compat import (
    adapter_for,
    builtin_layer_name,
    ensure_keras2_model,
    is_keras3_object,
    is_keras_model,
    is_layer,
    keras,
    keras_of,
    weight_attribute,
)
from tf_balancer.analysis import analyze, inspect
from tf_balancer.errors import TFBalancerError, UnsupportedModelError
from tf_balancer.graph.layer_graph import LayerGraph
from tf_balancer.graph.trace import trace
from tf_balancer.graph.walk import walk_model


@pytest.fixture(scope="module")
def keras3_model():
    assert keras3.__version__.startswith("3")
    return keras3.Sequential([keras3.Input((4,)), keras3.layers.Dense(2)])


@pytest.fixture(scope="module")
def tf_keras_model():
    inp = keras.Input((4,))
    return keras.Model(inp, keras.layers.Dense(2)(inp))


def test_compat_keras_is_tf_keras():
    assert keras is tf_keras
    assert _compat.layers is tf_keras.layers
    assert keras.__version__.startswith("2.")


def test_is_keras_model(tf_keras_model, keras3_model):
    class Sub(keras.Model):
        def call(self, x):
            return x

    assert is_keras_model(tf_keras_model)
    assert is_keras_model(keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)]))
    assert is_keras_model(Sub())
    assert is_keras_model(keras3_model)
    assert not is_keras_model(tf.Module())
    assert not is_keras_model(None)


def test_is_keras3_object(tf_keras_model, keras3_model):
    assert is_keras3_object(keras3_model)
    assert is_keras3_object(keras3.layers.Dense(2))
    assert not is_keras3_object(tf_keras_model)
    assert not is_keras3_object(keras.layers.Dense(2))
    assert not is_keras3_object("model.keras")


def test_ensure_keras2_model_returns_a_tf_keras_model_unchanged(tf_keras_model):
    assert ensure_keras2_model(tf_keras_model) is tf_keras_model


def test_ensure_keras2_model_rejects_keras3_with_the_fix(keras3_model):
    with pytest.raises(UnsupportedModelError) as info:
        ensure_keras2_model(keras3_model)
    message = str(info.value)
    assert message.startswith("Keras 3 model given (Sequential)")
    assert "tf_keras" in message and "TF_USE_LEGACY_KERAS" in message


def test_ensure_keras2_model_rejects_other_objects():
    with pytest.raises(UnsupportedModelError, match="expected a tf_keras Model, got Module"):
        ensure_keras2_model(tf.Module())


@pytest.mark.parametrize(
    "entry",
    [inspect, analyze, LayerGraph.from_model, trace, walk_model],
    ids=["inspect", "analyze", "LayerGraph.from_model", "trace", "walk_model"],
)
def test_every_entry_point_accepts_a_keras3_model(entry, keras3_model):
    assert entry(keras3_model) is not None


def test_adapter_for_follows_the_objects_keras(tf_keras_model, keras3_model):
    assert adapter_for(tf_keras_model).keras is tf_keras
    assert adapter_for(keras3_model).keras is keras3
    assert keras_of(keras3.layers.Dense(2)) is keras3
    with pytest.raises(UnsupportedModelError, match="expected a Keras model"):
        adapter_for(tf.Module())


def test_builtin_layer_name_matches_exact_builtin_classes_of_either_keras():
    class MyConv(keras3.layers.Conv2D):
        pass

    assert builtin_layer_name(keras.layers.Conv2D(2, 1)) == "Conv2D"
    assert builtin_layer_name(keras3.layers.Conv2D(2, 1)) == "Conv2D"
    assert builtin_layer_name(MyConv(2, 1)) is None
    assert is_layer(MyConv(2, 1), "Conv2D")


def test_weight_attribute_maps_keras3_depthwise_kernel():
    k3 = keras3.layers.DepthwiseConv2D(3)
    k3.build((1, 8, 8, 4))
    k2 = keras.layers.DepthwiseConv2D(3)
    k2.build((1, 8, 8, 4))
    assert weight_attribute(k3, "depthwise_kernel") == "kernel"
    assert weight_attribute(k2, "depthwise_kernel") == "depthwise_kernel"


def test_unsupported_model_error_is_catchable_as_type_error_and_base():
    assert issubclass(UnsupportedModelError, TypeError)
    assert issubclass(UnsupportedModelError, TFBalancerError)


@pytest.mark.parametrize("inputs", [1, 2])
def test_save_serving_model_writes_a_saved_model_that_serves_the_same_outputs(tmp_path, inputs):
    keras.utils.set_random_seed(0)
    ins = [keras.Input((4,), name=f"x{i}") for i in range(inputs)]
    joined = ins[0] if inputs == 1 else keras.layers.Concatenate()(ins)
    hidden = keras.layers.BatchNormalization()(keras.layers.Dense(3, activation="relu")(joined))
    model = keras.Model(ins, keras.layers.Dense(2)(hidden))
    path = str(tmp_path / "serving")
    adapter_for(model).save_serving_model(model, path)
    served = tf.saved_model.load(path).signatures["serving_default"]
    xs = [tf.random.stateless_normal([5, 4], seed=(i, 0)) for i in range(inputs)]
    (output,) = served(**{f"input_{i}": x for i, x in enumerate(xs)}).values()
    expected = model(xs[0] if inputs == 1 else xs, training=False)
    np.testing.assert_allclose(output.numpy(), expected.numpy(), atol=1e-6)
    assert not (tmp_path / "serving" / "keras_metadata.pb").exists()  # only what serving needs


def test_save_serving_model_of_a_subclassed_tf_keras_model_saves_it_whole(tmp_path):
    class Twice(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(2)

        def call(self, x):
            return 2.0 * self.dense(x)

    model = Twice()
    x = tf.ones([3, 4])
    expected = model(x)
    path = str(tmp_path / "subclassed")
    adapter_for(model).save_serving_model(model, path)  # no model.inputs to sign
    np.testing.assert_allclose(tf.saved_model.load(path)(x).numpy(), expected.numpy(), atol=1e-6)


_READ_WEIGHTS_SCRIPT = """
import os, sys
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import numpy as np
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras as keras3
import tf_keras
from tf_balancer._compat import local_copies, read_weights

keras = keras3 if sys.argv[1] == "keras3" else tf_keras
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
with strategy.scope():
    model = keras.Sequential([
        keras.Input((6, 6, 2)),
        keras.layers.Conv2D(4, 3),
        keras.layers.BatchNormalization(),
        keras.layers.Flatten(),
        keras.layers.Dense(3),
    ])
    model.compile("sgd", "mse")
rng = np.random.default_rng(0)
x = rng.normal(size=(8, 6, 6, 2)).astype("float32")
x[4:] *= 5  # each replica's half of the batch: different moving statistics
model.fit(x, rng.normal(size=(8, 3)), batch_size=8, epochs=1, verbose=0)
bn = model.layers[1]
copies = [np.asarray(c.numpy()) for c in local_copies(bn.moving_variance)]
assert not np.array_equal(copies[0], copies[1]), "replicas should differ"
with strategy.scope():
    expected = [layer.get_weights() for layer in model.layers]
    reduce, calls = strategy.reduce, []
    strategy.reduce = lambda *a, **k: calls.append(1) or reduce(*a, **k)
    got = read_weights(model.layers)
    print("REDUCES", len(calls))
assert len(got) == len(expected)
for a, b in zip(expected, got):
    assert len(a) == len(b)
    for u, v in zip(a, b):
        assert u.shape == v.shape and u.dtype == v.dtype and np.array_equal(u, v), (u, v)
print("OK")
"""


@pytest.mark.parametrize("which", ["tf_keras", "keras3"])
def test_read_weights_equals_get_weights_under_a_strategy(which):
    """BatchNorm's moving statistics are sync-on-read under a strategy: read in one
    reduction, they equal what a read of each gives (the mean over replicas)."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", _READ_WEIGHTS_SCRIPT, which],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "OK" in done.stdout
    if which == "tf_keras":  # moving mean and variance (MEAN), one reduction for both
        assert "REDUCES 1" in done.stdout, done.stdout


def test_read_weights_without_a_strategy_is_get_weights(tf_keras_model):
    got = _compat.read_weights(tf_keras_model.layers)
    for layer, values in zip(tf_keras_model.layers, got, strict=True):
        for u, v in zip(layer.get_weights(), values, strict=True):
            assert np.array_equal(u, v)

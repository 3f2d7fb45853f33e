"""Tests of the ``fuse_activation`` pass on small models and on MobileNetV2 after folding."""

from __future__ import annotations

import keras as keras3
import numpy as np
import pytest

from tf_balancer._compat import keras
from tf_balancer.graph.layer_graph import LayerGraph
from tf_balancer.optimizer import MetaOptimizer
from tf_balancer.passes.base import PassContext, get_pass
from tf_balancer.passes.fuse_activation import FuseActivation, activation_name

L = keras.layers


def _run(model, name="fuse_activation"):
    return get_pass(name).run(model, LayerGraph.from_model(model), PassContext())


def _assert_equivalent(model, new_model, shape, seed=0):
    x = np.random.default_rng(seed).normal(0.0, 3.0, size=shape).astype("float32")
    np.testing.assert_allclose(model(x), new_model(x), rtol=1e-4, atol=1e-5)


_PRODUCERS = {
    "conv1d": ((10, 3), lambda: L.Conv1D(5, 3, name="conv")),
    "conv2d": ((8, 8, 3), lambda: L.Conv2D(5, 3, name="conv")),
    "conv2d_transpose": ((4, 4, 3), lambda: L.Conv2DTranspose(5, 3, strides=2, name="conv")),
    "depthwise": ((8, 8, 3), lambda: L.DepthwiseConv2D(3, name="conv")),
    "separable": ((8, 8, 3), lambda: L.SeparableConv2D(5, 3, name="conv")),
    "dense": ((6,), lambda: L.Dense(5, name="conv")),
}

_ACTIVATIONS = {
    "relu": (lambda: L.ReLU(name="act"), "relu"),
    "relu6": (lambda: L.ReLU(max_value=6.0, name="act"), "relu6"),
    "swish": (lambda: L.Activation("swish", name="act"), "swish"),
    "tanh": (lambda: L.Activation("tanh", name="act"), "tanh"),
}


def _small(kind, act):
    shape, make = _PRODUCERS[kind]
    inp = keras.Input(shape, name="inp")
    x = _ACTIVATIONS[act][0]()(make()(inp))
    out = L.Dense(2, name="head")(L.Flatten(name="flat")(x))
    return keras.Model(inp, out), (3, *shape)


@pytest.mark.parametrize("kind", sorted(_PRODUCERS))
@pytest.mark.parametrize("act", sorted(_ACTIVATIONS))
def test_each_layer_type_takes_the_activation(kind, act):
    model, shape = _small(kind, act)
    weights = [w.copy() for w in model.get_weights()]
    result = _run(model)
    assert result.stats["fused"] == (("conv", "act"),)
    fused = result.model.get_layer("conv")
    assert fused.get_config()["activation"] == _ACTIVATIONS[act][1]
    assert len(result.model.layers) == len(model.layers) - 1
    _assert_equivalent(model, result.model, shape)
    assert len(model.layers) == len(result.model.layers) + 1
    assert model.get_layer("conv").get_config()["activation"] == "linear"
    for old, new in zip(weights, model.get_weights(), strict=True):
        np.testing.assert_array_equal(old, new)


def test_activation_as_model_output_keeps_the_output_name():
    inp = keras.Input((8, 8, 3), name="inp")
    model = keras.Model(inp, L.ReLU(max_value=6.0, name="out")(L.Conv2D(4, 3)(inp)))
    result = _run(model)
    assert result.changed
    assert result.model.output_names == ["out"]
    assert result.model.input_names == ["inp"]
    _assert_equivalent(model, result.model, (2, 8, 8, 3))


@pytest.mark.parametrize(
    "layer",
    [
        L.ReLU(negative_slope=0.1),
        L.ReLU(threshold=0.5),
        L.ReLU(max_value=4.0),
        L.LeakyReLU(),
    ],
    ids=["negative_slope", "threshold", "max_value_4", "leaky_relu"],
)
def test_relu_variants_without_an_activation_name_are_left_alone(layer):
    assert activation_name(layer) is None
    inp = keras.Input((8, 8, 3))
    model = keras.Model(inp, layer(L.Conv2D(4, 3)(inp)))
    result = _run(model)
    assert result.changed is False
    assert result.model is model


def test_conv_with_its_own_activation_is_not_fused():
    inp = keras.Input((6,))
    model = keras.Model(inp, L.ReLU()(L.Dense(4, activation="tanh")(inp)))
    assert _run(model).changed is False


def test_conv_output_with_a_second_consumer_is_not_fused():
    inp = keras.Input((8, 8, 3))
    conv = L.Conv2D(4, 3, name="conv")(inp)
    model = keras.Model(inp, L.Add()([L.ReLU(name="act")(conv), conv]))
    result = _run(model)
    assert result.changed is False
    assert result.model is model


def test_mobilenet_v2_after_folding_fuses_relu6(mobilenet_v2):
    folded = _run(mobilenet_v2, "fold_batchnorm").model
    result = _run(folded)
    assert result.changed
    activations = [layer.get_config().get("activation") for layer in result.model.layers]
    assert activations.count("relu6") == len(result.stats["fused"]) == 35
    assert not any(isinstance(layer, L.ReLU) for layer in result.model.layers)
    assert result.model.output_names == mobilenet_v2.output_names
    _assert_equivalent(mobilenet_v2, result.model, (2, 96, 96, 3))


def test_registered_under_its_name():
    assert isinstance(get_pass("fuse_activation"), FuseActivation)


def test_an_activation_in_another_dtype_is_not_fused():
    """Mixed precision writes the softmax head as a float32 ``Activation`` after a float16
    ``Dense``: fused, the output turned float16, verification failed and the whole pass
    was rolled back, losing the ReLU fusions with it. It stays apart now."""
    inp = keras3.Input((8, 8, 3))
    x = keras3.layers.Conv2D(4, 3, dtype="mixed_float16", name="conv")(inp)
    x = keras3.layers.ReLU(dtype="mixed_float16", name="relu")(x)
    x = keras3.layers.Flatten(dtype="mixed_float16")(x)
    x = keras3.layers.Dense(3, dtype="mixed_float16", name="dense")(x)
    model = keras3.Model(inp, keras3.layers.Activation("softmax", dtype="float32", name="probs")(x))
    result, report = MetaOptimizer(["fuse_activation"]).run(model)
    assert report.records[0].status == "applied", report.records[0].message
    assert report.records[0].stats["fused"] == (("conv", "relu"),)
    assert result.output.dtype == "float32"


@pytest.mark.parametrize("cap, expected", [(None, "relu"), (6.0, "relu6")])
def test_keras_activations_relu_is_pruned_through_and_fused(cap, expected):
    """``keras.activations.relu`` records its own operation (``ReLU``), not ``keras.ops.relu``'s
    ``Relu``: the channels behind it were unprunable and it was never fused."""
    inp = keras3.Input((8, 8, 3))
    x = keras3.activations.relu(keras3.layers.Conv2D(4, 3, name="conv")(inp), max_value=cap)
    model = keras3.Model(inp, keras3.layers.Conv2D(2, 3, name="head")(x))
    graph = LayerGraph.from_model(model)
    assert graph.group_of("conv") in {g.id for g in graph.prunable_groups}
    result, report = MetaOptimizer(["fuse_activation"]).run(model)
    assert report.records[0].status == "applied", report.records[0].message
    assert result.get_layer("conv").get_config()["activation"] == expected

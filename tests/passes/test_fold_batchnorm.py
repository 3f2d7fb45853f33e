"""Tests of the ``fold_batchnorm`` pass: real networks and one small model per layer type."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import assert_model_unchanged, randomize_batchnorm, snapshot_model

from tf_balancer._compat import keras
from tf_balancer.graph.layer_graph import LayerGraph
from tf_balancer.passes.base import PassContext, get_pass
from tf_balancer.passes.fold_batchnorm import FoldBatchNorm

L = keras.layers

_CONV_TYPES = {"Conv1D", "Conv2D", "DepthwiseConv2D", "SeparableConv2D", "Dense"}


def _run(model):
    return get_pass("fold_batchnorm").run(model, LayerGraph.from_model(model), PassContext())


def _bn_after_conv(model):
    """Names of BatchNormalization layers fed directly by a conv/dense layer."""
    nodes = LayerGraph.from_model(model).nodes
    return [
        node.name
        for node in nodes.values()
        if node.class_name == "BatchNormalization"
        and any(nodes[p].class_name in _CONV_TYPES for p in node.inputs if p in nodes)
    ]


def _randomize_biases(model, seed=0):
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if getattr(layer, "bias", None) is not None:
            layer.bias.assign(rng.normal(0.0, 0.3, layer.bias.shape).astype("float32"))
    return model


def _assert_equivalent(model, new_model, shape, seed=0):
    x = np.random.default_rng(seed).normal(size=shape).astype("float32")
    np.testing.assert_allclose(model(x), new_model(x), rtol=1e-4, atol=1e-5)


def test_mobilenet_v2_folds_every_batchnorm_and_keeps_outputs(mobilenet_v2):
    model = mobilenet_v2
    snapshot = snapshot_model(model)
    assert _bn_after_conv(model)
    result = _run(model)
    new = result.model
    assert result.changed
    assert _bn_after_conv(new) == []
    assert len(new.layers) == len(model.layers) - len(result.stats["folded"])
    assert new.input_names == model.input_names
    assert new.output_names == model.output_names
    _assert_equivalent(model, new, (2, 96, 96, 3))
    assert_model_unchanged(model, snapshot)


def test_resnet50_folds_every_batchnorm(resnet50):
    result = _run(resnet50)
    new = result.model
    assert len(result.stats["folded"]) == 53
    assert _bn_after_conv(new) == []
    assert len(new.layers) == len(resnet50.layers) - 53
    assert new.output_names == resnet50.output_names
    _assert_equivalent(resnet50, new, (2, 224, 224, 3))


def _small(kind, use_bias, bn_kwargs):
    shapes = {"conv1d": (10, 3), "conv1d_transpose": (10, 3), "dense": (6,)}
    inp = keras.Input(shapes.get(kind, (8, 8, 3)), name="inp")
    make = {
        "conv1d": lambda: L.Conv1D(5, 3, use_bias=use_bias, name="conv"),
        "conv2d": lambda: L.Conv2D(5, 3, strides=2, use_bias=use_bias, name="conv"),
        "conv2d_transpose": lambda: L.Conv2DTranspose(
            5, 3, strides=2, use_bias=use_bias, name="conv"
        ),
        "conv1d_transpose": lambda: L.Conv1DTranspose(5, 3, use_bias=use_bias, name="conv"),
        "depthwise": lambda: L.DepthwiseConv2D(3, use_bias=use_bias, name="conv"),
        "depthwise_dm2": lambda: L.DepthwiseConv2D(
            3, depth_multiplier=2, use_bias=use_bias, name="conv"
        ),
        "separable": lambda: L.SeparableConv2D(5, 3, use_bias=use_bias, name="conv"),
        "dense": lambda: L.Dense(5, use_bias=use_bias, name="conv"),
    }[kind]
    x = L.BatchNormalization(name="bn", **bn_kwargs)(make()(inp))
    out = L.Dense(2, name="head")(L.Flatten(name="flat")(L.ReLU(name="relu")(x)))
    model = keras.Model(inp, out)
    return _randomize_biases(randomize_batchnorm(model, seed=3)), (4, *inp.shape[1:])


@pytest.mark.parametrize(
    "kind",
    [
        "conv1d",
        "conv2d",
        "conv2d_transpose",
        "conv1d_transpose",
        "depthwise",
        "depthwise_dm2",
        "separable",
        "dense",
    ],
)
@pytest.mark.parametrize("use_bias", [False, True])
def test_each_layer_type_folds_exactly(kind, use_bias):
    model, shape = _small(kind, use_bias, {"epsilon": 0.01})
    snapshot = snapshot_model(model)
    result = _run(model)
    assert result.stats["folded"] == (("conv", "bn"),)
    folded = result.model.get_layer("conv")
    assert type(folded) is type(model.get_layer("conv"))
    assert folded.use_bias
    assert not any(isinstance(layer, L.BatchNormalization) for layer in result.model.layers)
    _assert_equivalent(model, result.model, shape)
    assert_model_unchanged(model, snapshot)


@pytest.mark.parametrize(
    "bn_kwargs", [{"center": False}, {"scale": False}, {"center": False, "scale": False}]
)
def test_batchnorm_without_center_or_scale_folds_exactly(bn_kwargs):
    model, shape = _small("conv2d", False, bn_kwargs)
    result = _run(model)
    assert result.changed
    _assert_equivalent(model, result.model, shape)


def test_batchnorm_as_model_output_keeps_the_output_name():
    inp = keras.Input((8, 8, 3), name="inp")
    x = L.Conv2D(4, 3, use_bias=False, name="conv")(inp)
    model = randomize_batchnorm(keras.Model(inp, L.BatchNormalization(name="bn")(x)))
    result = _run(model)
    assert result.model.output_names == ["bn"]
    assert result.model.input_names == ["inp"]
    _assert_equivalent(model, result.model, (2, 8, 8, 3))


def test_conv_output_with_a_second_consumer_is_not_folded():
    inp = keras.Input((8, 8, 3))
    conv = L.Conv2D(4, 3, name="conv")(inp)
    x = L.BatchNormalization(name="bn")(conv)
    model = keras.Model(inp, L.Add(name="add")([x, conv]))
    result = _run(model)
    assert result.changed is False
    assert result.model is model


def test_conv_with_a_nonlinear_activation_is_not_folded():
    inp = keras.Input((8, 8, 3))
    x = L.Conv2D(4, 3, activation="relu", name="conv")(inp)
    model = keras.Model(inp, L.BatchNormalization(name="bn")(x))
    assert _run(model).changed is False


def test_batchnorm_over_a_non_channel_axis_is_not_folded():
    inp = keras.Input((8, 8, 3))
    x = L.Conv2D(4, 3, name="conv")(inp)
    model = keras.Model(inp, L.BatchNormalization(axis=1, name="bn")(x))
    assert _run(model).changed is False


def test_batchnorm_called_in_training_mode_is_not_folded():
    inp = keras.Input((8, 8, 3))
    x = L.Conv2D(4, 3, name="conv")(inp)
    model = keras.Model(inp, L.BatchNormalization(name="bn")(x, training=True))
    assert _run(model).changed is False


def test_model_without_batchnorm_is_returned_unchanged():
    inp = keras.Input((6,))
    model = keras.Model(inp, L.Dense(2)(inp))
    result = _run(model)
    assert result.changed is False
    assert result.model is model


def test_registered_under_its_name():
    assert isinstance(get_pass("fold_batchnorm"), FoldBatchNorm)

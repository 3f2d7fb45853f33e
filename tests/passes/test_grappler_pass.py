"""Tests of the ``grappler`` pass: Grappler on MobileNetV2's frozen inference graph.

The model ends in logits (``classifier_activation=None``) so that a 1e-4
tolerance means something (softmax outputs over 1000 classes are ~1e-3).
"""

from __future__ import annotations

import keras as keras3
import numpy as np
import pytest
import tensorflow as tf
from conftest import randomize_batchnorm

from tf_balancer._compat import keras
from tf_balancer.graph.grappler import op_type_counts
from tf_balancer.graph.layer_graph import LayerGraph
from tf_balancer.optimizer import MetaOptimizer
from tf_balancer.passes.base import PassContext, get_pass

L = keras.layers
SHAPE = (96, 96, 3)


@pytest.fixture(scope="module")
def mobilenet():
    keras.utils.set_random_seed(0)
    model = keras.applications.MobileNetV2(
        alpha=0.35, input_shape=SHAPE, weights=None, classifier_activation=None
    )
    return randomize_batchnorm(model)


@pytest.fixture(scope="module")
def folded(mobilenet):
    model, report = MetaOptimizer(["fold_batchnorm"]).run(mobilenet)
    assert report.records[0].status == "applied"
    return model


@pytest.fixture(scope="module")
def grappled(folded):
    return get_pass("grappler").run(folded, LayerGraph.from_model(folded), PassContext())


def _x(batch):
    return np.random.default_rng(batch).normal(size=(batch, *SHAPE)).astype("float32")


def _fused_batchnorm_ops(function):
    ops = op_type_counts(function.graph.as_graph_def())
    return {op: n for op, n in ops.items() if "FusedBatchNorm" in op}


@pytest.mark.parametrize("batch", [1, 3])
def test_outputs_equal_the_keras_model_with_an_open_batch_axis(mobilenet, grappled, batch):
    x = _x(batch)
    expected = mobilenet(x, training=False).numpy()
    (actual,) = tf.nest.flatten(grappled.model(tf.constant(x)))
    assert actual.shape == expected.shape == (batch, 1000)
    np.testing.assert_allclose(actual.numpy(), expected, rtol=1e-4, atol=1e-4)


def test_no_fused_batchnorm_remains_and_nodes_shrink(grappled):
    assert grappled.changed
    assert not get_pass("grappler").keras_output
    assert _fused_batchnorm_ops(grappled.model) == {}
    stats = grappled.stats
    assert stats["nodes_before"] >= stats["nodes_after"]
    assert stats["nodes_after"] == len(grappled.model.graph.as_graph_def().node)
    assert str(stats["nodes_after"]) in grappled.message


def test_grappler_alone_also_removes_fused_batchnorm(mobilenet):
    result = get_pass("grappler").run(mobilenet, LayerGraph.from_model(mobilenet), PassContext())
    assert result.stats["op_types_before"].get("FusedBatchNormV3", 0) == 52
    assert _fused_batchnorm_ops(result.model) == {}
    x = _x(3)
    (actual,) = tf.nest.flatten(result.model(tf.constant(x)))
    np.testing.assert_allclose(actual.numpy(), mobilenet(x, training=False), rtol=1e-4, atol=1e-4)


def test_optimizer_options_select_grappler_optimizers(folded):
    ctx = PassContext(options={"grappler": {"optimizers": ["pruning"]}})
    result = get_pass("grappler").run(folded, LayerGraph.from_model(folded), ctx)
    ops = result.stats["op_types_after"]
    assert "_FusedConv2D" not in ops  # ``remap`` was not asked for
    assert ops.get("Conv2D", 0) > 0


def test_meta_optimizer_runs_grappler_last(mobilenet):
    function, report = MetaOptimizer(["fold_batchnorm", "grappler"]).run(mobilenet)
    assert [r.status for r in report.records] == ["applied", "applied"]
    record = report.records[-1]
    assert record.stats["nodes_before"] >= record.stats["nodes_after"]
    assert record.after["flops"] > 0
    x = _x(3)
    (actual,) = tf.nest.flatten(function(tf.constant(x)))
    np.testing.assert_allclose(actual.numpy(), mobilenet(x, training=False), rtol=1e-4, atol=1e-4)


def test_grappler_record_counts_fused_ops_and_graph_params(mobilenet_v2):
    """Grappler removes no arithmetic: its record must not claim it did (fused ops and
    frozen constants are counted like the unfused Keras model)."""
    from tf_balancer.optimizer import MetaOptimizer

    passes = ["fold_batchnorm", "fuse_activation", "grappler"]
    _, report = MetaOptimizer(passes).run(mobilenet_v2)
    record = report.records[-1]
    assert record.name == "grappler" and record.status == "applied"
    assert record.after["flops"] >= 0.99 * record.before["flops"]
    assert record.after["flops"] <= record.before["flops"]
    assert record.after["params"] == pytest.approx(record.before["params"], rel=0.01)


@pytest.mark.parametrize("k", [keras, keras3], ids=["tf_keras", "keras3"])
def test_a_captured_constant_becomes_part_of_the_graph_not_an_input(k):
    """A layer holding a constant tensor (``Rescaling`` with a per-channel scale, as in
    EfficientNet) is captured by the trace; freezing makes it a constant. The function
    Grappler returns takes the model's one input, not the constant as a second one (it
    did when the input names were read from the traced function's inputs)."""
    inp = k.Input((4, 4, 3))
    x = k.layers.Rescaling([0.5, 1.0, 2.0])(inp)
    model = k.Model(inp, k.layers.Conv2D(2, 3)(x))
    function, report = MetaOptimizer(["grappler"]).run(model)
    assert report.records[0].status == "applied", report.records[0].message
    x = np.random.default_rng(0).random((2, 4, 4, 3), np.float32)
    (actual,) = tf.nest.flatten(function(tf.constant(x)))
    np.testing.assert_allclose(actual.numpy(), model(x).numpy(), rtol=1e-5, atol=1e-6)


def test_a_batchnorm_with_ragged_channels_does_not_cost_the_whole_pass():
    """Grappler's remapper fuses an inference BatchNorm and its ReLU into
    ``_FusedBatchNormEx``, which TensorFlow then rejects when the channels are not a
    multiple of 4 - common after pruning (a pre-activation block with 39 channels).
    The pass was rolled back; now Grappler runs again without ``remap`` and says so."""
    inp = keras.Input((8, 8, 39))
    x = L.Conv2D(39, 3, padding="same", use_bias=False)(inp)
    x = L.Add()([L.BatchNormalization()(x), inp])
    x = L.ReLU()(x)
    x = L.Activation("relu")(L.BatchNormalization()(x))  # the BN no conv precedes
    model = randomize_batchnorm(keras.Model(inp, L.GlobalAveragePooling2D()(x)))
    function, report = MetaOptimizer(["grappler"]).run(model)
    (record,) = report.records
    assert record.status == "applied", record.message
    assert "without remap" in record.message and "divisible by 4" in record.message
    x = np.random.default_rng(0).random((2, 8, 8, 39), np.float32)
    (actual,) = tf.nest.flatten(function(tf.constant(x)))
    np.testing.assert_allclose(actual.numpy(), model(x).numpy(), rtol=1e-4, atol=1e-5)

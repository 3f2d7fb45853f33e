"""Grappler on frozen GraphDefs, GraphDef -> ConcreteFunction, and fold + Grappler end to end."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.protobuf import rewriter_config_pb2

from tf_balancer.errors import ConfigError, UnsupportedModelError
from tf_balancer.graph.graphdef_fold import BN_OPS, fold_batchnorm_graphdef
from tf_balancer.graph.grappler import (
    GRAPPLER_OPTIMIZERS,
    graph_def_to_function,
    grappler_config,
    op_type_counts,
    optimize_concrete_function,
    run_grappler,
)
from tf_balancer.graph.trace import freeze, trace_keras

_ON, _OFF = rewriter_config_pb2.RewriterConfig.ON, rewriter_config_pb2.RewriterConfig.OFF


def _frozen_scale():
    fn = tf.function(lambda x: {"y": x * tf.constant(2.0) * tf.constant(3.0), "x": x + 1.0})
    return freeze(fn.get_concrete_function(tf.TensorSpec([2, 3], tf.float32)))


def test_grappler_config_turns_on_only_the_named_optimizers():
    rewrite = grappler_config(["constfold", "remap"]).graph_options.rewrite_options
    assert rewrite.constant_folding == _ON and rewrite.remapping == _ON
    assert rewrite.arithmetic_optimization == _OFF and rewrite.layout_optimizer == _OFF
    assert rewrite.disable_model_pruning and rewrite.min_graph_nodes == -1
    assert not grappler_config(["pruning"]).graph_options.rewrite_options.disable_model_pruning
    assert "constfold" in GRAPPLER_OPTIMIZERS


def test_unknown_optimizer_name_raises_config_error():
    with pytest.raises(ConfigError, match="choose from"):
        grappler_config(["constant_folding"])


def test_run_grappler_folds_constant_multiplications():
    graph_def, frozen = _frozen_scale()
    outputs = [t.name for t in frozen.outputs]
    optimized = run_grappler(graph_def, ["x:0"], outputs, optimizers=["constfold", "arithmetic"])
    assert op_type_counts(graph_def)["Mul"] == 2
    assert op_type_counts(optimized)["Mul"] == 1
    fn = graph_def_to_function(optimized, ["x:0"], outputs)
    x = tf.reshape(tf.range(6.0), [2, 3])
    for got, want in zip(fn(x), frozen(x), strict=True):
        np.testing.assert_allclose(got, want)


def test_graph_def_to_function_returns_the_requested_structure():
    graph_def, frozen = _frozen_scale()
    names = {"a": frozen.outputs[0].name, "b": [frozen.outputs[1].name]}
    fn = graph_def_to_function(graph_def, ["x"], names)
    out = fn(tf.ones([2, 3]))
    assert set(out) == {"a", "b"} and isinstance(out["b"], list)
    assert {float(out["a"][0, 0]), float(out["b"][0][0, 0])} == {2.0, 6.0}


def test_unknown_tensor_names_raise_a_clear_error():
    graph_def, frozen = _frozen_scale()
    with pytest.raises(UnsupportedModelError, match="is not a tensor"):
        run_grappler(graph_def, ["nope:0"], [frozen.outputs[0].name])
    with pytest.raises(UnsupportedModelError, match="is not a tensor"):
        graph_def_to_function(graph_def, ["x:0"], "missing:0")


def test_optimize_concrete_function_keeps_outputs_and_structure():
    graph_def, frozen = _frozen_scale()
    fast, stats = optimize_concrete_function(frozen)
    x = tf.reshape(tf.range(6.0), [2, 3])
    got, want = fast(x), frozen(x)
    assert type(got) is type(want) and len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b)
    assert stats["nodes_before"] == len(graph_def.node)
    assert stats["nodes_after"] < stats["nodes_before"]
    assert stats["op_types_after"]["Mul"] < stats["op_types_before"]["Mul"]


@pytest.fixture(scope="module")
def traced_mobilenet(mobilenet_v2):
    return trace_keras(mobilenet_v2)


def test_mobilenet_fold_then_grappler_matches_and_shrinks(mobilenet_v2, traced_mobilenet):
    frozen = traced_mobilenet.function
    inputs, outputs = [t.name for t in frozen.inputs], [t.name for t in frozen.outputs]
    folded, stats = fold_batchnorm_graphdef(traced_mobilenet.graph_def)
    assert stats["folds"] == stats["op_types_before"]["FusedBatchNormV3"] == 52
    assert not any(node.op in BN_OPS for node in folded.node)
    optimized = run_grappler(folded, inputs, outputs)
    assert len(optimized.node) <= len(folded.node) < len(traced_mobilenet.graph_def.node)
    assert "_FusedConv2D" in op_type_counts(optimized)  # remap ran for the CPU

    x = tf.random.stateless_uniform([1, 96, 96, 3], seed=(0, 1), minval=-1.0, maxval=1.0)
    want = mobilenet_v2(x, training=False).numpy()
    for graph_def in (folded, optimized):
        got = graph_def_to_function(graph_def, inputs, outputs)(x)[0].numpy()
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
        # Softmax flattens differences; its log exposes the logits' error.
        np.testing.assert_allclose(np.log(got), np.log(want), atol=1e-4)


def test_mobilenet_optimize_concrete_function_runs(mobilenet_v2, traced_mobilenet):
    fast, stats = optimize_concrete_function(traced_mobilenet.function)
    assert stats["nodes_after"] <= stats["nodes_before"]
    x = tf.random.stateless_uniform([1, 96, 96, 3], seed=(2, 3))
    got = fast(x)[0].numpy()
    np.testing.assert_allclose(got, mobilenet_v2(x, training=False), rtol=1e-4, atol=1e-6)

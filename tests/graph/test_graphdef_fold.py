"""Constant batch-norm folding on frozen GraphDefs of plain (non-Keras) tf.functions."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from tf_balancer.graph.graphdef_fold import BN_OPS, fold_batchnorm_graphdef
from tf_balancer.graph.grappler import graph_def_to_function
from tf_balancer.graph.trace import trace_function

_KERNELS = {  # kind -> (input shape without batch, kernel shape, channels)
    "conv": ((8, 8, 4), (3, 3, 4, 6), 6),
    "depthwise": ((8, 8, 3), (3, 3, 3, 2), 6),
    "matmul": ((5,), (5, 6), 6),
    "matmul_t": ((5,), (6, 5), 6),
}


def _rand(rng, shape, low=None, high=None):
    if low is None:
        return tf.Variable(rng.normal(0.0, 0.5, shape).astype("float32"))
    return tf.Variable(rng.uniform(low, high, shape).astype("float32"))


def _kernel_op(kind, x, kernel):
    if kind == "conv":
        return tf.nn.conv2d(x, kernel, 1, "SAME")
    if kind == "depthwise":
        return tf.nn.depthwise_conv2d(x, kernel, [1, 1, 1, 1], "SAME")
    return tf.matmul(x, kernel, transpose_b=kind == "matmul_t")


def _bn_function(kind, bias=True, bn_op="V3", seed=0):
    """A tf.function: kernel op (+ bias) -> FusedBatchNorm (inference) -> relu."""
    rng = np.random.default_rng(seed)
    x_shape, k_shape, c = _KERNELS[kind]
    kernel, b = _rand(rng, k_shape), _rand(rng, (c,))
    gamma, beta, mean = _rand(rng, (c,), 0.5, 1.5), _rand(rng, (c,)), _rand(rng, (c,))
    var = _rand(rng, (c,), 0.5, 2.0)

    @tf.function(input_signature=[tf.TensorSpec((None, *x_shape), tf.float32)])
    def forward(x):
        y = _kernel_op(kind, x, kernel)
        if bias:
            y = tf.nn.bias_add(y, b)
        if kind.startswith("matmul"):
            y = tf.reshape(y, [-1, 1, 1, c])
        if bn_op == "V1":
            y = tf.raw_ops.FusedBatchNorm(
                x=y, scale=gamma, offset=beta, mean=mean, variance=var, is_training=False
            )[0]
        else:
            y, _, _ = tf.compat.v1.nn.fused_batch_norm(
                y, gamma, beta, mean, var, epsilon=1e-3, is_training=False
            )
        return tf.nn.relu(y)

    forward.variables_ = (kernel, b, gamma, beta, mean, var)  # keep alive
    return forward, x_shape


def _fold_and_compare(fn, x_shape, batch=2):
    traced = trace_function(fn, batch_size=batch)
    folded, stats = fold_batchnorm_graphdef(traced.graph_def)
    f = traced.function
    new_fn = graph_def_to_function(folded, [t.name for t in f.inputs], [t.name for t in f.outputs])
    x = tf.random.stateless_normal((batch, *x_shape), seed=(1, 2))
    np.testing.assert_allclose(new_fn(x)[0], f(x)[0], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(new_fn(x)[0], fn(x), rtol=1e-4, atol=1e-5)
    return folded, stats


def _bn_count(graph_def):
    return sum(node.op in BN_OPS for node in graph_def.node)


@pytest.mark.parametrize("kind", ["conv", "depthwise", "matmul", "matmul_t"])
@pytest.mark.parametrize("bias", [True, False])
def test_fold_matches_original_and_removes_batch_norm(kind, bias):
    fn, x_shape = _bn_function(kind, bias=bias)
    folded, stats = _fold_and_compare(fn, x_shape)
    assert stats["folds"] == 1, stats["skipped"]
    assert _bn_count(folded) == 0
    assert stats["op_types_after"].get("BiasAdd", 0) == 1
    assert stats["op_types_before"]["FusedBatchNormV3"] == 1


def test_fold_handles_fused_batch_norm_v1():
    fn, x_shape = _bn_function("conv", bn_op="V1", seed=3)
    folded, stats = _fold_and_compare(fn, x_shape)
    assert stats["op_types_before"].get("FusedBatchNorm") == 1
    assert stats["folds"] == 1 and _bn_count(folded) == 0


def test_fold_removes_the_unused_statistics_constants():
    fn, x_shape = _bn_function("conv", bias=True)
    folded, stats = _fold_and_compare(fn, x_shape)
    consts = stats["op_types_before"]["Const"] - stats["op_types_after"]["Const"]
    assert consts == 4  # scale, offset, mean, variance; kernel and bias are rewritten in place


def test_shared_kernel_is_copied_before_scaling():
    rng = np.random.default_rng(5)
    kernel = _rand(rng, (3, 3, 3, 4))
    stats_a = [_rand(rng, (4,), 0.5, 1.5) for _ in range(4)]
    stats_b = [_rand(rng, (4,), 0.5, 1.5) for _ in range(4)]

    @tf.function(input_signature=[tf.TensorSpec((None, 6, 6, 3), tf.float32)])
    def forward(x):
        outs = []
        for s in (stats_a, stats_b):
            y = tf.nn.conv2d(x, kernel, 1, "SAME")
            outs.append(tf.compat.v1.nn.fused_batch_norm(y, *s, is_training=False)[0])
        return outs[0] - outs[1]

    folded, stats = _fold_and_compare(forward, (6, 6, 3))
    assert stats["folds"] == 2 and _bn_count(folded) == 0
    # The first fold copies the shared kernel; the second then owns the original.
    assert sum(node.name.endswith("folded_kernel") for node in folded.node) == 1
    assert stats["op_types_after"]["Conv2D"] == 2


def test_non_constant_mean_leaves_graph_unchanged():
    rng = np.random.default_rng(1)
    kernel, gamma, beta, var = (_rand(rng, s, 0.5, 1.5) for s in ((1, 1, 3, 4), 4, 4, 4))
    specs = [tf.TensorSpec((None, 4, 4, 3), tf.float32), tf.TensorSpec((4,), tf.float32)]

    @tf.function(input_signature=specs)
    def forward(x, mean):
        y = tf.nn.conv2d(x, kernel, 1, "VALID")
        return tf.compat.v1.nn.fused_batch_norm(y, gamma, beta, mean, var, is_training=False)[0]

    traced = trace_function(forward)
    folded, stats = fold_batchnorm_graphdef(traced.graph_def)
    assert folded == traced.graph_def
    assert stats["folds"] == 0
    assert "not a constant" in next(iter(stats["skipped"].values()))


def test_conv_with_another_consumer_is_not_folded():
    rng = np.random.default_rng(2)
    kernel, *bn = (_rand(rng, s, 0.5, 1.5) for s in ((3, 3, 3, 4), 4, 4, 4, 4))

    @tf.function(input_signature=[tf.TensorSpec((None, 6, 6, 3), tf.float32)])
    def forward(x):
        y = tf.nn.conv2d(x, kernel, 1, "SAME")
        return tf.compat.v1.nn.fused_batch_norm(y, *bn, is_training=False)[0] + y

    folded, stats = _fold_and_compare(forward, (6, 6, 3))
    assert stats["folds"] == 0 and _bn_count(folded) == 1
    assert "other consumers" in next(iter(stats["skipped"].values()))


def test_consumed_batch_statistics_block_the_fold():
    rng = np.random.default_rng(4)
    kernel, *bn = (_rand(rng, s, 0.5, 1.5) for s in ((3, 3, 3, 4), 4, 4, 4, 4))

    @tf.function(input_signature=[tf.TensorSpec((None, 6, 6, 3), tf.float32)])
    def forward(x):
        y = tf.nn.conv2d(x, kernel, 1, "SAME")
        out, batch_mean, _ = tf.compat.v1.nn.fused_batch_norm(y, *bn, is_training=False)
        return out + tf.reduce_sum(batch_mean)

    folded, stats = _fold_and_compare(forward, (6, 6, 3))
    assert stats["folds"] == 0 and _bn_count(folded) == 1
    assert "outputs 1..5" in next(iter(stats["skipped"].values()))


def test_protected_bias_add_is_not_rewritten():
    fn, x_shape = _bn_function("conv", bias=True, seed=7)
    traced = trace_function(fn)
    bias_add = next(node.name for node in traced.graph_def.node if node.op == "BiasAdd")
    folded, stats = fold_batchnorm_graphdef(traced.graph_def, protected=[bias_add])
    assert stats["folds"] == 0 and folded == traced.graph_def

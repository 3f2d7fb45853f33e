"""Tests for tf_balancer.graph.trace: every supported input traces to a frozen GraphDef."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from conftest import subclassed_model

from tf_balancer._compat import keras
from tf_balancer.errors import ModelLoadError, UnsupportedModelError
from tf_balancer.graph.trace import BATCH_NORM_OPS, TracedGraph, op_flops, trace, trace_keras
from tf_balancer.input_shapes import set_nominal_shapes

L = keras.layers
_CORE_OPS = ("Conv2D", "MatMul", "BiasAdd", "DepthwiseConv2dNative")


def _sequential() -> keras.Model:
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [
            keras.Input((8, 8, 3)),
            L.Conv2D(4, 3, name="conv"),
            L.DepthwiseConv2D(3, name="dw"),
            L.BatchNormalization(name="bn"),
            L.ReLU(name="relu"),
            L.Flatten(name="flat"),
            L.Dense(2, name="head"),
        ],
        name="seq_model",
    )


def _nested() -> keras.Model:
    keras.utils.set_random_seed(1)
    inner_in = keras.Input((8, 8, 4))
    y = L.Conv2D(5, 3, padding="same", name="conv")(inner_in)
    inner = keras.Model(inner_in, L.BatchNormalization(name="bn")(y), name="inner")
    seq = keras.Sequential([L.Conv2D(6, 1, name="sc"), L.ReLU(name="r")], name="seq")
    inp = keras.Input((8, 8, 3))
    x = seq(inner(L.Conv2D(4, 3, padding="same", name="conv")(inp)))
    out = L.Dense(3, name="head")(L.GlobalAveragePooling2D(name="gap")(x))
    return keras.Model(inp, out, name="outer")


class _Affine(tf.Module):
    """A plain tf.Module: one matmul + relu inside a name scope."""

    def __init__(self):
        super().__init__()
        self.w = tf.Variable(np.arange(12, dtype="float32").reshape(4, 3) / 10.0)

    @tf.function(input_signature=[tf.TensorSpec((None, 4), tf.float32, name="x")])
    def __call__(self, x):
        with tf.name_scope("dense"):
            return tf.nn.relu(tf.matmul(x, self.w))


class _Unscoped(tf.Module):
    """A plain tf.Module whose ops live in no name scope."""

    def __init__(self):
        super().__init__()
        self.w = tf.Variable(np.ones((4, 3), dtype="float32"))

    @tf.function(input_signature=[tf.TensorSpec((None, 4), tf.float32, name="x")])
    def __call__(self, x):
        return tf.nn.relu(tf.matmul(x, self.w))


def _x(shape, batch=1, seed=0):
    return np.random.default_rng(seed).normal(size=(batch, *shape)).astype("float32")


def _run(traced: TracedGraph, x):
    """Call the frozen function on one input, whatever its signature style."""
    out = traced.function(tf.constant(x))
    return tf.nest.flatten(out)[0].numpy()


def _assert_core_ops_mapped(traced: TracedGraph):
    core = [n.name for n in traced.graph_def.node if n.op in _CORE_OPS]
    assert core, "expected conv/matmul/bias ops in the graph"
    unmapped = [name for name in core if name not in traced.op_to_layer]
    assert not unmapped


@pytest.fixture(scope="module")
def saved_dirs(tmp_path_factory):
    """A tf_keras SavedModel and a plain tf.Module SavedModel, saved once."""
    root = tmp_path_factory.mktemp("trace_saved")
    model = _sequential()
    keras_dir = str(root / "keras_model")
    model.save(keras_dir)
    module = _Affine()
    module_dir = str(root / "module")
    tf.saved_model.save(module, module_dir)
    unscoped_dir = str(root / "unscoped")
    tf.saved_model.save(_Unscoped(), unscoped_dir)
    return {"keras": (keras_dir, model), "module": (module_dir, module), "unscoped": unscoped_dir}


def test_trace_sequential_model_maps_every_core_op():
    model = _sequential()
    traced = trace(model)
    _assert_core_ops_mapped(traced)
    assert set(traced.op_to_layer.values()) <= {"conv", "dw", "bn", "relu", "flat", "head"}
    assert {"conv", "dw", "head"} <= set(traced.op_to_layer.values())
    types = traced.op_types()
    assert types["Conv2D"] == 1 and types["MatMul"] == 1
    np.testing.assert_allclose(_run(traced, _x((8, 8, 3))), model(_x((8, 8, 3))), atol=1e-5)


def test_trace_freezes_variables_into_constants():
    traced = trace(_sequential())
    ops = set(traced.op_types())
    assert not ops & {"VarHandleOp", "ReadVariableOp", "ResourceGather"}
    assert "Const" in ops


def test_trace_functional_model_with_nested_models_uses_scoped_layer_names():
    model = _nested()
    traced = trace(model)
    _assert_core_ops_mapped(traced)
    by_op = {n.name: traced.op_to_layer[n.name] for n in traced.graph_def.node if n.op == "Conv2D"}
    assert sorted(by_op.values()) == ["conv", "inner/conv", "seq/sc"]
    # Two layers called "conv" (outer and nested) are told apart.
    assert "inner/conv" in set(traced.op_to_layer.values())
    assert "seq/r" in set(traced.op_to_layer.values())
    np.testing.assert_allclose(_run(traced, _x((8, 8, 3))), model(_x((8, 8, 3))), atol=1e-5)


def test_trace_multi_input_model():
    keras.utils.set_random_seed(2)
    a, b = keras.Input((4,), name="a"), keras.Input((3,), name="b")
    x = L.Concatenate(name="cat")([L.Dense(2, name="da")(a), L.Dense(2, name="db")(b)])
    model = keras.Model([a, b], L.Dense(1, name="out")(x))
    traced = trace(model, batch_size=2)
    _assert_core_ops_mapped(traced)
    xa, xb = _x((4,), 2, 0), _x((3,), 2, 1)
    got = tf.nest.flatten(traced.function(tf.constant(xa), tf.constant(xb)))[0]
    np.testing.assert_allclose(got, model([xa, xb]), atol=1e-5)


def test_trace_fixes_the_batch_size():
    traced = trace(_sequential(), batch_size=3)
    assert traced.batch_size == 3
    placeholders = [n for n in traced.graph_def.node if n.op == "Placeholder"]
    assert [d.size for d in placeholders[0].attr["shape"].shape.dim] == [3, 8, 8, 3]
    flops_1 = sum(op_flops(trace(_sequential(), batch_size=1).graph).values())
    assert sum(op_flops(traced.graph).values()) == 3 * flops_1


def test_trace_tf_function_with_input_signature():
    w = tf.constant(np.arange(8, dtype="float32").reshape(4, 2))

    @tf.function(input_signature=[tf.TensorSpec((None, 4), tf.float32)])
    def fn(x):
        with tf.name_scope("proj"):
            return tf.nn.relu(tf.matmul(x, w))

    traced = trace(fn, batch_size=2)
    assert traced.op_types()["MatMul"] == 1
    x = _x((4,), 2)
    np.testing.assert_allclose(_run(traced, x), fn(x), atol=1e-5)
    assert "proj" in set(traced.op_to_layer.values())


def test_trace_concrete_function():
    module = _Affine()
    traced = trace(module.__call__.get_concrete_function(), batch_size=2)
    assert traced.op_types()["MatMul"] == 1
    assert not {"VarHandleOp", "ReadVariableOp"} & set(traced.op_types())
    np.testing.assert_allclose(_run(traced, _x((4,), 2)), module(_x((4,), 2)), atol=1e-5)


def test_trace_keras_savedmodel_directory(saved_dirs):
    path, model = saved_dirs["keras"]
    traced = trace(path)
    assert {"Conv2D", "DepthwiseConv2dNative", "MatMul"} <= set(traced.op_types())
    _assert_core_ops_mapped(traced)
    x = _x((8, 8, 3))
    np.testing.assert_allclose(_run(traced, x), model(x), atol=1e-5)


def test_trace_plain_module_savedmodel_directory(saved_dirs):
    path, module = saved_dirs["module"]
    traced = trace(path, batch_size=2)
    assert traced.op_types()["MatMul"] == 1
    matmul = next(n.name for n in traced.graph_def.node if n.op == "MatMul")
    assert traced.op_to_layer[matmul] == "dense"
    np.testing.assert_allclose(_run(traced, _x((4,), 2)), module(_x((4,), 2)), atol=1e-5)


def test_trace_attributes_ops_outside_any_name_scope(saved_dirs):
    """Ops at a function's top level still need an owner, or their FLOPs are lost.

    Without one, ``inspect`` of such a SavedModel reports 0 FLOPs.
    """
    traced = trace(saved_dirs["unscoped"])
    with_flops = [name for name, flops in op_flops(traced.graph).items() if flops]
    assert with_flops, "MatMul has registered FLOPs"
    assert [name for name in with_flops if name not in traced.op_to_layer] == []


def test_op_flops_agree_with_the_profiler_except_batchnorm():
    """Equal to the profiler, except BatchNorm: 2 per element where the profiler says 0."""
    traced = trace(_nested())
    options = tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()
    options["output"] = "none"
    profile = tf.compat.v1.profiler.profile(graph=traced.graph, options=options)
    counted = op_flops(traced.graph)
    batchnorm = [op for op in traced.graph.get_operations() if op.type in BATCH_NORM_OPS]
    assert batchnorm, "the nested model has a BatchNormalization"
    for op in batchnorm:
        assert counted[op.name] == 2 * op.outputs[0].shape.num_elements()
    extra = sum(counted[op.name] for op in batchnorm)
    assert sum(counted.values()) == profile.total_float_ops + extra > extra


def test_trace_missing_path_raises_model_load_error(tmp_path):
    with pytest.raises(ModelLoadError, match="no such file"):
        trace(str(tmp_path / "missing"))


def test_trace_directory_without_savedmodel_raises_model_load_error(tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(ModelLoadError, match="not a SavedModel"):
        trace(tmp_path)


def test_trace_corrupt_savedmodel_raises_model_load_error(tmp_path):
    (tmp_path / "saved_model.pb").write_bytes(b"\x00garbage\xff" * 10)
    with pytest.raises(ModelLoadError, match="could not load"):
        trace(str(tmp_path))


def test_trace_rejects_unknown_objects():
    with pytest.raises(UnsupportedModelError, match="cannot trace"):
        trace(42)


def test_trace_of_open_input_axes_needs_their_sizes_and_keeps_them_open_at_open_batch():
    inp = keras.Input((None, 4))
    model = keras.Model(inp, L.Dense(2)(inp))
    with pytest.raises(UnsupportedModelError, match="unknown size.*input_shape="):
        trace(model)
    assert trace_keras(model, batch_size=None).function.inputs[0].shape.as_list() == [None, None, 4]
    set_nominal_shapes(model, (6, 4))
    assert trace(model, batch_size=2).function.inputs[0].shape.as_list() == [2, 6, 4]


def test_trace_rejects_subclassed_model_with_a_clear_error():
    model = subclassed_model()
    with pytest.raises(UnsupportedModelError, match="subclassed"):
        trace(model)


class _BranchOnTensor(L.Layer):
    """A custom layer with Python control flow on a tensor (needs AutoGraph in a graph)."""

    def call(self, x):
        if tf.reduce_sum(x) > 0:
            return x * 2.0
        return x - 1.0


def test_trace_keeps_autograph_for_a_custom_layer_that_branches_on_a_tensor():
    # Tracing runs without AutoGraph (faster) and falls back to it for such layers;
    # both inputs below take a different branch, so neither was frozen into the graph.
    keras.utils.set_random_seed(0)
    inp = keras.Input((4,))
    out = L.Dense(3, name="head")(_BranchOnTensor(name="branch")(L.Dense(4, name="d")(inp)))
    model = keras.Model(inp, out)
    traced = trace(model)
    for x in (np.ones((1, 4), np.float32) * 5, -np.ones((1, 4), np.float32) * 5):
        np.testing.assert_allclose(_run(traced, x), model(x, training=False).numpy(), rtol=1e-6)

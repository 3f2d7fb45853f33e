"""Tests for tf_balancer.analysis: analyze(), inspect() and their errors."""

from __future__ import annotations

import json
import warnings

import keras as keras3
import numpy as np
import pytest
import tensorflow as tf
from conftest import profiler_flops, randomize_batchnorm, residual_concat_cnn, subclassed_model

from tf_balancer._compat import keras
from tf_balancer.analysis import analyze, inspect, load_model
from tf_balancer.errors import ModelLoadError, TFBalancerError, UnsupportedModelError
from tf_balancer.graph.layer_graph import LayerGraph
from tf_balancer.graph.trace import trace

L = keras.layers


def _model() -> keras.Model:
    keras.utils.set_random_seed(0)
    inp = keras.Input((8, 8, 3), name="image")
    x = L.Conv2D(4, 3, name="conv")(inp)
    x = L.BatchNormalization(name="bn")(x)
    x = L.ReLU(name="relu")(x)
    x = L.Dropout(0.5, name="drop")(x)
    x = L.Flatten(name="flatten")(x)
    return keras.Model(inp, L.Dense(2, name="head")(x), name="tiny")


class _Affine(tf.Module):
    def __init__(self):
        super().__init__()
        self.w = tf.Variable(np.ones((4, 3), dtype="float32"))
        self.b = tf.Variable(np.zeros((3,), dtype="float32"))

    @tf.function(input_signature=[tf.TensorSpec((None, 4), tf.float32, name="x")])
    def __call__(self, x):
        with tf.name_scope("dense"):
            return tf.nn.bias_add(tf.matmul(x, self.w), self.b)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The tiny model saved as a Keras SavedModel and as .h5, and a plain tf.Module SavedModel."""
    root = tmp_path_factory.mktemp("analysis")
    model = _model()
    model.save(str(root / "keras_sm"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "HDF5 is a legacy format"
        model.save(str(root / "model.h5"))
    tf.saved_model.save(_Affine(), str(root / "module_sm"))
    return root, model


def test_analyze_bundles_graph_trace_and_cost():
    model = _model()
    analysis = analyze(model, batch_size=2)
    assert analysis.model is model
    assert list(analysis.graph.nodes) == ["conv", "bn", "relu", "drop", "flatten", "head"]
    assert list(analysis.cost.layers) == list(analysis.graph.nodes)
    assert analysis.traced.batch_size == analysis.cost.batch_size == 2
    assert set(analysis.measured_flops) <= set(analysis.graph.nodes)
    assert analysis.cost.flops == profiler_flops(analysis.traced.graph)


def test_inspect_rows_and_totals():
    result = inspect(_model())
    rows = {r.name: r for r in result.rows}
    assert list(rows) == ["conv", "bn", "relu", "drop", "flatten", "head"]
    assert result.total_flops == sum(r.flops for r in result.rows)
    assert result.total_params == sum(r.params for r in result.rows) == _model().count_params()
    assert sum(r.flops_pct for r in result.rows) == pytest.approx(100.0)
    assert rows["conv"].prunable and rows["conv"].why_not == ""
    assert rows["conv"].output_shape == (None, 6, 6, 4)
    assert rows["conv"].group == rows["bn"].group == rows["flatten"].group
    assert not rows["head"].prunable and "model output" in rows["head"].why_not
    assert (result.prunable_groups, result.groups) == (1, 2)  # groups with a producer
    assert result.source == "Functional"


def test_inspect_says_why_a_layer_it_cannot_prune_through_is_not_prunable():
    # An opaque layer's row carries the reason, not only its consumers' rows.
    class Scale(keras.layers.Layer):  # a custom layer: its channel semantics are unknown
        def build(self, input_shape):
            self.w = self.add_weight(name="w", shape=(int(input_shape[-1]),))

        def call(self, x):
            return x * self.w

    inp = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(4, 3, padding="same", name="conv")(inp)
    x = keras.layers.LayerNormalization(name="norm")(x)
    x = Scale(name="scale")(keras.layers.Conv2D(4, 3, padding="same", name="conv2")(x))
    rows = {r.name: r for r in inspect(keras.Model(inp, keras.layers.Conv2D(1, 1)(x))).rows}
    assert "normalises across channels" in rows["conv"].why_not
    assert "normalises across channels" in rows["norm"].why_not
    assert not rows["conv2"].prunable and "does not understand" in rows["conv2"].why_not
    assert not rows["scale"].prunable and "does not understand" in rows["scale"].why_not


def test_inspect_table_lists_every_layer_and_the_total():
    table = inspect(_model()).table()
    lines = table.splitlines()
    for name in ("conv", "bn", "relu", "drop", "flatten", "head"):
        assert any(line.startswith(name + " ") for line in lines), name
    assert lines[-1].startswith("TOTAL")
    assert "groups prunable" in lines[-1]
    assert lines[0].split()[:2] == ["layer", "type"]


def test_inspect_json_round_trips():
    result = inspect(_model())
    data = json.loads(result.to_json())
    assert data["total_flops"] == result.total_flops
    assert data["total_params"] == result.total_params
    assert [row["name"] for row in data["rows"]] == [r.name for r in result.rows]
    assert data == json.loads(json.dumps(result.to_dict()))


def test_inspect_counts_flops_at_the_batch_size():
    one, four = inspect(_model(), batch_size=1), inspect(_model(), batch_size=4)
    assert four.total_flops == 4 * one.total_flops
    assert four.total_activation_bytes == 4 * one.total_activation_bytes
    assert four.total_params == one.total_params


def test_inspect_keras_savedmodel_matches_the_model(saved):
    root, model = saved
    from_path = inspect(str(root / "keras_sm"))
    in_memory = inspect(model)
    assert from_path.source == str(root / "keras_sm")
    assert [r.name for r in from_path.rows] == [r.name for r in in_memory.rows]
    assert from_path.total_flops == in_memory.total_flops
    assert from_path.total_params == in_memory.total_params
    assert from_path.prunable_groups == in_memory.prunable_groups


def test_inspect_h5_file_matches_the_model(saved):
    root, model = saved
    assert inspect(root / "model.h5").total_flops == inspect(model).total_flops
    assert isinstance(load_model(root / "model.h5"), keras.Model)


def test_inspect_plain_savedmodel_gives_a_graph_level_view(saved):
    root, _ = saved
    path = str(root / "module_sm")
    assert load_model(path) is None
    result = inspect(path, batch_size=2)
    assert [r.name for r in result.rows] == ["dense"]
    assert result.total_flops == profiler_flops(trace(path, batch_size=2).graph) == 2 * 24 + 6
    assert result.total_params == 4 * 3 + 3
    assert not result.rows[0].prunable
    assert "no Keras metadata" in result.rows[0].why_not


def test_analysis_does_not_modify_the_model():
    model = _model()
    weights = [w.copy() for w in model.get_weights()]
    inbound = [len(layer._inbound_nodes) for layer in model.layers]
    outbound = [len(layer._outbound_nodes) for layer in model.layers]
    analyze(model)
    inspect(model)
    analyze(model).cost_under({1: 2})
    for before, after in zip(weights, model.get_weights(), strict=True):
        np.testing.assert_array_equal(before, after)
    assert [len(layer._inbound_nodes) for layer in model.layers] == inbound
    assert [len(layer._outbound_nodes) for layer in model.layers] == outbound
    assert [layer.name for layer in model.layers][1:] == [
        "conv",
        "bn",
        "relu",
        "drop",
        "flatten",
        "head",
    ]


@pytest.mark.parametrize("entry", [inspect, analyze, LayerGraph.from_model])
def test_subclassed_model_is_rejected_with_a_clear_error(entry):
    model = subclassed_model()  # built, but its call() cannot be traced symbolically
    with pytest.raises(UnsupportedModelError) as info:
        entry(model)
    message = str(info.value)
    assert "subclassed" in message and "Functional" in message


def test_inspect_missing_path_raises_model_load_error(tmp_path):
    with pytest.raises(ModelLoadError, match="no such file or directory"):
        inspect(str(tmp_path / "nope"))


def test_inspect_non_savedmodel_directory_raises_model_load_error(tmp_path):
    (tmp_path / "readme.txt").write_text("hello")
    with pytest.raises(ModelLoadError, match="not a SavedModel"):
        inspect(str(tmp_path))


def test_inspect_rejects_a_non_positive_batch_size():
    with pytest.raises(TFBalancerError, match="batch_size"):
        inspect(_model(), batch_size=0)


@pytest.mark.parametrize("k", [keras, keras3], ids=["tf_keras", "keras3"])
def test_unfrozen_analysis_costs_the_same_as_frozen(k):
    """The optimizer's per-pass stats skip freezing; they must not change a number."""
    model = randomize_batchnorm(residual_concat_cnn(k=k))
    frozen, unfrozen = analyze(model), analyze(model, frozen=False)
    assert unfrozen.cost.layers == frozen.cost.layers
    assert unfrozen.measured_flops == frozen.measured_flops
    assert any(op.type == "ReadVariableOp" for op in unfrozen.traced.graph.get_operations())

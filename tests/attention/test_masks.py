"""Tests for tf_balancer.attention.masks: pruned channels become exact zeros."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import residual_concat_cnn

from tf_balancer._compat import keras
from tf_balancer.attention.balance import Allocation
from tf_balancer.attention.masks import apply_masks, channel_masks, masked_copy
from tf_balancer.graph.layer_graph import LayerGraph

L = keras.layers

# Channels pruned per group, named by the group's first producer.
PRUNED = {"a": [0, 3, 7], "c": [], "d": [1, 5], "e": [2, 11], "fc": [4]}
SPATIAL = 16  # e's output after pooling is 4x4x12, flattened into fc


def _model() -> keras.Model:
    """Residual Add (a/b), Concatenate (c | d), BN with random stats, Flatten -> Dense."""
    model = residual_concat_cnn(input_name="image")
    rng = np.random.default_rng(0)
    for layer in model.layers:  # no weight is zero before masking
        layer.set_weights([rng.uniform(0.5, 1.5, w.shape).astype("float32") for w in layer.weights])
    return model


def _plan(graph: LayerGraph) -> Allocation:
    sizes, keep = {}, {}
    for producer, pruned in PRUNED.items():
        group = graph.groups[graph.group_of(producer)]
        sizes[group.id] = group.size
        keep[group.id] = np.setdiff1d(np.arange(group.size), pruned)
    return Allocation(keep, sizes, "manual", 0.5, "flops", 0.5, 0.0)


def _keep_all(graph: LayerGraph) -> Allocation:
    sizes = {g.id: g.size for g in graph.prunable_groups}
    keep = {g: np.arange(n) for g, n in sizes.items()}
    return Allocation(keep, sizes, "manual", 1.0, "flops", 1.0, 0.0)


def _weights(model: keras.Model) -> dict[str, list[np.ndarray]]:
    return {layer.name: [w.copy() for w in layer.get_weights()] for layer in model.layers}


def _expected_masked(model: keras.Model) -> dict[str, list[np.ndarray]]:
    """The model's weights with the plan's channels zeroed, written out by hand."""
    w = _weights(model)
    ab, d, e, fc = PRUNED["a"], PRUNED["d"], PRUNED["e"], PRUNED["fc"]
    for name in ("a", "b"):  # producers of the residual group: kernel columns and bias
        w[name][0][..., ab] = 0
        w[name][1][ab] = 0
    for array in w["a_bn"]:  # gamma, beta, moving mean and variance
        array[ab] = 0
    for name in ("b", "c", "d"):  # consumers of the residual group: kernel rows
        w[name][0][:, :, ab, :] = 0
    w["d"][0][..., d] = 0
    w["d"][1][d] = 0
    w["e"][0][:, :, [6 + i for i in d], :] = 0  # d sits after c's 6 channels in the concat
    w["e"][0][..., e] = 0
    w["e"][1][e] = 0
    w["fc"][0][[s * 12 + i for s in range(SPATIAL) for i in e], :] = 0  # every position
    w["fc"][0][:, fc] = 0
    w["fc"][1][fc] = 0
    w["out"][0][fc, :] = 0
    return w


def _assert_weights_equal(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        assert len(actual[name]) == len(expected[name]), name
        for i, (got, want) in enumerate(zip(actual[name], expected[name], strict=True)):
            np.testing.assert_array_equal(got, want, err_msg=f"{name} weight {i}")


@pytest.fixture(scope="module")
def model_and_graph():
    model = _model()
    return model, LayerGraph.from_model(model)


def test_masked_copy_zeroes_exactly_the_planned_weights(model_and_graph):
    model, graph = model_and_graph
    original = _weights(model)
    masked = masked_copy(graph, _plan(graph))
    assert masked is not model
    _assert_weights_equal(_weights(masked), _expected_masked(model))
    _assert_weights_equal(_weights(model), original)  # the user's model is untouched


def test_masked_copy_outputs_exact_zeros_at_the_pruned_channels(model_and_graph):
    model, graph = model_and_graph
    masked = masked_copy(graph, _plan(graph))
    names = ["a", "a_bn", "a_relu", "b", "add", "d", "cat", "e", "pool", "flat", "fc"]
    probe = keras.Model(masked.inputs, [masked.get_layer(n).output for n in names])
    x = np.random.default_rng(1).normal(size=(4, 12, 12, 3)).astype("float32")
    outputs = dict(zip(names, (o.numpy() for o in probe(x, training=False)), strict=True))
    channels = {
        **{n: PRUNED["a"] for n in ("a", "a_bn", "a_relu", "b", "add")},
        "d": PRUNED["d"],
        "cat": [6 + i for i in PRUNED["d"]],
        "e": PRUNED["e"],
        "pool": PRUNED["e"],
        "flat": [s * 12 + i for s in range(SPATIAL) for i in PRUNED["e"]],
        "fc": PRUNED["fc"],
    }
    for name, pruned in channels.items():
        assert np.all(outputs[name][..., pruned] == 0), name
        kept = np.setdiff1d(np.arange(outputs[name].shape[-1]), pruned)
        assert np.any(outputs[name][..., kept] != 0), name


def test_apply_masks_in_place_zeroes_the_same_weights(model_and_graph):
    model, graph = model_and_graph
    copy = _model()
    own_graph = LayerGraph.from_model(copy)
    _assert_weights_equal(_weights(copy), _weights(model))
    apply_masks(own_graph, _plan(own_graph))
    _assert_weights_equal(_weights(copy), _expected_masked(model))
    masked = masked_copy(graph, _plan(graph))
    _assert_weights_equal(_weights(copy), _weights(masked))


def test_channel_masks_cover_each_touched_weight_once(model_and_graph):
    _, graph = model_and_graph
    masks = channel_masks(graph, _plan(graph))
    touched = {name for name, _ in masks}
    assert touched == {"a", "a_bn", "b", "c", "d", "e", "fc", "out"}
    assert ("a_bn", "moving_variance") in masks and ("out", "bias") not in masks
    assert masks[("fc", "kernel")].shape == (SPATIAL * 12, 16)
    assert set(np.unique(masks[("e", "kernel")])) == {0.0, 1.0}


def test_a_plan_keeping_everything_changes_nothing(model_and_graph):
    model, graph = model_and_graph
    plan = _keep_all(graph)
    assert channel_masks(graph, plan) == {}
    masked = masked_copy(graph, plan)
    _assert_weights_equal(_weights(masked), _weights(model))
    x = np.random.default_rng(2).normal(size=(4, 12, 12, 3)).astype("float32")
    np.testing.assert_array_equal(masked(x, training=False), model(x, training=False))

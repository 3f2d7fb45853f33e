"""Tests for tf_balancer.attention.importance: criteria, their registry, attention weights."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from tf_balancer._compat import keras
from tf_balancer.attention.importance import (
    ProbeData,
    attention_weights,
    balance_score,
    get_importance,
    group_scores,
    register_importance,
    registered_importances,
)
from tf_balancer.demo import build_digits_cnn, compile_classifier
from tf_balancer.errors import ConfigError
from tf_balancer.graph.layer_graph import LayerGraph

L = keras.layers
CRITERIA = ["magnitude", "taylor", "activation", "apoz", "bn_scale"]


@pytest.fixture(scope="module")
def trained(digits):
    """The digits CNN after one epoch, its graph and a probe of 128 labelled images."""
    model = compile_classifier(build_digits_cnn(seed=0))
    model.fit(digits.x_train, digits.y_train, epochs=1, batch_size=64, verbose=0)
    probe = ProbeData(digits.x_train[:128], digits.y_train[:128], batch_size=64, max_batches=2)
    return model, LayerGraph.from_model(model), probe


def _small_model() -> keras.Model:
    """conv(bias) -> BN -> ReLU -> conv(no bias) -> Flatten -> Dense(bias) -> Dense."""
    keras.utils.set_random_seed(1)
    inp = keras.Input((6, 6, 2))
    x = L.Conv2D(5, 3, name="a")(inp)
    x = L.ReLU(name="relu")(L.BatchNormalization(name="bn")(x))
    x = L.Conv2D(4, 3, use_bias=False, name="b")(x)
    x = L.Dense(3, name="fc")(L.Flatten(name="flat")(x))
    model = keras.Model(inp, L.Dense(2, name="out")(x))
    rng = np.random.default_rng(0)
    for layer in model.layers:  # non-zero biases and signed gammas
        layer.set_weights([rng.normal(size=w.shape).astype("float32") for w in layer.weights])
    return model


def _per_group(graph: LayerGraph, per_node: dict[str, np.ndarray]) -> dict[int, np.ndarray]:
    return {
        g.id: np.sum([per_node[p] for p in g.nodes("producer")], axis=0)
        for g in graph.prunable_groups
    }


@pytest.mark.parametrize("criterion", CRITERIA)
def test_each_criterion_scores_every_channel_of_every_prunable_group(trained, criterion):
    _, graph, probe = trained
    per_node = get_importance(criterion)(graph, probe)
    producers = {p: g.size for g in graph.prunable_groups for p in g.nodes("producer")}
    assert {name: len(s) for name, s in per_node.items()} == producers
    scores = group_scores(graph, probe, criterion)
    assert set(scores) == {g.id for g in graph.prunable_groups}
    for group in graph.prunable_groups:
        s = scores[group.id]
        assert s.shape == (group.size,) and s.dtype == np.float64
        assert np.all(np.isfinite(s)) and np.all(s >= 0) and np.any(s > 0)
    mean = np.mean(np.concatenate(list(scores.values())))
    assert mean == pytest.approx(1.0)  # normalized by the mean over all prunable channels


def test_magnitude_is_the_norm_of_each_output_channel_weights():
    model = _small_model()
    graph = LayerGraph.from_model(model)
    kernel_a, bias_a = model.get_layer("a").get_weights()
    kernel_b = model.get_layer("b").get_weights()[0]
    kernel_fc, bias_fc = model.get_layer("fc").get_weights()
    expected = {
        "a": np.abs(kernel_a).sum(axis=(0, 1, 2)) + np.abs(bias_a),
        "b": np.abs(kernel_b).sum(axis=(0, 1, 2)),
        "fc": np.abs(kernel_fc).sum(axis=0) + np.abs(bias_fc),
    }
    raw = get_importance("magnitude")(graph, None)
    assert set(raw) == set(expected)
    for name, value in expected.items():
        np.testing.assert_allclose(raw[name], value, rtol=1e-6)
    l2 = get_importance("magnitude")(graph, None, p=2)
    np.testing.assert_allclose(l2["b"], np.sqrt((kernel_b**2).sum(axis=(0, 1, 2))), rtol=1e-6)
    scores = group_scores(graph, None, "magnitude")
    scale = np.mean(np.concatenate([expected[n] for n in ("a", "b", "fc")]))
    np.testing.assert_allclose(scores[graph.group_of("a")], expected["a"] / scale, rtol=1e-6)


def test_bn_scale_is_the_absolute_gamma_of_the_following_batchnorm():
    model = _small_model()
    graph = LayerGraph.from_model(model)
    gamma = model.get_layer("bn").gamma.numpy()
    assert np.any(gamma < 0)
    raw = get_importance("bn_scale")(graph, None)
    np.testing.assert_allclose(raw["a"], np.abs(gamma), rtol=1e-6)
    np.testing.assert_array_equal(raw["fc"], np.ones(3))  # no BatchNorm in the group


def test_bn_scale_of_a_residual_group_sums_the_gammas_of_its_batchnorms(trained):
    model, graph, _ = trained
    gid = graph.group_of("conv1")
    assert gid == graph.group_of("conv3")
    per_group = _per_group(graph, get_importance("bn_scale")(graph, None))
    expected = np.abs(model.get_layer("bn1").gamma.numpy()) + np.abs(
        model.get_layer("bn3").gamma.numpy()
    )
    np.testing.assert_allclose(per_group[gid], expected, rtol=1e-6)


def test_activation_is_the_mean_absolute_output_after_the_producers_chain(trained, digits):
    """conv4 -> bn4 -> relu4 -> pool2 is conv4's chain; it ends where Flatten begins."""
    model, graph, probe = trained
    raw = get_importance("activation")(graph, probe)
    probe_model = keras.Model(model.inputs, model.get_layer("pool2").output)
    out = np.abs(probe_model(digits.x_train[:128], training=False).numpy())
    assert np.any(out > 0)
    np.testing.assert_allclose(raw["conv4"], out.mean(axis=(0, 1, 2)), rtol=1e-5)


def test_apoz_is_one_minus_the_fraction_of_zeros_after_the_relu(trained, digits):
    """conv1 -> bn1 -> relu1, which feeds two layers: APoZ is measured at relu1."""
    model, graph, probe = trained
    raw = get_importance("apoz")(graph, probe)
    probe_model = keras.Model(model.inputs, model.get_layer("relu1").output)
    out = probe_model(digits.x_train[:128], training=False).numpy()
    expected = 1.0 - (out == 0).mean(axis=(0, 1, 2))
    assert np.all((raw["conv1"] >= 0) & (raw["conv1"] <= 1))
    np.testing.assert_allclose(raw["conv1"], expected, rtol=1e-6)


def test_taylor_is_the_absolute_weight_times_gradient_summed_over_batches(trained):
    model, graph, probe = trained
    raw = get_importance("taylor")(graph, probe)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    kernel = model.get_layer("conv4").kernel
    expected = 0.0
    for xb, yb in probe.batches():
        with tf.GradientTape() as tape:
            loss = loss_fn(yb, model(xb, training=False))
        grad = tape.gradient(loss, kernel).numpy()
        expected = expected + np.abs((kernel.numpy() * grad).sum(axis=(0, 1, 2)))
    assert np.any(expected > 0)
    np.testing.assert_allclose(raw["conv4"], expected, rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("criterion", ["taylor", "activation", "apoz"])
def test_data_driven_criteria_without_probe_data_raise_config_error(trained, criterion):
    _, graph, _ = trained
    with pytest.raises(ConfigError, match="probe data"):
        group_scores(graph, None, criterion)


def test_taylor_without_labels_raises_config_error(trained, digits):
    _, graph, _ = trained
    with pytest.raises(ConfigError, match="labels"):
        group_scores(graph, ProbeData(digits.x_train[:64]), "taylor")


def test_taylor_on_an_uncompiled_model_without_a_loss_raises_config_error(digits):
    graph = LayerGraph.from_model(build_digits_cnn(seed=0))
    probe = ProbeData(digits.x_train[:32], digits.y_train[:32])
    with pytest.raises(ConfigError, match="loss"):
        group_scores(graph, probe, "taylor")


def test_combined_criteria_are_the_weighted_sum_of_mean_normalized_scores(trained):
    _, graph, _ = trained
    weights = {"magnitude": 2.0, "bn_scale": 0.5}
    combined = group_scores(graph, None, weights)
    expected = {g.id: np.zeros(g.size) for g in graph.prunable_groups}
    for name, weight in weights.items():
        per_group = _per_group(graph, get_importance(name)(graph, None))
        mean = np.mean(np.concatenate(list(per_group.values())))
        for gid, s in per_group.items():
            expected[gid] += weight * s / mean
    for gid, s in expected.items():
        np.testing.assert_allclose(combined[gid], s, rtol=1e-6)


@pytest.mark.parametrize("importance", [{"magnitude": -1.0}, {"magnitude": 0.0}, {}])
def test_bad_criterion_weights_raise_config_error(trained, importance):
    _, graph, _ = trained
    with pytest.raises(ConfigError, match="importance weights"):
        group_scores(graph, None, importance)


def test_unknown_criterion_raises_config_error_listing_the_names(trained):
    _, graph, _ = trained
    with pytest.raises(ConfigError, match="snip") as err:
        group_scores(graph, None, "snip")
    assert all(name in str(err.value) for name in CRITERIA)
    assert set(CRITERIA) <= set(registered_importances())


def test_registering_a_duplicate_criterion_raises_value_error():
    before = get_importance("magnitude")
    with pytest.raises(ValueError, match="magnitude"):
        register_importance("magnitude")(lambda graph, probe: {})
    assert get_importance("magnitude") is before


def test_attention_weights_are_shares_of_the_total_importance():
    weights = attention_weights({0: np.array([1.0, 3.0]), 1: np.array([2.0]), 2: np.zeros(4)})
    assert sum(weights.values()) == pytest.approx(1.0)
    assert weights == pytest.approx({0: 4 / 6, 1: 2 / 6, 2: 0.0})
    even = attention_weights({0: np.zeros(2), 1: np.zeros(3)})
    assert even == {0: 0.5, 1: 0.5}


def test_attention_weights_of_real_scores_sum_to_one(trained):
    _, graph, probe = trained
    weights = attention_weights(group_scores(graph, probe, "taylor"))
    assert sum(weights.values()) == pytest.approx(1.0)
    assert all(w >= 0 for w in weights.values())


def test_balance_score_is_one_for_even_attention_and_lower_for_skewed():
    assert balance_score({0: 0.25, 1: 0.25, 2: 0.25, 3: 0.25}) == pytest.approx(1.0)
    assert balance_score({0: 1.0}) == 1.0
    skewed = balance_score({0: 0.7, 1: 0.1, 2: 0.1, 3: 0.1})
    assert 0.0 < skewed < 1.0
    assert balance_score({0: 0.97, 1: 0.01, 2: 0.01, 3: 0.01}) < skewed
    assert balance_score({0: 1.0, 1: 0.0}) == pytest.approx(0.0)


@pytest.mark.parametrize("criterion", CRITERIA)
def test_scoring_leaves_the_model_weights_unchanged(trained, criterion):
    model, graph, probe = trained
    before = [w.copy() for w in model.get_weights()]
    group_scores(graph, probe, criterion)
    after = model.get_weights()
    assert len(before) == len(after)
    for old, new in zip(before, after, strict=True):
        np.testing.assert_array_equal(old, new)


def _two_heads():
    keras.utils.set_random_seed(0)
    image, extra = keras.Input((8, 8, 1), name="image"), keras.Input((5,), name="extra")
    x = keras.layers.Conv2D(8, 3, activation="relu")(image)
    x = keras.layers.Dense(8, activation="relu")(keras.layers.GlobalAveragePooling2D()(x))
    x = keras.layers.Concatenate()([x, keras.layers.Dense(4, activation="relu")(extra)])
    cls = keras.layers.Dense(3, activation="softmax", name="cls")(x)
    reg = keras.layers.Dense(1, name="reg")(x)
    model = keras.Model([image, extra], [cls, reg])
    model.compile(
        "adam",
        {"cls": "sparse_categorical_crossentropy", "reg": "mse"},
        loss_weights={"cls": 1.0, "reg": 0.5},
    )
    return model


def test_taylor_on_two_outputs_uses_the_weighted_compiled_losses_for_any_label_structure():
    """Labels as a dict by output name, a list or a tuple; inputs as a list or a dict."""
    model = _two_heads()
    graph = LayerGraph.from_model(model)
    rng = np.random.default_rng(0)
    x = [
        rng.normal(size=(40, 8, 8, 1)).astype("float32"),
        rng.normal(size=(40, 5)).astype("float32"),
    ]
    y = {"cls": rng.integers(0, 3, 40), "reg": rng.normal(size=(40, 1)).astype("float32")}
    scce, mse = keras.losses.SparseCategoricalCrossentropy(), keras.losses.MeanSquaredError()

    def by_hand(labels, outputs):
        return scce(labels["cls"], outputs[0]) + 0.5 * mse(labels["reg"], outputs[1])

    taylor = get_importance("taylor")
    expected = taylor(graph, ProbeData(x, y, loss=by_hand, batch_size=16))
    assert any(np.any(v > 0) for v in expected.values())
    structures = [
        (x, y),
        ({"image": x[0], "extra": x[1]}, y),
        (x, [y["cls"], y["reg"]]),
        (tuple(x), (y["cls"], y["reg"])),
    ]
    for xs, ys in structures:
        got = taylor(graph, ProbeData(xs, ys, batch_size=16))
        for name, value in expected.items():
            np.testing.assert_allclose(got[name], value, rtol=1e-4, atol=1e-7)

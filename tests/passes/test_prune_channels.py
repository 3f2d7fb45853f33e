"""Tests of the ``prune_channels`` pass: compact == masked, on real networks and small models.

The reference for a compacted model is the *masked* model (pruned channels set
to exact zeros, :func:`~tf_balancer.attention.masks.masked_copy`): removing a
channel whose weights are all zero must not change any output. Models end in
logits (``classifier_activation=None``) so that differences are visible.
"""

from __future__ import annotations

import keras as keras3
import numpy as np
import pytest
from conftest import assert_model_unchanged, profiler_flops, randomize_batchnorm, snapshot_model

from tf_balancer._compat import keras
from tf_balancer.analysis import analyze, inspect
from tf_balancer.attention.balance import KeepPlan, allocate
from tf_balancer.attention.importance import group_scores
from tf_balancer.attention.masks import masked_copy
from tf_balancer.graph.layer_graph import LayerGraph
from tf_balancer.optimizer import MetaOptimizer
from tf_balancer.passes.base import PassContext, get_pass
from tf_balancer.passes.prune_channels import PruneChannels, plan_from_masks

L = keras.layers
RTOL, ATOL = 1e-4, 1e-5


def _inputs(model, batch=2, seed=0):
    shape = (batch, *model.inputs[0].shape[1:])
    return np.random.default_rng(seed).normal(size=shape).astype("float32")


def _assert_compact_equals_masked(compact, masked, x):
    expected = masked(x, training=False).numpy()
    actual = compact(x, training=False).numpy()
    assert np.abs(expected).max() > 1e-3, "outputs too small to show a difference"
    np.testing.assert_allclose(actual, expected, rtol=RTOL, atol=ATOL)


def _assert_same_plan(found, plan):
    pruned = {g for g in plan.keep if len(plan.pruned(g))}
    assert {g for g in found.keep if len(found.pruned(g))} == pruned
    for gid in pruned:
        np.testing.assert_array_equal(found.keep[gid], plan.keep[gid])


class _Compaction:
    """A model pruned to 50% FLOPs with magnitude scores, and everything derived from it."""

    def __init__(self, model, batch=2):
        snapshot = snapshot_model(model)
        self.model = model
        self.analysis = analyze(model)
        scores = group_scores(self.analysis.graph, None, "magnitude")
        self.plan = allocate(self.analysis, scores, 0.5)
        self.result = PruneChannels().run(model, self.analysis.graph, PassContext(plan=self.plan))
        self.masked = masked_copy(self.analysis.graph, self.plan)
        self.flops_ratio = analyze(self.result.model).cost.flops / self.analysis.cost.flops
        self.x = _inputs(model, batch)
        self.unchanged = lambda: assert_model_unchanged(model, snapshot)


@pytest.fixture(scope="module")
def resnet_compaction():
    keras.utils.set_random_seed(0)
    model = keras.applications.ResNet50(weights=None, classifier_activation=None)
    return _Compaction(randomize_batchnorm(model))


@pytest.fixture(scope="module")
def mobilenet_compaction():
    keras.utils.set_random_seed(0)
    model = keras.applications.MobileNetV2(
        alpha=0.35, input_shape=(96, 96, 3), weights=None, classifier_activation=None
    )
    return _Compaction(randomize_batchnorm(model))


@pytest.fixture(params=["resnet50", "mobilenet_v2"])
def compaction(request, resnet_compaction, mobilenet_compaction):
    return {"resnet50": resnet_compaction, "mobilenet_v2": mobilenet_compaction}[request.param]


def test_compact_flops_match_the_plan(compaction):
    assert compaction.result.changed
    assert compaction.plan.achieved <= 0.5
    assert compaction.flops_ratio == pytest.approx(compaction.plan.achieved, rel=0.02)


def test_compact_outputs_equal_the_masked_model(compaction):
    _assert_compact_equals_masked(compaction.result.model, compaction.masked, compaction.x)


def test_compact_producers_have_the_planned_widths(compaction):
    graph, compact = compaction.analysis.graph, compaction.result.model
    checked = 0
    for gid, kept in compaction.plan.keep.items():
        for name in graph.groups[gid].nodes("producer"):
            config = compact.get_layer(name).get_config()
            assert config.get("filters", config.get("units")) == len(kept)
            checked += 1
    assert checked >= len(compaction.plan.keep)
    assert compact.count_params() < compaction.model.count_params()


def test_input_model_is_not_modified(compaction):
    compaction.unchanged()


def test_plan_from_masks_recovers_the_plan(resnet_compaction):
    found = plan_from_masks(LayerGraph.from_model(resnet_compaction.masked))
    _assert_same_plan(found, resnet_compaction.plan)


# --- small hand-built models: one per layer pattern -------------------------------------------


def _conv(filters, name, kernel=3):
    return L.Conv2D(filters, kernel, padding="same", name=name)


def _head(x):
    return L.Dense(3, name="logits")(L.GlobalAveragePooling2D(name="gap")(x))


def _concat():
    inp = keras.Input((8, 8, 3))
    a = L.ReLU(name="relu_a")(L.BatchNormalization(name="bn_a")(_conv(6, "conv_a")(inp)))
    b = _conv(5, "conv_b")(inp)
    x = L.Concatenate(name="cat")([a, b])
    return keras.Model(inp, _head(_conv(4, "conv_c")(x))), ("conv_a",)


def _flatten_dense():
    inp = keras.Input((8, 8, 3))
    x = L.ReLU(name="relu")(L.Conv2D(6, 3, strides=2, name="conv")(inp))
    x = L.Dense(8, activation="relu", name="fc")(L.Flatten(name="flat")(x))
    return keras.Model(inp, L.Dense(3, name="logits")(x)), ("conv", "fc")


def _depthwise():
    inp = keras.Input((8, 8, 3))
    x = L.ReLU(name="relu1")(L.BatchNormalization(name="bn1")(_conv(6, "conv1")(inp)))
    x = L.DepthwiseConv2D(3, padding="same", name="dw")(x)
    x = L.ReLU(name="relu2")(L.BatchNormalization(name="bn2")(x))
    return keras.Model(inp, _head(_conv(5, "conv2", kernel=1)(x))), ("conv1", "conv2")


def _separable():
    inp = keras.Input((8, 8, 3))
    x = L.ReLU(name="relu1")(_conv(6, "conv1")(inp))
    x = L.SeparableConv2D(7, 3, padding="same", name="sep")(x)
    x = L.ReLU(name="relu2")(L.BatchNormalization(name="bn")(x))
    return keras.Model(inp, _head(_conv(4, "conv2", kernel=1)(x))), ("conv1", "sep", "conv2")


def _residual_add():
    inp = keras.Input((8, 8, 3))
    a = L.ReLU(name="relu_a")(_conv(6, "conv_a")(inp))
    b = L.BatchNormalization(name="bn_b")(_conv(6, "conv_b")(a))
    x = L.ReLU(name="relu")(L.Add(name="add")([a, b]))
    return keras.Model(inp, _head(_conv(4, "conv_c")(x))), ("conv_a", "conv_c")


def _gap_dense():
    inp = keras.Input((8, 8, 3))
    x = L.GlobalAveragePooling2D(name="gap")(L.ReLU(name="relu")(_conv(6, "conv")(inp)))
    x = L.Dense(8, activation="relu", name="fc")(x)
    return keras.Model(inp, L.Dense(3, name="logits")(x)), ("conv", "fc")


def _nested():
    inner_in = keras.Input((8, 8, 6))
    y = L.ReLU(name="relu")(L.BatchNormalization(name="bn")(_conv(5, "conv")(inner_in)))
    inner = keras.Model(inner_in, y, name="block")
    inp = keras.Input((8, 8, 3))
    x = inner(L.ReLU(name="relu0")(_conv(6, "conv0")(inp)))
    return keras.Model(inp, _head(_conv(4, "conv_out")(x))), ("conv0", "block/conv", "conv_out")


def _transposed():
    inp = keras.Input((8, 8, 3))
    a = L.ReLU(name="relu_a")(_conv(6, "conv_a")(inp))
    x = L.Conv2DTranspose(5, 3, strides=2, padding="same", name="up")(a)
    x = L.ReLU(name="relu_up")(L.BatchNormalization(name="bn_up")(x))
    return keras.Model(inp, _head(_conv(4, "conv_c")(x))), ("conv_a", "up", "conv_c")


SMALL = {
    "concat": _concat,
    "transposed": _transposed,
    "flatten_dense": _flatten_dense,
    "depthwise": _depthwise,
    "separable": _separable,
    "residual_add": _residual_add,
    "gap_dense": _gap_dense,
    "nested": _nested,
}


def _randomize_biases(model, seed=0):
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            _randomize_biases(layer, seed + 1)
        elif getattr(layer, "bias", None) is not None:
            layer.bias.assign(rng.normal(0.0, 0.3, layer.bias.shape).astype("float32"))
    return model


def _small(kind):
    keras.utils.set_random_seed(1)
    model, producers = SMALL[kind]()
    return _randomize_biases(randomize_batchnorm(model, seed=2)), producers


def _random_plan(graph, producers, seed=0):
    """Keep a random half of each group produced by ``producers``; others stay whole."""
    rng = np.random.default_rng(seed)
    chosen = {graph.group_of(name) for name in producers}
    keep, sizes = {}, {}
    for group in graph.prunable_groups:
        sizes[group.id] = group.size
        if group.id in chosen:
            keep[group.id] = np.sort(rng.choice(group.size, group.size // 2, replace=False))
        else:
            keep[group.id] = np.arange(group.size)
    return KeepPlan(keep, sizes)


@pytest.mark.parametrize("kind", sorted(SMALL))
def test_small_model_compact_equals_masked(kind):
    model, producers = _small(kind)
    snapshot = snapshot_model(model)
    graph = LayerGraph.from_model(model)
    assert all(graph.group_of(p) in {g.id for g in graph.prunable_groups} for p in producers)
    plan = _random_plan(graph, producers)
    result = PruneChannels().run(model, graph, PassContext(plan=plan))
    assert result.changed
    assert result.stats["groups_pruned"] == len(producers)
    assert result.model.count_params() < model.count_params()
    x = _inputs(model, batch=2)
    _assert_compact_equals_masked(result.model, masked_copy(graph, plan), x)
    assert_model_unchanged(model, snapshot)


@pytest.mark.parametrize("k", [keras, keras3], ids=["tf_keras", "keras3"])
def test_transposed_conv_costs_what_the_profiler_counts_before_and_after_compaction(k):
    k.utils.set_random_seed(0)
    inp = k.Input((8, 8, 3))
    x = k.layers.Conv2D(6, 3, padding="same", activation="relu")(inp)
    x = k.layers.Conv2DTranspose(5, 3, strides=2, padding="same", name="up")(x)
    model = k.Model(inp, k.layers.Conv2D(2, 1)(k.layers.ReLU()(x)))
    analysis = analyze(model)
    assert analysis.cost.flops == profiler_flops(analysis.traced.graph)
    plan = _random_plan(
        analysis.graph, [p for g in analysis.graph.prunable_groups for p in g.nodes("producer")]
    )
    compact = PruneChannels().run(model, analysis.graph, PassContext(plan=plan)).model
    assert compact.get_layer("up").filters == 2
    after = analyze(compact)
    assert after.cost.flops == profiler_flops(after.traced.graph)
    assert after.cost.flops == analysis.cost_under(plan.keep_counts).flops


@pytest.mark.parametrize("k", [keras, keras3], ids=["tf_keras", "keras3"])
def test_a_3d_cnn_is_pruned_through_its_3d_pooling_padding_and_upsampling(k):
    k.utils.set_random_seed(0)
    L3 = k.layers
    inp = k.Input((4, 8, 8, 1))
    x = L3.Conv3D(6, 3, padding="same", activation="relu", name="c1")(inp)
    x = L3.MaxPooling3D(name="pool")(L3.BatchNormalization(name="bn")(x))
    x = L3.ZeroPadding3D(1)(L3.Conv3D(8, 3, padding="same", activation="relu", name="c2")(x))
    x = L3.UpSampling3D()(L3.SpatialDropout3D(0.1)(x))
    x = L3.AveragePooling3D(2)(L3.Cropping3D(1)(x))
    x = L3.GlobalAveragePooling3D()(L3.Conv3D(5, 1, activation="relu", name="c3")(x))
    model = randomize_batchnorm(k.Model(inp, L3.Dense(3)(x)), seed=1)
    analysis = analyze(model)
    assert analysis.cost.flops == profiler_flops(analysis.traced.graph)
    producers = ["c1", "c2", "c3"]
    assert (
        sorted(p for g in analysis.graph.prunable_groups for p in g.nodes("producer")) == producers
    )
    plan = _random_plan(analysis.graph, producers)
    compact = PruneChannels().run(model, analysis.graph, PassContext(plan=plan)).model
    _assert_compact_equals_masked(compact, masked_copy(analysis.graph, plan), _inputs(model))
    # Keras 3's UpSampling3D has a few shape-arithmetic FLOPs that do not scale with channels
    expected = analysis.cost_under(plan.keep_counts).flops
    assert analyze(compact).cost.flops == pytest.approx(expected, rel=1e-4)


def test_conv3d_transpose_flops_are_counted_by_hand_where_the_profiler_has_none():
    inp = keras.Input((4, 8, 8, 2))
    up = keras.layers.Conv3DTranspose(4, 3, strides=2, padding="same", name="up")
    model = keras.Model(inp, up(inp))
    row = {r.name: r for r in inspect(model).rows}["up"]
    # each of the 4*8*8 input positions: 3*3*3 taps x 2 inputs x 4 outputs multiply-adds;
    # then one bias add per output element (8*16*16*4)
    assert row.flops == 2 * (4 * 8 * 8) * 27 * 2 * 4 + 8 * 16 * 16 * 4
    assert row.flops_source == "analytic"


def test_concat_pruned_on_one_side_shrinks_only_that_side_of_the_consumer():
    model, producers = _small("concat")
    graph = LayerGraph.from_model(model)
    plan = _random_plan(graph, producers)
    compact = PruneChannels().run(model, graph, PassContext(plan=plan)).model
    kept_a = len(plan.keep[graph.group_of("conv_a")])
    assert compact.get_layer("conv_a").filters == kept_a < 6
    assert compact.get_layer("conv_b").filters == 5
    assert compact.get_layer("conv_c").kernel.shape[2] == kept_a + 5


def test_flatten_dense_consumer_loses_rows_at_every_position():
    model, producers = _small("flatten_dense")
    graph = LayerGraph.from_model(model)
    plan = _random_plan(graph, producers)
    compact = PruneChannels().run(model, graph, PassContext(plan=plan)).model
    positions = 3 * 3
    kept = len(plan.keep[graph.group_of("conv")])
    assert compact.get_layer("fc").kernel.shape[0] == positions * kept


@pytest.mark.parametrize("kind", sorted(SMALL))
def test_plan_from_masks_recovers_the_plan_and_compacts_without_a_plan(kind):
    model, producers = _small(kind)
    graph = LayerGraph.from_model(model)
    plan = _random_plan(graph, producers, seed=3)
    masked = masked_copy(graph, plan)
    masked_graph = LayerGraph.from_model(masked)
    _assert_same_plan(plan_from_masks(masked_graph), plan)
    result = PruneChannels().run(masked, masked_graph, PassContext())
    assert result.changed
    _assert_compact_equals_masked(result.model, masked, _inputs(model, batch=2, seed=1))


def test_no_plan_and_nothing_masked_is_unchanged():
    model, _ = _small("residual_add")
    result = get_pass("prune_channels").run(model, LayerGraph.from_model(model), PassContext())
    assert not result.changed
    assert result.model is model


def _squeeze_excite(k):
    """Rescaling, a conv, a squeeze-excite block (pool, Reshape, reduce, expand,
    Multiply), a conv and a head: every group between input and head is prunable."""
    layers = k.layers
    k.utils.set_random_seed(0)
    inp = k.Input((16, 16, 3))
    x = layers.Rescaling(1 / 255.0)(inp)
    x = layers.Conv2D(16, 3, padding="same", activation="swish", name="stem")(x)
    se = layers.Reshape((1, 1, 16), name="se_reshape")(layers.GlobalAveragePooling2D()(x))
    se = layers.Conv2D(4, 1, activation="swish", name="se_reduce")(se)
    se = layers.Conv2D(16, 1, activation="sigmoid", name="se_expand")(se)
    x = layers.Multiply(name="se_excite")([x, se])
    x = layers.Conv2D(8, 3, activation="relu", name="conv")(x)
    return k.Model(inp, layers.Dense(5, name="head")(layers.GlobalAveragePooling2D()(x)))


@pytest.mark.parametrize("kind", ["tf_keras", "keras3"])
def test_squeeze_excite_blocks_are_pruned_and_compacted_exactly(kind):
    import keras as keras3

    k = keras if kind == "tf_keras" else keras3
    model = _squeeze_excite(k)
    analysis = analyze(model)
    prunable = sorted(g.size for g in analysis.graph.prunable_groups)
    assert prunable == [4, 8, 16], [(g.size, g.reasons) for g in analysis.graph.groups.values()]
    plan = allocate(analysis, group_scores(analysis.graph, None, "magnitude"), 0.5)
    result = PruneChannels().run(model, analysis.graph, PassContext(plan=plan))
    stem = next(g for g in analysis.graph.prunable_groups if g.size == 16)
    kept = len(plan.keep[stem.id])
    assert kept < 16
    reshape = result.model.get_layer("se_reshape")
    assert tuple(reshape.get_config()["target_shape"]) == (1, 1, kept)
    x = np.random.default_rng(0).random((4, 16, 16, 3), dtype=np.float32) * 255
    expected = np.asarray(masked_copy(analysis.graph, plan)(x))
    np.testing.assert_allclose(np.asarray(result.model(x)), expected, rtol=1e-4, atol=1e-5)
    assert analyze(result.model).cost.flops / analysis.cost.flops == pytest.approx(plan.achieved)


def test_a_reshape_that_moves_channels_stays_opaque():
    inp = keras.Input((4, 4, 8))
    x = keras.layers.Conv2D(6, 1, name="c")(inp)
    x = keras.layers.Reshape((4, 24), name="mix")(x)  # the last axis now mixes channels
    model = keras.Model(inp, keras.layers.Dense(3)(keras.layers.Flatten()(x)))
    group = next(g for g in analyze(model).graph.groups.values() if "c" in g.nodes("producer"))
    assert not group.prunable and any("Reshape" in r for r in group.reasons), group.reasons


def test_a_model_masked_already_is_its_own_reference_and_others_get_a_masked_copy():
    """A model trained masked (BalanceCallback's) is verified against itself - no copy;
    an unmasked one against a masked copy, the model untouched either way."""
    model, producers = _small("residual_add")
    graph = LayerGraph.from_model(model)
    plan = _random_plan(graph, producers, seed=5)
    snapshot = snapshot_model(model)
    reference = PruneChannels().reference(model, graph, PassContext(plan=plan))
    assert reference is not model
    assert_model_unchanged(model, snapshot)
    masked = masked_copy(graph, plan)
    masked_graph = LayerGraph.from_model(masked)
    assert PruneChannels().reference(masked, masked_graph, PassContext(plan=plan)) is masked
    compact, report = MetaOptimizer(["prune_channels"]).run(masked, PassContext(plan=plan))
    assert report.records[0].status == "applied", report.records[0].message
    _assert_compact_equals_masked(compact, masked, _inputs(model, batch=2, seed=2))

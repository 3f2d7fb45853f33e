"""Grouped convolutions (RegNet, ResNeXt, ConvNeXt's depthwise ``Conv2D(groups=C)``).

A conv with ``groups=g`` reads and writes its channels in ``g`` equal runs; a plan
keeps as many channels of every run, so the compacted layer is again a grouped
conv with ``g`` groups. One with a channel per group is a depthwise conv and
passes channels through.
"""

from __future__ import annotations

import keras as keras3
import numpy as np
import pytest
from conftest import randomize_batchnorm

import tf_balancer as tfb
from tf_balancer._compat import keras
from tf_balancer.analysis import analyze
from tf_balancer.attention.balance import Bounds, _best, allocate
from tf_balancer.attention.importance import group_scores
from tf_balancer.attention.masks import masked_copy
from tf_balancer.graph.layer_graph import ChannelGroup
from tf_balancer.optimizer import MetaOptimizer
from tf_balancer.passes.base import PassContext
from tf_balancer.passes.prune_channels import PruneChannels

KERASES = {"tf_keras": keras, "keras3": keras3}


@pytest.fixture(params=sorted(KERASES))
def kx(request):
    return KERASES[request.param]


def _x(batch=4, seed=0):
    return np.random.default_rng(seed).normal(size=(batch, 12, 12, 3)).astype("float32")


def _grouped_net(kx):
    """1x1 conv -> depthwise as Conv2D(groups=C) -> Conv2D(groups=4) -> BN ->
    Conv2D(groups=8) -> 1x1 conv: the middle group is read by 4 and 8 groups."""
    kx.utils.set_random_seed(0)
    inp = kx.Input((12, 12, 3))
    x = kx.layers.Conv2D(32, 1, name="expand")(inp)
    x = kx.layers.BatchNormalization(name="bn_a")(x)
    x = kx.layers.ReLU()(x)
    x = kx.layers.Conv2D(32, 3, padding="same", groups=32, name="dw")(x)
    x = kx.layers.ReLU()(x)
    x = kx.layers.Conv2D(48, 3, padding="same", groups=4, name="g4")(x)
    x = kx.layers.BatchNormalization(name="bn_b")(x)
    x = kx.layers.ReLU()(x)
    x = kx.layers.Conv2D(48, 3, padding="same", groups=8, name="g8")(x)
    x = kx.layers.Conv2D(16, 1, name="project")(x)
    x = kx.layers.GlobalAveragePooling2D()(x)
    return randomize_batchnorm(kx.Model(inp, kx.layers.Dense(10, name="head")(x)))


def test_grouped_conv_flops_count_each_output_channel_reading_its_group_only(kx):
    model = _grouped_net(kx)
    analysis = analyze(model)
    layers = analysis.cost.layers
    positions = 12 * 12
    assert layers["g4"].flops == 2 * positions * 9 * (32 // 4) * 48 + positions * 48
    assert layers["g8"].flops == 2 * positions * 9 * (48 // 8) * 48 + positions * 48
    assert layers["dw"].flops == 2 * positions * 9 * 32 + positions * 32
    # the BatchNorm after a grouped conv is counted (Keras 3 runs a grouped conv as a
    # function call, whose output shape freezing used to lose: then it counted 0)
    assert layers["bn_b"].flops >= 2 * positions * 48
    assert analysis.cost.params == model.count_params()


def test_a_depthwise_conv_written_as_a_grouped_conv_passes_channels_through(kx):
    model = _grouped_net(kx)
    graph = analyze(model).graph
    assert graph.group_of("expand") == graph.nodes["dw"].out_layout.segments[0].group
    blocks = {p: g.blocks for g in graph.prunable_groups for p in g.nodes("producer")}
    assert blocks == {"expand": 4, "g4": 8, "g8": 8, "project": 1}  # lcm(4, 8) for g4's


def _plan(model, target=0.5):
    analysis = analyze(model)
    scores = group_scores(analysis.graph, None, "magnitude")
    return analysis, allocate(analysis, scores, target)


def test_a_plan_keeps_as_many_channels_of_every_conv_group(kx):
    analysis, plan = _plan(_grouped_net(kx))
    for gid, kept in plan.keep.items():
        group = analysis.graph.groups[gid]
        run = group.size // group.blocks
        per_run = np.bincount(np.asarray(kept) // run, minlength=group.blocks)
        assert len(set(per_run.tolist())) == 1, (gid, per_run)
    assert plan.achieved <= 0.5
    assert any(len(k) < analysis.graph.groups[g].size for g, k in plan.keep.items())


def test_grouped_convs_compact_exactly_and_stay_grouped(kx):
    model = _grouped_net(kx)
    analysis, plan = _plan(model)
    result = PruneChannels().run(model, analysis.graph, PassContext(plan=plan))
    x = _x()
    expected = np.asarray(masked_copy(analysis.graph, plan)(x, training=False))
    assert np.abs(expected).max() > 1e-3
    got = np.asarray(result.model(x, training=False))
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    compact = analyze(result.model)
    assert compact.cost.flops == analysis.cost_under(plan.keep_counts).flops
    assert compact.cost.params == analysis.cost_under(plan.keep_counts).params
    layers = {layer.name: layer.get_config() for layer in result.model.layers}
    kept = plan.keep_counts
    assert (
        layers["dw"]["filters"] == layers["dw"]["groups"] == kept[analysis.graph.group_of("expand")]
    )
    assert (layers["g4"]["groups"], layers["g8"]["groups"]) == (4, 8)
    assert layers["g4"]["filters"] == kept[analysis.graph.group_of("g4")] < 48


def test_batchnorm_folds_into_a_compacted_grouped_conv(kx):
    model = _grouped_net(kx)
    analysis, plan = _plan(model)
    optimized, report = MetaOptimizer(["prune_channels", "fold_batchnorm"]).run(
        model, PassContext(plan=plan)
    )
    assert [r.status for r in report.records] == ["applied", "applied"]
    names = {layer.name for layer in optimized.layers}
    assert not {"bn_a", "bn_b"} & names


def test_best_channels_are_chosen_per_run():
    scores = np.array([1.0, 4, 3, 2, 9, 8])
    assert _best(scores, 2, blocks=2).tolist() == [1, 4]
    assert _best(scores, 4, blocks=1).tolist() == [1, 2, 4, 5]
    assert Bounds(round_to=8).for_group(ChannelGroup(0, 96, (), blocks=12)).round_to == 24


@pytest.mark.slow
def test_a_resnext_block_net_trains_to_half_its_flops_with_the_default_callback():
    keras3.utils.set_random_seed(0)
    inp = keras3.Input((12, 12, 3))
    x = keras3.layers.Conv2D(32, 3, padding="same", activation="relu")(inp)
    for _ in range(2):
        y = keras3.layers.Conv2D(32, 1, activation="relu")(x)
        y = keras3.layers.Conv2D(32, 3, padding="same", groups=8, activation="relu")(y)
        y = keras3.layers.Conv2D(32, 1)(y)
        x = keras3.layers.ReLU()(keras3.layers.Add()([x, y]))
    x = keras3.layers.GlobalAveragePooling2D()(x)
    model = keras3.Model(inp, keras3.layers.Dense(4)(x))
    model.compile("adam", keras3.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(0)
    x_train, y_train = _x(128), rng.integers(0, 4, 128)
    callback = tfb.BalanceCallback()
    history = model.fit(x_train, y_train, epochs=4, batch_size=32, verbose=0, callbacks=[callback])
    assert history.history["balancer/flops_ratio"][-1] <= 0.5
    grouped = [
        layer
        for layer in callback.optimized_model.layers
        if layer.get_config().get("groups", 1) > 1
    ]
    assert len(grouped) == 2 and all(layer.get_config()["groups"] == 8 for layer in grouped)
    np.testing.assert_allclose(
        np.asarray(callback.optimized_model(x_train[:16])),
        np.asarray(model(x_train[:16])),
        rtol=1e-4,
        atol=1e-4,
    )

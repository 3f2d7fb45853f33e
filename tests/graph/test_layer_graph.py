"""Tests for tf_balancer.graph.layer_graph: edges and channel dependency groups."""

from __future__ import annotations

import numpy as np
import pytest

from tf_balancer._compat import keras
from tf_balancer.analysis import analyze, inspect
from tf_balancer.attention.balance import KeepPlan
from tf_balancer.attention.masks import masked_copy
from tf_balancer.graph.layer_graph import LayerGraph, Member
from tf_balancer.passes.base import PassContext
from tf_balancer.passes.prune_channels import PruneChannels

L = keras.layers


def _group(graph: LayerGraph, node: str):
    return graph.groups[graph.group_of(node)]


def _members(group, node: str, role: str) -> list[Member]:
    return [m for m in group.members if m.node == node and m.role == role]


def _concat_model() -> keras.Model:
    """Two convs (3 and 5 filters) concatenated, feeding a conv, then flatten -> dense."""
    keras.utils.set_random_seed(0)
    inp = keras.Input((6, 6, 2))
    a = L.Conv2D(3, 1, name="a")(inp)
    b = L.Conv2D(5, 1, name="b")(inp)
    cat = L.Concatenate(name="cat")([a, b])
    cons = L.Conv2D(4, 3, name="cons")(cat)
    return keras.Model(inp, L.Dense(2, name="head")(L.Flatten(name="flat")(cons)))


def _residual_adds(graph: LayerGraph) -> list:
    return [n for n in graph.nodes.values() if n.class_name == "Add"]


@pytest.mark.parametrize("fixture", ["resnet50", "mobilenet_v2"])
def test_every_residual_add_joins_its_inputs_into_one_group(fixture, request):
    model = request.getfixturevalue(fixture)
    graph = LayerGraph.from_model(model)
    adds = _residual_adds(graph)
    assert len(adds) == {"resnet50": 16, "mobilenet_v2": 10}[fixture]
    for node in adds:
        groups = {s.group for layout in node.in_layouts for s in layout.segments}
        assert len(groups) == 1, node.name
        assert groups == {graph.group_of(node.name)}
        for producer in node.inputs:
            assert graph.group_of(producer) == graph.group_of(node.name)
    # Something is still prunable: the bottleneck-internal groups.
    assert len(graph.prunable_groups) > 10


def test_resnet50_residual_group_spans_the_whole_stage(resnet50):
    graph = LayerGraph.from_model(resnet50)
    group = _group(graph, "conv2_block1_add")
    producers = set(group.nodes("producer"))
    assert {"conv2_block1_0_conv", "conv2_block1_3_conv"} <= producers
    assert {"conv2_block2_3_conv", "conv2_block3_3_conv"} <= producers
    assert group.size == 256
    assert "conv2_block1_1_conv" not in producers


def test_concatenate_lays_groups_side_by_side_at_offsets():
    graph = LayerGraph.from_model(_concat_model())
    group_a, group_b = _group(graph, "a"), _group(graph, "b")
    assert (group_a.size, group_b.size) == (3, 5)
    assert graph.group_of("cat") is None  # two segments
    (in_a,) = _members(group_a, "cons", "consumer")
    (in_b,) = _members(group_b, "cons", "consumer")
    assert (in_a.offset, in_a.width) == (0, 8)
    assert (in_b.offset, in_b.width) == (3, 8)
    assert group_a.prunable and group_b.prunable
    assert graph.consumers("a") == ["cat"] and graph.consumers("cat") == ["cons"]


def test_flatten_then_dense_consumer_repeats_channels_per_position():
    graph = LayerGraph.from_model(_concat_model())
    group = _group(graph, "cons")
    (member,) = _members(group, "head", "consumer")
    assert member.spatial == 4 * 4  # cons output is 4x4x4
    assert member.width == 4
    assert graph.nodes["flat"].out_layout.spatial == 16
    assert group.prunable


def test_member_indices_select_the_flattened_features_of_a_channel():
    keras.utils.set_random_seed(1)
    inp = keras.Input((3, 2, 1))
    a = L.Conv2D(3, 1, name="a")(inp)
    b = L.Conv2D(5, 1, name="b")(inp)
    flat = L.Flatten(name="flat")(L.Concatenate(name="cat")([a, b]))
    out = L.Dense(2, name="head")(flat)
    model = keras.Model(inp, out)
    graph = LayerGraph.from_model(model)
    (member,) = _members(_group(graph, "b"), "head", "consumer")
    assert (member.offset, member.width, member.spatial) == (3, 8, 6)
    np.testing.assert_array_equal(
        member.indices([0, 2]), [3, 5, 11, 13, 19, 21, 27, 29, 35, 37, 43, 45]
    )
    # On real tensors: those features of `flat` are channels 0 and 2 of `b`.
    probe = keras.Model(inp, [model.get_layer("b").output, flat])
    x = np.random.default_rng(0).normal(size=(2, 3, 2, 1)).astype("float32")
    b_out, flat_out = (t.numpy() for t in probe(x))
    picked = flat_out[:, member.indices([0, 2])].reshape(2, 6, 2)
    np.testing.assert_array_equal(picked, b_out[..., [0, 2]].reshape(2, 6, 2))


def test_member_indices_without_flatten_are_offset_channels():
    member = Member("cons", "consumer", offset=3, width=8)
    np.testing.assert_array_equal(member.indices([0, 4]), [3, 7])


def test_depthwise_conv_passes_channels_through():
    keras.utils.set_random_seed(2)
    inp = keras.Input((8, 8, 3))
    x = L.Conv2D(6, 1, name="expand")(inp)
    x = L.DepthwiseConv2D(3, padding="same", name="dw")(x)
    x = L.BatchNormalization(name="bn")(x)
    x = L.Conv2D(4, 1, name="project")(x)
    graph = LayerGraph.from_model(keras.Model(inp, L.Dense(2, name="head")(L.Flatten()(x))))
    assert graph.group_of("dw") == graph.group_of("expand") == graph.group_of("bn")
    group = _group(graph, "expand")
    assert group.nodes("passthrough") == ["dw", "bn"]
    assert group.nodes("consumer") == ["project"]
    assert group.prunable
    assert graph.nodes["dw"].role == "passthrough"


class _OwnScale(L.Layer):
    """A custom layer with a weight of its own (not made of Keras layers): opaque."""

    def build(self, shape):
        self.gamma = self.add_weight(name="gamma", shape=(shape[-1],), initializer="ones")

    def call(self, x):
        return x * self.gamma


@pytest.mark.parametrize(
    "make_unknown, name, why",
    [
        (lambda: _OwnScale(name="mystery"), "mystery", "does not understand"),
        (
            lambda: L.Reshape((4, 12, 1), name="reshaper"),  # moves channels
            "reshaper",
            "cannot prune through: Reshape that changes the last (channel) axis",
        ),
        (lambda: L.LayerNormalization(name="ln"), "ln", "normalises across channels"),
    ],
)
def test_unknown_layer_blocks_the_groups_it_touches(make_unknown, name, why):
    keras.utils.set_random_seed(3)
    inp = keras.Input((4, 4, 2))
    a = L.Conv2D(3, 1, name="a")(inp)
    x = make_unknown()(a)
    x = L.Conv2D(4, 1, name="after")(x)
    model = keras.Model(inp, L.Dense(2, name="head")(L.GlobalAveragePooling2D(name="gap")(x)))
    graph = LayerGraph.from_model(model)
    assert graph.nodes[name].role == "opaque"
    blocked_in = _group(graph, "a")
    assert not blocked_in.prunable
    assert any(name in reason and why in reason for reason in blocked_in.reasons)
    blocked_out = _group(graph, name)
    assert not blocked_out.prunable
    assert any(name in reason for reason in blocked_out.reasons)
    # The layer after it still has a prunable output group; analysis does not crash.
    assert _group(graph, "after").prunable
    result = inspect(model)
    row = {r.name: r for r in result.rows}
    assert not row["a"].prunable and name in row["a"].why_not
    assert row["after"].prunable
    assert result.total_flops > 0


def test_layer_reaching_the_model_output_is_not_prunable():
    keras.utils.set_random_seed(4)
    inp = keras.Input((6, 6, 2))
    x = L.Conv2D(3, 3, name="mid")(inp)
    x = L.Conv2D(4, 1, name="last")(x)
    out = L.ReLU(name="relu")(L.BatchNormalization(name="bn")(x))
    graph = LayerGraph.from_model(keras.Model(inp, out))
    group = _group(graph, "last")
    assert not group.prunable
    assert "reaches a model output" in group.reasons
    assert _group(graph, "mid").prunable
    assert [g.id for g in graph.prunable_groups] == [graph.group_of("mid")]


def test_model_input_group_is_not_prunable():
    graph = LayerGraph.from_model(_concat_model())
    (group,) = [g for g in graph.groups.values() if "model input" in g.reasons]
    assert {m.node for m in group.members} == {"a", "b"}
    assert group not in graph.prunable_groups


def test_a_layer_applied_twice_in_a_row_joins_its_input_and_output_channels():
    """``shared(shared(x))``: the kernel's input channels are the first call's input
    and the second call's: one group runs through ``pre`` and both calls."""
    keras.utils.set_random_seed(5)
    inp = keras.Input((6, 6, 4))
    pre = L.Conv2D(4, 1, name="pre")(inp)
    shared = L.Conv2D(4, 3, padding="same", name="shared")
    x = shared(shared(pre))
    model = keras.Model(inp, L.Dense(2, name="head")(L.GlobalAveragePooling2D(name="gap")(x)))
    graph = LayerGraph.from_model(model)
    assert {"shared", "shared#1"} <= set(graph.nodes)
    group = _group(graph, "pre")
    assert group is _group(graph, "shared") is _group(graph, "shared#1")
    assert group.prunable and set(group.nodes("producer")) == {"pre", "shared", "shared#1"}
    analysis = analyze(model)
    assert analysis.cost.params == model.count_params()
    plan = KeepPlan({group.id: np.array([0, 2])}, {group.id: 4})
    small = PruneChannels().run(model, graph, PassContext(plan=plan)).model
    assert small.get_layer("shared").kernel.shape == (3, 3, 2, 2)
    x = np.random.default_rng(0).normal(size=(2, 6, 6, 4)).astype("float32")
    expected = np.asarray(masked_copy(graph, plan)(x, training=False))
    np.testing.assert_allclose(np.asarray(small(x, training=False)), expected, 1e-5, 1e-5)


def test_softmax_inside_the_model_couples_its_channels():
    keras.utils.set_random_seed(6)
    inp = keras.Input((5,))
    x = L.Dense(4, activation="softmax", name="attn")(inp)
    graph = LayerGraph.from_model(keras.Model(inp, L.Dense(2, name="out")(x)))
    assert "softmax output" in _group(graph, "attn").reasons


def test_add_of_differently_laid_out_tensors_is_blocked():
    keras.utils.set_random_seed(7)
    inp = keras.Input((4, 4, 2))
    cat = L.Concatenate(name="cat")([L.Conv2D(3, 1, name="a")(inp), L.Conv2D(5, 1, name="b")(inp)])
    c = L.Conv2D(8, 1, name="c")(inp)
    x = L.Add(name="add")([cat, c])
    model = keras.Model(inp, L.Dense(2, name="head")(L.GlobalAveragePooling2D()(x)))
    graph = LayerGraph.from_model(model)
    for name in ("a", "b", "c"):
        assert any("merged by 'add'" in r for r in _group(graph, name).reasons), name


def test_sequential_model_groups():
    keras.utils.set_random_seed(8)
    model = keras.Sequential(
        [
            keras.Input((6, 6, 2)),
            L.Conv2D(3, 3, name="c"),
            L.BatchNormalization(name="bn"),
            L.ReLU(name="r"),
            L.Flatten(name="f"),
            L.Dense(2, name="o"),
        ]
    )
    graph = LayerGraph.from_model(model)
    assert list(graph.nodes) == ["c", "bn", "r", "f", "o"]
    group = _group(graph, "c")
    assert group.prunable
    assert [(m.node, m.role) for m in group.members] == [
        ("c", "producer"),
        ("bn", "passthrough"),
        ("r", "passthrough"),
        ("o", "consumer"),
    ]
    assert graph.edges() == [("c", "bn"), ("bn", "r"), ("r", "f"), ("f", "o")]


def test_groups_cross_nested_model_boundaries():
    keras.utils.set_random_seed(9)
    inner_in = keras.Input((6, 6, 4))
    y = L.BatchNormalization(name="bn")(L.Conv2D(5, 3, padding="same", name="conv")(inner_in))
    inner = keras.Model(inner_in, y, name="inner")
    seq = keras.Sequential([L.Conv2D(6, 1, name="sc"), L.ReLU(name="r")], name="seq")
    inp = keras.Input((6, 6, 3))
    x = seq(inner(L.Conv2D(4, 3, padding="same", name="conv")(inp)))
    model = keras.Model(inp, L.Dense(2, name="head")(L.GlobalAveragePooling2D(name="gap")(x)))
    graph = LayerGraph.from_model(model)
    assert list(graph.nodes) == ["conv", "inner/conv", "inner/bn", "seq/sc", "seq/r", "gap", "head"]
    outer = _group(graph, "conv")
    assert outer.nodes("consumer") == ["inner/conv"]
    inner_group = _group(graph, "inner/conv")
    assert inner_group.nodes("passthrough") == ["inner/bn"]
    assert inner_group.nodes("consumer") == ["seq/sc"]
    assert _group(graph, "seq/sc").nodes("consumer") == ["head"]
    assert all(g.prunable for g in (outer, inner_group, _group(graph, "seq/sc")))
    assert graph.nodes["inner/conv"].inputs == ("conv",)


def test_layer_graph_does_not_modify_the_model():
    model = _concat_model()
    weights = [w.copy() for w in model.get_weights()]
    inbound = [len(layer._inbound_nodes) for layer in model.layers]
    LayerGraph.from_model(model)
    assert [len(layer._inbound_nodes) for layer in model.layers] == inbound
    for before, after in zip(weights, model.get_weights(), strict=True):
        np.testing.assert_array_equal(before, after)

"""Attention heads, recurrent units, embeddings and time-distributed layers in the layer graph.

Groups, their weights' axes and their FLOPs: heads are a prunable group of their
own; a recurrent layer's units are one group across all gates, the recurrent
kernel and both directions of a ``Bidirectional``; recurrent FLOPs (which the
profiler cannot see in the ``while`` loop) are analytic, and equal the
profiler's count where it can see them (``unroll=True``).
"""

from __future__ import annotations

import keras as keras3
import numpy as np
import pytest
import tf_keras

from tf_balancer.analysis import analyze, inspect
from tf_balancer.demo_sequences import (
    build_digits_bigru,
    build_digits_lstm,
    build_digits_transformer,
)
from tf_balancer.graph.cost import core_flops, flops_source, measured_layer_flops
from tf_balancer.graph.layer_graph import LayerGraph
from tf_balancer.graph.layer_specs import axis_index, resized_config, spec_for
from tf_balancer.graph.trace import trace_keras

KERASES = pytest.mark.parametrize("k", [tf_keras, keras3], ids=["tf_keras", "keras3"])


def _group(graph, node):
    return graph.groups[graph.group_of(node)]


@KERASES
def test_transformer_heads_and_ffn_widths_are_prunable_and_the_model_width_is_not(k):
    graph = analyze(build_digits_transformer(k)).graph
    for block in (0, 1):
        heads = _group(graph, f"mha{block}")
        assert heads.prunable and heads.size == 4 and heads.unit == 8
        assert heads.nodes("producer") == [f"mha{block}"]
        assert graph.nodes[f"mha{block}"].role == "attention"
        ffn = _group(graph, f"ffn{block}a")
        assert ffn.prunable and ffn.size == 64
        assert ffn.nodes("consumer") == [f"ffn{block}b"]
        width = _group(graph, f"ffn{block}b")  # the residual stream
        assert not width.prunable
        assert any("normalises across channels" in r for r in width.reasons)
    prunable = {g.id for g in graph.prunable_groups}
    assert prunable == {graph.group_of(n) for n in ("mha0", "mha1", "ffn0a", "ffn1a")}


@KERASES
def test_recurrent_units_are_one_group_across_gates_and_layers(k):
    graph = analyze(build_digits_lstm(k)).graph
    first, second = _group(graph, "lstm1"), _group(graph, "lstm2")
    assert first.prunable and second.prunable and first.size == second.size == 32
    assert first.nodes("consumer") == ["lstm2"] and second.nodes("consumer") == ["fc"]
    spec = spec_for(graph.nodes["lstm1"].layer, 3)
    blocks = {(a.attr, a.axis): a.blocks for a in spec.out_axes}
    assert blocks == {
        ("cell.kernel", -1): 4,
        ("cell.recurrent_kernel", -1): 4,
        ("cell.recurrent_kernel", 0): 1,
        ("cell.bias", -1): 4,
    }


@KERASES
def test_bidirectional_units_appear_once_per_direction_in_its_output(k):
    graph = analyze(build_digits_bigru(k)).graph
    group = _group(graph, "bigru")
    assert group.prunable and group.size == 24
    layout = graph.nodes["bigru"].out_layout
    assert [s.group for s in layout.segments] == [group.id, group.id]
    # the Dense after pooling reads both directions' copies of each unit
    offsets = sorted(m.offset for m in group.members if m.node == "fc")
    assert offsets == [0, 24]
    overrides = resized_config(graph.nodes["bigru"].layer, 10)
    assert overrides["layer"]["config"]["units"] == 10


@KERASES
def test_embedding_and_time_distributed_dense_are_producers(k):
    layers = k.layers
    tokens = k.Input((6,), dtype="int32")
    x = layers.Embedding(50, 16, name="embed")(tokens)
    x = layers.TimeDistributed(layers.Dense(12, activation="relu"), name="td")(x)
    x = layers.Conv1D(8, 3, name="conv")(x)
    x = layers.GlobalMaxPooling1D(name="pool")(x)
    graph = LayerGraph.from_model(k.Model(tokens, layers.Dense(3, name="out")(x)))
    for name, size in (("embed", 16), ("td", 12), ("conv", 8)):
        group = _group(graph, name)
        assert group.prunable and group.size == size, (name, group.reasons)
    assert resized_config(graph.nodes["td"].layer, 5)["layer"]["config"]["units"] == 5


def test_axis_index_finds_a_unit_in_every_gate_block():
    assert axis_index([0, 2], 12, blocks=4).tolist() == [0, 2, 3, 5, 6, 8, 9, 11]
    assert axis_index([1], 5).tolist() == [1]


def _lstm_hand_count(batch, steps, features, units):
    """Per step: x.W and h.U (2 per multiply-add, 4 gates), 4 bias adds per unit,
    4 adds of the two products, c = f*c + i*g (3), h = o*tanh(c) (1)."""
    matmuls = 2 * (features * 4 * units + units * 4 * units)
    return batch * steps * (matmuls + 4 * units + 4 * units + 3 * units + units)


@KERASES
def test_lstm_flops_are_analytic_and_match_a_hand_count(k):
    inp = k.Input((40, 8))
    model = k.Model(inp, k.layers.Dense(2)(k.layers.LSTM(32, name="lstm")(inp)))
    result = inspect(model, batch_size=2)
    row = next(r for r in result.rows if r.name == "lstm")
    assert row.flops == _lstm_hand_count(2, 40, 8, 32)  # 1,699,840
    assert row.flops_source == "analytic"
    assert "* analytic FLOPs" in result.table()
    dense = next(r for r in result.rows if r.type == "Dense")
    assert dense.flops_source == "profiler"


@KERASES
@pytest.mark.parametrize(
    "cls,kwargs",
    [("LSTM", {}), ("GRU", {}), ("GRU", {"reset_after": False}), ("SimpleRNN", {})],
)
def test_recurrent_flops_equal_the_profiler_where_it_sees_the_steps(k, cls, kwargs):
    """Unrolled, every step is in the graph and TF's profiler counts it: the
    analytic count (used when it cannot) must agree exactly."""
    inp = k.Input((5, 6))
    layer = getattr(k.layers, cls)(7, unroll=True, name="rnn", **kwargs)
    model = k.Model(inp, k.layers.Dense(2)(layer(inp)))
    graph = LayerGraph.from_model(model)
    profiler = measured_layer_flops(trace_keras(model, 3))["rnn"]
    assert core_flops(graph.nodes["rnn"], 3, 6, 7) == profiler
    assert flops_source(graph.nodes["rnn"]) == "profiler"


@KERASES
def test_attention_flops_scale_with_heads_and_keep_the_output_bias(k):
    """Per head: the q/k/v projections, the query scaling, QK^T, softmax, attention x V
    and the output projection; once: the output bias. Keep half the heads: the
    coster's prediction is the compacted layer's count."""
    graph_model = build_digits_transformer(k)
    analysis = analyze(graph_model)
    full = analysis.cost.layers["mha0"].flops
    t, d, h, kd = 8, 32, 4, 8
    per_head = 3 * (2 * t * d * kd + t * kd) + t * kd + 2 * t * t * kd * 2 + 2 * t * kd * d
    softmax = full - h * per_head - t * d
    assert 0 <= softmax <= 5 * h * t * t  # the profiler's softmax: at most 5 per element
    gid = analysis.graph.group_of("mha0")
    half = analysis.coster.report({gid: 2}).layers["mha0"].flops
    assert half == t * d + (full - t * d) // 2
    assert np.isclose(analysis.coster.total({gid: 2}), analysis.cost.flops - (full - t * d) / 2)

"""``prune_channels`` on sequence models: attention heads, FFN widths, recurrent units.

For each model and each Keras: a balanced plan at 0.5 FLOPs, compacted; the
compacted model computes what the masked model computes, costs what the plan
says it costs (FLOPs and parameters, measured again on the new model), and the
user's model is untouched. The masks found on the masked model are the plan.
"""

from __future__ import annotations

import keras as keras3
import numpy as np
import pytest
import tf_keras
from conftest import assert_model_unchanged, snapshot_model

from tf_balancer.analysis import analyze
from tf_balancer.attention.balance import KeepPlan, allocate
from tf_balancer.attention.importance import group_scores
from tf_balancer.attention.masks import masked_copy
from tf_balancer.demo_sequences import (
    build_digits_bigru,
    build_digits_lstm,
    build_digits_transformer,
)
from tf_balancer.graph.layer_graph import LayerGraph
from tf_balancer.passes.base import PassContext
from tf_balancer.passes.prune_channels import PruneChannels, plan_from_masks


def _tokens_model(k):
    layers = k.layers
    k.utils.set_random_seed(1)
    tokens = k.Input((6,), dtype="int32")
    x = layers.Embedding(50, 16, name="embed")(tokens)
    x = layers.TimeDistributed(layers.Dense(12, activation="relu"), name="td")(x)
    x = layers.Bidirectional(layers.LSTM(10, return_sequences=True), name="bilstm")(x)
    x = layers.Conv1D(8, 3, activation="relu", name="conv")(x)
    x = layers.SimpleRNN(9, name="rnn")(x)
    return k.Model(tokens, layers.Dense(3, name="out")(x))


BUILDERS = {
    "transformer": build_digits_transformer,
    "lstm": build_digits_lstm,
    "bigru": build_digits_bigru,
    "tokens": _tokens_model,
}
KERASES = {"tf_keras": tf_keras, "keras3": keras3}


def _inputs(model, seed=0):
    shape = (4, *model.inputs[0].shape[1:])
    rng = np.random.default_rng(seed)
    if "int" in str(model.inputs[0].dtype):
        return rng.integers(0, 50, size=shape).astype("int32")
    return rng.uniform(size=shape).astype("float32")


@pytest.fixture(scope="module", params=[(b, k) for b in BUILDERS for k in KERASES], ids=str)
def compaction(request):
    builder, keras_name = request.param
    model = BUILDERS[builder](KERASES[keras_name])
    snapshot = snapshot_model(model)
    analysis = analyze(model)
    plan = allocate(analysis, group_scores(analysis.graph, None, "magnitude"), 0.5)
    result = PruneChannels().run(model, analysis.graph, PassContext(plan=plan))
    masked = masked_copy(analysis.graph, plan)
    return model, snapshot, analysis, plan, result.model, masked


def test_compacted_equals_masked_and_the_user_model_is_untouched(compaction):
    model, snapshot, _, plan, compact, masked = compaction
    x = _inputs(model)
    expected = np.asarray(masked(x, training=False))
    assert np.abs(expected).max() > 1e-3
    np.testing.assert_allclose(np.asarray(compact(x, training=False)), expected, atol=1e-4)
    assert sum(len(plan.pruned(g)) for g in plan.keep) > 0
    assert_model_unchanged(model, snapshot)


def test_compacted_costs_what_the_plan_says(compaction):
    _, _, analysis, plan, compact, _ = compaction
    after = analyze(compact)
    ratio = after.cost.flops / analysis.cost.flops
    assert ratio <= 0.5 + 1e-9
    assert ratio == pytest.approx(plan.achieved, rel=0.02)
    assert compact.count_params() == round(analysis.coster.total(plan.keep_counts, "params"))


def test_masks_on_the_masked_model_are_the_plan(compaction):
    *_, plan, _, masked = compaction
    found = plan_from_masks(LayerGraph.from_model(masked))
    pruned = {g for g in plan.keep if len(plan.pruned(g))}
    assert {g for g in found.keep if len(found.pruned(g))} == pruned
    for gid in pruned:
        np.testing.assert_array_equal(found.keep[gid], plan.keep[gid])


@pytest.mark.parametrize("keras_name", list(KERASES))
def test_heads_are_removed_with_their_kernels_and_key_dim_is_kept(keras_name):
    model = build_digits_transformer(KERASES[keras_name])
    analysis = analyze(model)
    gid = analysis.graph.group_of("mha0")
    keep = {g.id: np.arange(g.size) for g in analysis.graph.prunable_groups}
    keep[gid] = np.array([1, 3])
    plan = KeepPlan(keep, {g.id: g.size for g in analysis.graph.prunable_groups})
    compact = PruneChannels().run(model, analysis.graph, PassContext(plan=plan)).model
    layer = compact.get_layer("mha0")
    config = layer.get_config()
    assert config["num_heads"] == 2 and config["key_dim"] == 8
    original = model.get_layer("mha0")
    np.testing.assert_array_equal(
        np.asarray(layer._query_dense.kernel), np.asarray(original._query_dense.kernel)[:, [1, 3]]
    )
    np.testing.assert_array_equal(
        np.asarray(layer._output_dense.kernel), np.asarray(original._output_dense.kernel)[[1, 3]]
    )
    assert compact.get_layer("mha1").get_config()["num_heads"] == 4

"""EfficientNetB0 (64x64, weights=None): squeeze-excite blocks no longer block pruning.

The squeeze-excite path (GlobalAveragePooling -> Reshape(1, 1, C) -> Conv ->
Conv -> Multiply) passes its channel group through, and the input
Rescaling/Normalization do not block: every expanded/depthwise group is
prunable, the default bounds reach far below half the FLOPs, and a 0.5-FLOPs
plan compacts exactly.
"""

from __future__ import annotations

import keras as keras3
import numpy as np
import pytest
import tf_keras
from conftest import randomize_batchnorm

from tf_balancer.analysis import analyze
from tf_balancer.attention.balance import Bounds, allocate
from tf_balancer.attention.importance import group_scores
from tf_balancer.attention.masks import masked_copy
from tf_balancer.passes.base import PassContext
from tf_balancer.passes.prune_channels import PruneChannels


@pytest.fixture(scope="module", params=[tf_keras, keras3], ids=["tf_keras", "keras3"])
def efficientnet(request):
    k = request.param
    k.utils.set_random_seed(0)
    model = k.applications.EfficientNetB0(
        weights=None, input_shape=(64, 64, 3), classifier_activation=None
    )
    return randomize_batchnorm(model), analyze(model)


def test_every_squeeze_excite_block_is_in_a_prunable_group(efficientnet):
    _, analysis = efficientnet
    graph = analysis.graph
    se_blocks = [name for name in graph.nodes if name.endswith("se_reshape")]
    assert len(se_blocks) == 16
    for name in se_blocks:
        assert graph.groups[graph.group_of(name)].prunable, name
        depthwise = name.replace("se_reshape", "dwconv")
        assert graph.group_of(depthwise) == graph.group_of(name)
    blocked = [g for g in graph.groups.values() if g.nodes("producer") and not g.prunable]
    assert [g.nodes("producer") for g in blocked] == [["predictions"]]  # the logits only


def test_default_bounds_reach_below_fifteen_percent_of_the_flops(efficientnet):
    _, analysis = efficientnet
    lows = {g.id: Bounds().lower(g.size) for g in analysis.graph.prunable_groups}
    assert analysis.coster.total(lows) / analysis.cost.flops <= 0.15


@pytest.mark.slow
def test_half_flops_compaction_is_exact(efficientnet):
    model, analysis = efficientnet
    plan = allocate(analysis, group_scores(analysis.graph, None, "magnitude"), 0.5)
    compact = PruneChannels().run(model, analysis.graph, PassContext(plan=plan)).model
    masked = masked_copy(analysis.graph, plan)
    x = np.random.default_rng(0).uniform(0, 255, size=(2, 64, 64, 3)).astype("float32")
    expected = np.asarray(masked(x, training=False))
    assert np.abs(expected).max() > 1e-3
    np.testing.assert_allclose(np.asarray(compact(x, training=False)), expected, atol=1e-4)
    ratio = analyze(compact).cost.flops / analysis.cost.flops
    assert ratio <= 0.5 and ratio == pytest.approx(plan.achieved, rel=1e-6)

"""Tests of the callback's checkpointable state, target ramp and mask applier."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from tf_balancer.attention.balance import KeepPlan
from tf_balancer.attention.masks import channel_masks
from tf_balancer.demo import build_digits_cnn
from tf_balancer.graph.layer_graph import LayerGraph
from tf_balancer.training.ramp import polynomial_ramp
from tf_balancer.training.state import (
    STATE_ATTRIBUTE,
    BalanceState,
    MaskApplier,
)

SIZES = {1: 8, 2: 8, 5: 16}


@pytest.fixture()
def model():
    return build_digits_cnn(width=8, seed=0)


def _plan(graph: LayerGraph, keep_fraction: float, seed: int = 0) -> KeepPlan:
    rng = np.random.default_rng(seed)
    keep, sizes = {}, {}
    for group in graph.prunable_groups:
        n = max(1, int(round(group.size * keep_fraction)))
        keep[group.id] = np.sort(rng.choice(group.size, n, replace=False))
        sizes[group.id] = group.size
    return KeepPlan(keep, sizes)


@pytest.mark.parametrize("final,power", [(0.5, 3), (0.25, 2), (0.9, 1)])
def test_polynomial_ramp_starts_near_one_decreases_and_ends_at_final(final, power):
    values = [polynomial_ramp(e, 2, 9, final, power) for e in range(2, 10)]
    assert values[0] < 1.0
    assert values[0] >= final + (1 - final) * 0.5
    assert all(b <= a for a, b in zip(values, values[1:], strict=False))
    assert values[-1] == pytest.approx(final)


def test_polynomial_ramp_is_final_outside_and_for_one_step_schedules():
    assert polynomial_ramp(20, 0, 4, 0.5) == pytest.approx(0.5)
    assert polynomial_ramp(3, 3, 3, 0.3) == pytest.approx(0.3)
    assert polynomial_ramp(0, 0, 4, 0.5, 3) == pytest.approx(0.756)


def test_balance_state_record_keep_indices_and_attention_history():
    state = BalanceState(SIZES, max_rebalances=4)
    assert int(state.rebalances.numpy()) == 0
    assert int(state.epoch.numpy()) == -1
    assert float(state.target.numpy()) == 1.0
    for gid, idx in state.keep_indices().items():
        np.testing.assert_array_equal(idx, np.arange(SIZES[gid]))
    assert state.attention_history().shape == (0, 3)

    keep = {1: np.array([0, 3, 5]), 2: np.arange(8), 5: np.array([1, 15])}
    state.record(2, 0.75, keep, {1: 0.5, 2: 0.3, 5: 0.2})
    state.record(4, 0.5, {1: np.array([3]), 2: np.array([7]), 5: np.array([0])}, {1: 1.0})
    assert int(state.rebalances.numpy()) == 2
    assert int(state.epoch.numpy()) == 4
    assert float(state.target.numpy()) == pytest.approx(0.5)
    got = state.keep_indices()
    np.testing.assert_array_equal(got[1], [3])
    np.testing.assert_array_equal(got[2], [7])
    np.testing.assert_array_equal(got[5], [0])
    np.testing.assert_allclose(state.attention_history(), [[0.5, 0.3, 0.2], [1.0, 0.0, 0.0]])


def test_balance_state_attention_history_stops_growing_past_capacity():
    state = BalanceState({0: 4}, max_rebalances=2)
    for epoch in range(3):
        state.record(epoch, 0.9, {0: np.arange(4)}, {0: float(epoch + 1)})
    assert int(state.rebalances.numpy()) == 3
    np.testing.assert_allclose(state.attention_history(), [[1.0], [2.0]])


def test_balance_state_round_trips_through_model_checkpoint(model, tmp_path):
    state = BalanceState(SIZES, max_rebalances=8)
    state.attach(model)
    assert getattr(model, STATE_ATTRIBUTE) is state.checkpoint
    keep = {1: np.array([1, 2]), 2: np.array([0, 7]), 5: np.arange(0, 16, 3)}
    state.record(3, 0.6, keep, {1: 0.2, 2: 0.3, 5: 0.5})
    path = tf.train.Checkpoint(model=model).save(str(tmp_path / "ckpt"))

    restored_model = build_digits_cnn(width=8, seed=1)
    restored = BalanceState(SIZES, max_rebalances=8)
    restored.attach(restored_model)
    tf.train.Checkpoint(model=restored_model).restore(path).assert_existing_objects_matched()
    assert int(restored.rebalances.numpy()) == 1
    assert int(restored.epoch.numpy()) == 3
    assert float(restored.target.numpy()) == pytest.approx(0.6)
    for gid, idx in restored.keep_indices().items():
        np.testing.assert_array_equal(idx, keep[gid])
    np.testing.assert_allclose(restored.attention_history(), [[0.2, 0.3, 0.5]])


def test_balance_state_is_not_in_model_weights(model):
    n_weights = len(model.weights)
    state = BalanceState(SIZES, max_rebalances=8)
    state.attach(model)
    assert len(model.weights) == n_weights
    state_ids = {id(v) for v in state.checkpoint.keep.values()}
    state_ids |= {id(state.epoch), id(state.target), id(state.rebalances), id(state.attention)}
    assert not state_ids & {id(w) for w in model.weights}
    assert not state_ids & {id(w) for w in model.non_trainable_weights}


def test_mask_applier_zeroes_exactly_the_masked_weights(model):
    graph = LayerGraph.from_model(model)
    applier = MaskApplier(graph)
    before = {id(w): w.numpy().copy() for w in model.weights}
    plan = _plan(graph, 0.5)
    applier.set_plan(plan)
    applier.apply()
    masks = channel_masks(graph, plan)
    masked = {id(getattr(graph.nodes[node].layer, attr)): m for (node, attr), m in masks.items()}
    assert masked
    for weight in model.weights:
        expected = before[id(weight)] * masked.get(id(weight), 1.0)
        np.testing.assert_array_equal(weight.numpy(), expected, err_msg=weight.name)
    # Independent check: conv1's pruned output filters are all zeros, kept ones are not.
    conv1 = model.get_layer("conv1").kernel.numpy()
    group = graph.group_of("conv1")
    pruned = plan.pruned(group)
    assert len(pruned)
    assert np.all(conv1[..., pruned] == 0)
    assert np.all(np.abs(conv1[..., plan.keep[group]]).sum(axis=(0, 1, 2)) > 0)


def test_mask_applier_keeps_masking_after_weight_updates(model):
    graph = LayerGraph.from_model(model)
    applier = MaskApplier(graph)
    plan = _plan(graph, 0.5)
    applier.set_plan(plan)
    kernel = model.get_layer("conv1").kernel
    kernel.assign(tf.ones_like(kernel))  # what an optimizer step does to pruned channels
    applier.apply()
    pruned = plan.pruned(graph.group_of("conv1"))
    assert np.all(kernel.numpy()[..., pruned] == 0)


def test_mask_applier_plan_change_does_not_retrace_the_step(model):
    graph = LayerGraph.from_model(model)
    applier = MaskApplier(graph)
    step = tf.function(applier.apply_in_step)  # as traced into fit's train step
    first, second = _plan(graph, 0.75, seed=0), _plan(graph, 0.5, seed=1)
    applier.set_plan(first)
    step()
    assert step.experimental_get_tracing_count() == 1
    kernel = model.get_layer("conv1").kernel
    assert np.all(kernel.numpy()[..., first.pruned(graph.group_of("conv1"))] == 0)
    applier.set_plan(second)
    kernel.assign(tf.ones_like(kernel))
    step()
    step()
    assert step.experimental_get_tracing_count() == 1
    assert np.all(kernel.numpy()[..., second.pruned(graph.group_of("conv1"))] == 0)


def test_mask_applier_with_keep_everything_plan_is_inactive(model):
    graph = LayerGraph.from_model(model)
    applier = MaskApplier(graph)
    full = KeepPlan(
        {g.id: np.arange(g.size) for g in graph.prunable_groups},
        {g.id: g.size for g in graph.prunable_groups},
    )
    before = [w.numpy().copy() for w in model.weights]
    applier.set_plan(full)
    applier.apply()
    assert not applier.active
    for weight, value in zip(model.weights, before, strict=True):
        np.testing.assert_array_equal(weight.numpy(), value)

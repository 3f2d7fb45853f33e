"""One-shot helpers: BatchNorm statistics re-estimated on data, plans compared by loss."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from conftest import assert_model_unchanged, snapshot_model

import tf_balancer as tfb
from tf_balancer._compat import keras
from tf_balancer.analysis import analyze
from tf_balancer.attention.balance import Bounds, KeepPlan, allocate
from tf_balancer.attention.coupled import OBJECTIVES
from tf_balancer.attention.importance import group_scores
from tf_balancer.training.calibrate import best_plan, recalibrate_batchnorm

L = keras.layers


def _bn_model() -> keras.Model:
    keras.utils.set_random_seed(0)
    inp = keras.Input((6,))
    x = L.Dense(4, name="dense")(inp)
    return keras.Model(inp, L.BatchNormalization(momentum=0.99, name="bn")(x))


def test_recalibrated_statistics_are_the_average_over_the_batches():
    model = _bn_model()
    x = np.random.default_rng(0).normal(3.0, 2.0, (512, 6)).astype(np.float32)
    kernel = model.get_layer("dense").get_weights()
    assert recalibrate_batchnorm(model, x, batch_size=128) == 1
    bn = model.get_layer("bn")
    assert bn.momentum == pytest.approx(0.99)  # restored
    features = model.get_layer("dense")(x).numpy().reshape(4, 128, 4)  # the 4 batches
    np.testing.assert_allclose(bn.moving_mean.numpy(), features.mean(1).mean(0), rtol=1e-4)
    np.testing.assert_allclose(bn.moving_variance.numpy(), features.var(1).mean(0), rtol=1e-3)
    for got, want in zip(model.get_layer("dense").get_weights(), kernel, strict=True):
        np.testing.assert_array_equal(got, want)  # nothing but the statistics changes


def test_frozen_batchnorm_and_models_without_one_are_left_alone():
    model = _bn_model()
    model.get_layer("bn").trainable = False
    before = model.get_layer("bn").moving_mean.numpy().copy()
    assert recalibrate_batchnorm(model, np.ones((64, 6), np.float32)) == 0
    np.testing.assert_array_equal(model.get_layer("bn").moving_mean.numpy(), before)
    plain = keras.Sequential([keras.Input((3,)), L.Dense(2)])
    assert recalibrate_batchnorm(plain, np.ones((8, 3), np.float32)) == 0


def test_best_plan_picks_the_lower_loss_and_leaves_the_model_alone(trained_digits_cnn, digits):
    analysis = analyze(trained_digits_cnn)
    before = snapshot_model(trained_digits_cnn)
    scores = group_scores(analysis.graph, None, "magnitude")
    good = allocate(analysis, scores, 0.5, "flops", "uniform", Bounds())
    # One channel left per group, the weakest: far worse than half of every group.
    starved = KeepPlan({g: np.argsort(s)[:1] for g, s in scores.items()}, good.sizes)
    data = (digits.x_train[:512], digits.y_train[:512])
    name, plan = best_plan(
        analysis, {"starved": starved, "good": good}, data, trained_digits_cnn.loss
    )
    assert name == "good" and plan is good
    assert_model_unchanged(trained_digits_cnn, before)


def test_prune_chooses_the_balanced_objective_by_loss_and_recalibrates(
    trained_digits_cnn, digits, caplog
):
    with caplog.at_level("INFO", logger="tf_balancer"):
        model, report = tfb.prune(
            trained_digits_cnn,
            0.25,
            (digits.x_train[:512], digits.y_train[:512]),
            finetune_epochs=0,
        )
    assert report["objective"] in OBJECTIVES
    assert f"using {report['objective']!r}" in caplog.text
    assert "re-estimated" in caplog.text and "BatchNorm" in caplog.text
    # The compacted model's statistics are no longer the dense model's.
    dense_bn = trained_digits_cnn.get_layer("bn4").moving_mean.numpy()
    assert not any(
        w.shape == dense_bn.shape and np.allclose(w, dense_bn)
        for layer in model.layers
        for w in layer.get_weights()
    )
    assert report["final"]["flops"] <= 0.25 * report["dense"]["flops"] * 1.01
    assert tf.reduce_all(tf.math.is_finite(model(digits.x_val[:8])))

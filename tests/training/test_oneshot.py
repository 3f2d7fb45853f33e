"""``tfb.prune``: one call from a trained_digits_cnn model to a compacted, fine-tuned, folded model."""

from __future__ import annotations

import numpy as np
import pytest

import tf_balancer as tfb
from tf_balancer.analysis import analyze
from tf_balancer.demo import build_digits_cnn
from tf_balancer.errors import ConfigError


@pytest.fixture(scope="module")
def pruned(trained_digits_cnn, digits):
    before = [w.copy() for w in trained_digits_cnn.get_weights()]
    model, report = tfb.prune(
        trained_digits_cnn,
        target=0.5,
        data=(digits.x_train, digits.y_train),
        validation_data=(digits.x_val, digits.y_val),
        finetune_epochs=1,
    )
    return before, model, report


def test_prune_meets_the_target_and_leaves_the_users_model_alone(trained_digits_cnn, pruned):
    before, model, report = pruned
    for got, want in zip(trained_digits_cnn.get_weights(), before, strict=True):
        np.testing.assert_array_equal(got, want)
    assert analyze(model).cost.flops <= 0.5 * analyze(trained_digits_cnn).cost.flops * 1.01
    assert report["final"]["flops"] <= 0.5 * report["dense"]["flops"] * 1.01
    assert [p["name"] for p in report["passes"]][:2] == ["prune_channels", "strip_training_ops"]


def test_prune_reports_accuracy_before_and_after_finetuning(pruned):
    _, _, report = pruned
    scores = report["finetune"]["scores"]
    assert len(scores) == 2  # the compacted model, then one fine-tuned epoch
    assert report["final"]["accuracy"] == pytest.approx(max(scores), abs=1e-6)
    assert report["final"]["accuracy"] >= scores[0]
    assert report["finetune"]["batch_size"] == 32


def test_prune_without_validation_data_skips_finetuning(trained_digits_cnn, digits):
    model, report = tfb.prune(trained_digits_cnn, 0.5, (digits.x_train[:256], digits.y_train[:256]))
    assert report["finetune"] is None
    assert report["final"]["flops"] <= 0.5 * report["dense"]["flops"] * 1.01


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"target": 0.0}, "target"),
        ({"target": 0.5, "importance": "taylor"}, "probe data"),
        ({"target": 0.5, "data": ([1, 2, 3],)}, r"\(x, y\)"),
    ],
)
def test_prune_rejects_bad_arguments(trained_digits_cnn, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        tfb.prune(trained_digits_cnn, finetune_epochs=0, **kwargs)


def test_prune_of_an_uncompiled_model_asks_for_compile_when_finetuning(digits):
    model = build_digits_cnn(width=8, seed=0)
    with pytest.raises(ConfigError, match="compile"):
        tfb.prune(model, 0.5, (digits.x_train[:64], digits.y_train[:64]), importance="magnitude")

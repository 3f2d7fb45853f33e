"""``tfb.prune``: one call from a trained model to a compacted, fine-tuned, folded model."""

from __future__ import annotations

import numpy as np
import pytest

import tf_balancer as tfb
from tf_balancer.analysis import analyze
from tf_balancer.demo import build_digits_cnn, compile_classifier
from tf_balancer.errors import ConfigError


@pytest.fixture(scope="module")
def trained(digits):
    model = compile_classifier(build_digits_cnn(width=16, seed=0))
    model.fit(digits.x_train, digits.y_train, epochs=3, batch_size=64, verbose=0)
    return model


@pytest.fixture(scope="module")
def pruned(trained, digits):
    before = [w.copy() for w in trained.get_weights()]
    model, report = tfb.prune(
        trained,
        target=0.5,
        data=(digits.x_train, digits.y_train),
        validation_data=(digits.x_val, digits.y_val),
        finetune_epochs=1,
    )
    return before, model, report


def test_prune_meets_the_target_and_leaves_the_users_model_alone(trained, pruned):
    before, model, report = pruned
    for got, want in zip(trained.get_weights(), before, strict=True):
        np.testing.assert_array_equal(got, want)
    assert analyze(model).cost.flops <= 0.5 * analyze(trained).cost.flops * 1.01
    assert report["final"]["flops"] <= 0.5 * report["dense"]["flops"] * 1.01
    assert [p["name"] for p in report["passes"]][:2] == ["prune_channels", "strip_training_ops"]


def test_prune_reports_accuracy_before_and_after_finetuning(pruned):
    _, _, report = pruned
    scores = report["finetune"]["scores"]
    assert len(scores) == 2  # the compacted model, then one fine-tuned epoch
    assert report["final"]["accuracy"] == pytest.approx(max(scores), abs=1e-6)
    assert report["final"]["accuracy"] >= scores[0]
    assert report["finetune"]["batch_size"] == 32


def test_prune_without_validation_data_skips_finetuning(trained, digits):
    model, report = tfb.prune(trained, 0.5, (digits.x_train[:256], digits.y_train[:256]))
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
def test_prune_rejects_bad_arguments(trained, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        tfb.prune(trained, finetune_epochs=0, **kwargs)


def test_prune_of_an_uncompiled_model_asks_for_compile_when_finetuning(digits):
    model = build_digits_cnn(width=8, seed=0)
    with pytest.raises(ConfigError, match="compile"):
        tfb.prune(model, 0.5, (digits.x_train[:64], digits.y_train[:64]), importance="magnitude")

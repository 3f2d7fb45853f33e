"""Tests of chained rebuild passes: one model built and verified for several passes.

A chain must give exactly what the passes give one by one (same layers, names,
weights, outputs, and the same per-pass records), build one model, and fall back
to running the passes one by one - each verified, the culprit rolled back - when
its result fails verification or a pass changes its input in place.
"""

from __future__ import annotations

import keras as keras3
import numpy as np
import pytest
from conftest import (
    assert_model_unchanged,
    passes_registered,
    randomize_batchnorm,
    snapshot_model,
)

from tf_balancer._compat import keras
from tf_balancer.optimizer import MetaOptimizer, model_stats
from tf_balancer.passes import chain as chain_module
from tf_balancer.passes._rebuild import RebuildPass, Replacement, Rewrite

LOSSLESS = ["strip_training_ops", "fold_batchnorm", "fuse_activation"]
KERASES = pytest.mark.parametrize("k", [keras, keras3], ids=["tf_keras", "keras3"])


def _cnn(k):
    """Dropout before a conv-BN-ReLU, a residual Add, and a ReLU that is a model output
    (fusing it renames the conv after it)."""
    k.utils.set_random_seed(0)
    inp = k.Input((8, 8, 3), name="image")
    x = k.layers.Dropout(0.2, name="drop")(inp)
    x = k.layers.Conv2D(6, 3, padding="same", use_bias=False, name="conv1")(x)
    x = k.layers.BatchNormalization(name="bn1")(x)
    x = k.layers.ReLU(name="relu1")(x)
    y = k.layers.Conv2D(6, 1, name="conv2")(x)
    y = k.layers.BatchNormalization(name="bn2")(y)
    x = k.layers.Add(name="add")([x, y])
    side = k.layers.ReLU(name="side")(k.layers.Conv2D(2, 1, name="conv3")(x))
    x = k.layers.GlobalAveragePooling2D(name="pool")(x)
    x = k.layers.Dropout(0.5, name="top_drop")(x)
    logits = k.layers.Dense(3, name="logits")(x)
    return randomize_batchnorm(k.Model(inp, [logits, side]), seed=1)


def _mobilenet(k):
    k.utils.set_random_seed(0)
    model = k.applications.MobileNetV2(
        alpha=0.35, input_shape=(32, 32, 3), weights=None, classes=4, classifier_activation=None
    )
    return randomize_batchnorm(model, seed=2)


def _x(model, batch=3):
    shape = tuple(model.inputs[0].shape[1:])
    return np.random.default_rng(0).normal(size=(batch, *shape)).astype("float32")


def _structure(model):
    return [
        (type(layer).__name__, layer.name, [tuple(w.shape) for w in layer.weights])
        for layer in model.layers
    ]


def _one_by_one(model, names):
    records = []
    for name in names:
        model, report = MetaOptimizer([name]).run(model)
        records += report.records
    return model, records


@pytest.fixture
def rebuilds(monkeypatch):
    """Counts the models a chain builds (a spy: the real rebuild runs)."""
    built = []
    real = chain_module.rebuild_with
    monkeypatch.setattr(
        chain_module, "rebuild_with", lambda *a, **kw: built.append(a[0]) or real(*a, **kw)
    )
    return built


@KERASES
@pytest.mark.parametrize("make", [_cnn, _mobilenet], ids=["cnn", "mobilenet"])
def test_a_chain_builds_one_model_equal_to_the_passes_one_by_one(k, make, rebuilds):
    model = make(k)
    chained, report = MetaOptimizer(LOSSLESS).run(model)
    assert len(rebuilds) == 1
    alone, records = _one_by_one(model, LOSSLESS)
    assert [r.status for r in report.records] == [r.status for r in records]
    assert "applied" in [r.status for r in records]
    for got, want in zip(report.records, records, strict=True):
        assert (got.name, got.before, got.after, got.message) == (
            want.name,
            want.before,
            want.after,
            want.message,
        )
    applied = tuple(r.name for r in records if r.status == "applied")
    assert all(r.verified_with == applied for r in report.records if r.status == "applied")
    assert report.records[-1].after == model_stats(chained)  # measured on the model built
    assert _structure(chained) == _structure(alone)
    assert chained.output_names == alone.output_names == model.output_names
    for a, b in zip(chained.get_weights(), alone.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    x = _x(model)
    for a, b in zip(chained(x, training=False), model(x, training=False), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


class _PerturbsLogits(RebuildPass):
    """Claims to preserve the function but adds 1 to the logits' bias."""

    def rewrite(self, walk, ctx):
        (call,) = [c for c in walk.calls if c.name == "logits"]
        kernel, bias = call.layer.get_weights()
        weights = {"kernel": kernel, "bias": bias + 1.0}
        return Rewrite({"logits": Replacement(weights=weights)}, "perturbed the logits")


class _MutatesInput(RebuildPass):
    """Writes into the layer it is given, then drops nothing but a Dropout."""

    def rewrite(self, walk, ctx):
        (call,) = [c for c in walk.calls if c.name == "logits"]
        call.layer.bias.assign(call.layer.bias + 1.0)
        return Rewrite({"top_drop": chain_module.IDENTITY}, "dropped top_drop")


@pytest.fixture
def odd_passes():
    passes = {"test_perturbs_logits": _PerturbsLogits, "test_mutates_rebuild": _MutatesInput}
    with passes_registered(passes):
        yield passes


def test_a_chain_that_fails_verification_runs_its_passes_one_by_one(odd_passes):
    model = _cnn(keras)
    names = ["strip_training_ops", "test_perturbs_logits", "fold_batchnorm"]
    result, report = MetaOptimizer(names).run(model)
    statuses = {r.name: r.status for r in report.records}
    assert statuses == {
        "strip_training_ops": "applied",
        "test_perturbs_logits": "rolled_back",
        "fold_batchnorm": "applied",
    }
    assert all(r.verified_with == () for r in report.records)  # each verified alone
    x = _x(model)
    for a, b in zip(result(x, training=False), model(x, training=False), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


def test_a_chained_pass_that_changes_its_input_in_place_is_rolled_back(odd_passes):
    model = _cnn(keras)
    snapshot = snapshot_model(model)
    names = ["strip_training_ops", "test_mutates_rebuild", "fuse_activation"]
    _, report = MetaOptimizer(names).run(model)
    record = {r.name: r for r in report.records}["test_mutates_rebuild"]
    assert record.status == "rolled_back" and "in place" in record.message
    assert {r.name: r.status for r in report.records}["fuse_activation"] == "applied"
    assert_model_unchanged(model, snapshot)  # bit-identical

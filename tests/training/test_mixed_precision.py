"""Mixed precision: dtype-aware verification, float16 compaction, and honest end-of-training reports.

The end-to-end test trains under the ``mixed_float16`` global policy in both
Kerases; the ``mixed_float16`` fixture always puts the policy back to float32.
"""

from __future__ import annotations

import logging

import keras as keras3
import numpy as np
import pytest

import tf_balancer as tfb
from tf_balancer._compat import compute_dtype, keras
from tf_balancer.demo import build_digits_cnn, compile_classifier
from tf_balancer.optimizer import MetaOptimizer
from tf_balancer.passes.base import GraphPass, PassContext, PassResult
from tf_balancer.passes.prune_channels import PruneChannels
from tf_balancer.verify import TOLERANCES, Tolerance, compare_outputs, tolerance_for

KERASES = {"tf_keras": keras, "keras3": keras3}
X = np.random.default_rng(0).normal(size=(16, 4)).astype("float32")


@pytest.fixture(params=sorted(KERASES))
def mixed_float16(request):
    """The Keras module under test, with the ``mixed_float16`` global policy set."""
    k = KERASES[request.param]
    k.mixed_precision.set_global_policy("mixed_float16")
    try:
        yield k
    finally:
        k.mixed_precision.set_global_policy("float32")


def _keras3_digits_cnn(width: int = 32):
    """``build_digits_cnn`` in Keras 3, with the logits in float32 (Keras' mixed-precision advice)."""
    keras3.utils.set_random_seed(0)
    layers = keras3.layers
    inp = keras3.Input((16, 16, 1), name="image")
    x = layers.Conv2D(width, 3, padding="same", use_bias=False, name="conv1")(inp)
    x = layers.ReLU(name="relu1")(layers.BatchNormalization(momentum=0.9, name="bn1")(x))
    y = layers.Conv2D(width, 3, padding="same", use_bias=False, name="conv2")(x)
    y = layers.ReLU(name="relu2")(layers.BatchNormalization(momentum=0.9, name="bn2")(y))
    y = layers.Conv2D(width, 3, padding="same", use_bias=False, name="conv3")(y)
    y = layers.BatchNormalization(momentum=0.9, name="bn3")(y)
    x = layers.ReLU(name="res_relu")(layers.Add(name="res_add")([x, y]))
    x = layers.MaxPooling2D(name="pool1")(x)
    x = layers.Conv2D(2 * width, 3, padding="same", use_bias=False, name="conv4")(x)
    x = layers.ReLU(name="relu4")(layers.BatchNormalization(momentum=0.9, name="bn4")(x))
    x = layers.Flatten(name="flatten")(layers.MaxPooling2D(name="pool2")(x))
    x = layers.Dense(64, activation="relu", name="fc")(layers.Dropout(0.2, name="dropout")(x))
    model = keras3.Model(inp, layers.Dense(10, dtype="float32", name="logits")(x))
    model.compile(
        optimizer=keras3.optimizers.Adam(3e-3),
        loss=keras3.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


@pytest.mark.slow
def test_mixed_float16_fit_compacts_to_the_target_with_every_pass_applied(mixed_float16, digits):
    if mixed_float16 is keras:
        model = compile_classifier(build_digits_cnn())  # float16 logits
    else:
        model = _keras3_digits_cnn()  # float32 logits
    callback = tfb.BalanceCallback(target=0.5, verbose=0)
    model.fit(
        digits.x_train,
        digits.y_train,
        validation_data=(digits.x_val, digits.y_val),
        epochs=3,
        batch_size=64,
        callbacks=[callback],
        verbose=0,
    )
    report, optimized = callback.report, callback.optimized_model
    statuses = {p["name"]: p["status"] for p in report["passes"]}
    assert statuses.pop("strip_training_ops") in ("applied", "unchanged")
    assert statuses == dict.fromkeys(
        ("prune_channels", "fold_batchnorm", "fuse_activation"), "applied"
    )
    assert report["final"]["flops"] <= 0.5 * report["dense"]["flops"] * 1.01
    assert report["final_flops_ratio"] <= 0.5 * 1.01
    assert compute_dtype(optimized) == "float16"  # the clones kept their dtype policy
    assert optimized.outputs[0].dtype == model.outputs[0].dtype
    x = digits.x_val[:64]
    expected = np.asarray(model(x, training=False))  # the masked model
    got = np.asarray(optimized(x, training=False))
    assert got.dtype == expected.dtype
    tolerance = tolerance_for("float16")
    np.testing.assert_allclose(got, expected, tolerance.rtol, tolerance.atol_for(expected))


# ------------------------------------------------------------- tolerance table
def _dense(k=keras, dtype=None):
    k.utils.set_random_seed(0)
    inp = k.Input((4,), name="x")
    hidden = k.layers.Dense(8, activation="relu", dtype=dtype, name="hidden")(inp)
    return k.Model(inp, k.layers.Dense(3, dtype=dtype, name="out")(hidden))


def _shifted(model, shift: float):
    """A copy of ``model`` whose output bias is moved by ``shift``."""
    new = keras.models.clone_model(model)
    new.set_weights(model.get_weights())
    bias = new.get_layer("out").bias
    bias.assign(bias + shift)
    return new


def _scale(model) -> float:
    return float(np.abs(np.asarray(model(X), dtype=np.float64)).max())


def test_float32_tolerance_is_unchanged_and_explicit_values_replace_it():
    assert tolerance_for("float32") == Tolerance(rtol=1e-4, atol=1e-5) == TOLERANCES["float32"]
    assert tolerance_for("float32", rtol=0.0, atol=1e-2) == Tolerance(0.0, 1e-2)
    model = _dense()
    assert compute_dtype(model) == "float32"
    assert compare_outputs(model, _shifted(model, 1e-6), X).ok
    assert not compare_outputs(model, _shifted(model, 1e-3), X).ok
    assert compare_outputs(model, _shifted(model, 1e-3), X, rtol=0.0, atol=1e-2).ok
    assert not compare_outputs(model, _shifted(model, 1e-6), X, rtol=0.0, atol=1e-7).ok


def test_float16_tolerance_is_looser_and_explicit_values_only_loosen_it():
    fp16, fp32 = TOLERANCES["float16"], TOLERANCES["float32"]
    assert fp16.rtol > fp32.rtol and fp16.output_atol > 0
    assert tolerance_for("float16", rtol=1e-9, atol=0.0) == fp16
    assert tolerance_for("float16", atol=0.5).atol == 0.5
    assert tolerance_for("bfloat16").output_atol > fp16.output_atol
    model = _dense(dtype="mixed_float16")
    assert compute_dtype(model) == "float16"
    scale = _scale(model)
    # A few float16 roundings of the output's scale pass; a real error does not.
    assert compare_outputs(model, _shifted(model, 1e-3 * scale), X).ok
    assert compare_outputs(model, _shifted(model, 1e-3 * scale), X, rtol=0.0, atol=0.0).ok
    assert not compare_outputs(model, _shifted(model, 0.05 * scale), X).ok
    assert compare_outputs(model, _shifted(model, 0.05 * scale), X, atol=0.1 * scale).ok


@pytest.mark.parametrize("name", sorted(KERASES))
def test_compute_dtype_is_the_least_precise_layer_of_either_keras(name):
    k = KERASES[name]
    inp = k.Input((4,))
    half = k.layers.Dense(3, dtype="mixed_float16")(inp)
    assert compute_dtype(k.Model(inp, k.layers.Dense(2, dtype="float32")(half))) == "float16"
    brain = k.layers.Dense(3, dtype="mixed_bfloat16")(half)
    assert compute_dtype(k.Model(inp, brain)) == "bfloat16"
    inner = k.Model(inp, half)
    outer_in = k.Input((4,))
    assert compute_dtype(k.Model(outer_in, k.layers.Dense(2)(inner(outer_in)))) == "float16"


class _ShiftBias(GraphPass):
    """A function-preserving pass that is off by ``shift`` on the output bias."""

    name = "shift_bias"

    def __init__(self, shift: float):
        self.shift = shift

    def run(self, model, graph, ctx):
        return PassResult(_shifted(model, self.shift), changed=True, message="shifted")


def test_meta_optimizer_tolerance_follows_the_dtype_and_explicit_values():
    x = PassContext(probe_inputs=X)
    model = _dense()
    status = lambda optimizer: optimizer.run(model, x)[1].records[0].status  # noqa: E731
    assert status(MetaOptimizer([_ShiftBias(1e-3)])) == "rolled_back"
    assert status(MetaOptimizer([_ShiftBias(1e-3)], atol=1e-2)) == "applied"
    assert status(MetaOptimizer([_ShiftBias(1e-6)], rtol=0.0, atol=1e-7)) == "rolled_back"
    model = _dense(dtype="mixed_float16")
    scale = _scale(model)
    assert status(MetaOptimizer([_ShiftBias(1e-3 * scale)])) == "applied"
    assert status(MetaOptimizer([_ShiftBias(1e-3 * scale)], rtol=0.0, atol=0.0)) == "applied"
    assert status(MetaOptimizer([_ShiftBias(0.05 * scale)])) == "rolled_back"
    assert status(MetaOptimizer([_ShiftBias(0.05 * scale)], atol=0.1 * scale)) == "applied"


# ------------------------------------------------------------ honest reporting
def test_a_rolled_back_prune_is_one_warning_and_the_report_shows_what_was_produced(
    monkeypatch, caplog
):
    def fail(self, model, graph, ctx):
        raise RuntimeError("no luck today")

    monkeypatch.setattr(PruneChannels, "run", fail)
    model = build_digits_cnn(width=8)
    with caplog.at_level(logging.INFO, logger="tf_balancer"):
        _, report = tfb.prune(model, 0.5, importance="magnitude", finetune_epochs=0)
    assert report["passes"][0]["status"] == "rolled_back"
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and warnings[0].name == "tf_balancer.training.finalize"
    line = warnings[0].getMessage()
    assert "prune_channels" in line and "no luck today" in line and "target 0.5" in line
    ratio = report["final"]["flops"] / report["dense"]["flops"]
    assert report["final_flops_ratio"] == pytest.approx(ratio) and ratio > 0.9
    assert f"{ratio:.3f}" in line
    assert all(row["channels_after"] == row["channels_before"] for row in report["layers"])


def test_the_optimized_model_is_compiled_with_a_fresh_loss_scale_optimizer(mixed_float16):
    """Under ``mixed_float16`` ``compile`` wraps the optimizer in a loss-scale optimizer,
    which takes no learning rate: making a fresh one for fine-tuning and for compiling
    the result raised (Keras 3: 'LossScaleOptimizer does not support arguments:
    learning_rate'), so fine-tuning crashed at the end of training. Its inner
    optimizer is made anew at the fine-tuning rate and wrapped again."""
    from tf_balancer.training.finetune import compile_like

    k = mixed_float16
    inp = k.Input((4,))
    hidden = k.layers.Dense(8, activation="relu")(inp)
    trained = k.Model(inp, k.layers.Dense(3, dtype="float32")(hidden))
    trained.compile(
        optimizer=k.optimizers.Adam(1e-2),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    assert hasattr(trained.optimizer, "inner_optimizer")  # the wrapper is there
    copy = k.models.clone_model(trained)
    compile_like(copy, trained, 1e-3)
    assert type(copy.optimizer) is type(trained.optimizer)
    assert type(copy.optimizer.inner_optimizer) is type(trained.optimizer.inner_optimizer)
    assert float(np.asarray(copy.optimizer.inner_optimizer.learning_rate)) == pytest.approx(1e-3)
    copy.fit(X, np.arange(16) % 3, epochs=1, verbose=0)  # it trains

"""Models with open input axes (``keras.Input((None,))``, ``(None, None, 3)``):
costed at nominal sizes, pruned, and still taking any size afterwards."""

from __future__ import annotations

import json
import pathlib

import keras as keras3
import numpy as np
import pytest
import tensorflow as tf

import tf_balancer as tfb
from tf_balancer._compat import keras
from tf_balancer.analysis import analyze
from tf_balancer.attention.balance import allocate
from tf_balancer.attention.importance import group_scores
from tf_balancer.attention.masks import masked_copy
from tf_balancer.errors import ConfigError, UnsupportedModelError
from tf_balancer.input_shapes import input_shapes, nominal_shapes, set_nominal_shapes
from tf_balancer.passes.base import PassContext
from tf_balancer.passes.prune_channels import PruneChannels

KERASES = {"tf_keras": keras, "keras3": keras3}


@pytest.fixture(params=sorted(KERASES))
def kx(request):
    return KERASES[request.param]


def _text_net(kx, length=None, seed=0):
    """Embedding -> Conv1D -> LSTM -> max over time -> Dense, any length unless given."""
    kx.utils.set_random_seed(seed)
    inp = kx.Input((length,), dtype="int32")
    y = kx.layers.Embedding(50, 16, name="embed")(inp)
    y = kx.layers.Conv1D(32, 3, padding="same", activation="relu", name="conv")(y)
    y = kx.layers.LSTM(24, return_sequences=True, name="lstm")(y)
    y = kx.layers.GlobalMaxPooling1D()(y)
    model = kx.Model(inp, kx.layers.Dense(3, name="head")(y))
    model.compile("adam", kx.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def _tokens(n, length, seed=0):
    return np.random.default_rng(seed).integers(1, 50, (n, length)).astype("int32")


def _fully_convolutional(kx):
    """Conv-BN-ReLU, strided conv, squeeze-excite, global pooling: any image size."""
    kx.utils.set_random_seed(0)
    inp = kx.Input((None, None, 3))
    y = kx.layers.Conv2D(16, 3, padding="same", use_bias=False, name="stem")(inp)
    y = kx.layers.ReLU()(kx.layers.BatchNormalization(name="bn")(y))
    y = kx.layers.Conv2D(32, 3, strides=2, padding="same", activation="relu", name="conv")(y)
    s = kx.layers.GlobalAveragePooling2D(keepdims=True)(y)
    s = kx.layers.Conv2D(8, 1, activation="relu", name="squeeze")(s)
    s = kx.layers.Conv2D(32, 1, activation="sigmoid", name="excite")(s)
    y = kx.layers.GlobalAveragePooling2D()(kx.layers.Multiply()([y, s]))
    model = kx.Model(inp, kx.layers.Dense(4, name="head")(y))
    model.compile("adam", kx.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def test_an_open_axis_without_a_size_is_refused_with_the_fix(kx):
    model = _text_net(kx)
    with pytest.raises(UnsupportedModelError, match=r"input_shape=.*still takes any size"):
        analyze(model)
    with pytest.raises(UnsupportedModelError, match="input_shape="):
        input_shapes(model)


@pytest.mark.parametrize(
    "shape, match",
    [
        ((20, 4), "does not fit"),  # one axis too many
        ([(20,), (20,)], "2 shape"),  # one input, two shapes
        ((0,), "positive int"),
        ((None,), "positive int"),
        ((True,), "positive int"),
        ("20", "a shape such as"),
    ],
)
def test_a_size_that_does_not_fit_the_inputs_is_a_config_error(shape, match):
    with pytest.raises(ConfigError, match=match):
        set_nominal_shapes(_text_net(keras), shape)


def test_a_size_must_agree_with_the_axes_the_input_fixes():
    inp = keras.Input((None, 8))
    model = keras.Model(inp, keras.layers.Dense(2)(inp))
    with pytest.raises(ConfigError, match="equal to the input's"):
        set_nominal_shapes(model, (10, 9))
    set_nominal_shapes(model, (np.int64(10), 8))  # a size computed with NumPy
    assert input_shapes(model) == [(None, 10, 8)]
    assert all(type(d) is int for d in input_shapes(model)[0][1:])


def test_costs_at_a_nominal_length_equal_those_of_the_fixed_length_model(kx):
    """The same layers with Input((20,)) cost the same; FLOPs scale with the length
    (every layer here is linear in it)."""
    fixed = analyze(_text_net(kx, 20))
    model = _text_net(kx)
    at_20 = analyze(model, input_shape=(20,))
    assert at_20.cost.flops == fixed.cost.flops and at_20.cost.params == fixed.cost.params
    assert len(at_20.graph.prunable_groups) == len(fixed.graph.prunable_groups) == 3
    at_40 = analyze(model, input_shape=(40,))
    assert at_40.cost.flops == pytest.approx(2 * at_20.cost.flops, rel=0.01)
    assert model.inputs[0].shape[1] is None  # the model is not changed


def test_compaction_keeps_the_open_axis_and_is_exact_at_other_lengths(kx):
    model = _text_net(kx)
    analysis = analyze(model, input_shape=(20,))
    plan = allocate(analysis, group_scores(analysis.graph, None, "magnitude"), 0.5)
    small = PruneChannels().run(model, analysis.graph, PassContext(plan=plan)).model
    assert tuple(small.inputs[0].shape) == (None, None)
    assert nominal_shapes(small) == [(20,)]  # re-analysed at the same size
    assert analyze(small).cost.flops <= 0.5 * analysis.cost.flops * 1.01
    for length in (7, 33):
        tokens = _tokens(4, length, seed=length)
        expected = np.asarray(masked_copy(analysis.graph, plan)(tokens, training=False))
        np.testing.assert_allclose(np.asarray(small(tokens, training=False)), expected, 1e-4, 1e-4)


@pytest.mark.slow
def test_the_default_callback_reads_the_length_from_the_training_batches(kx):
    model = _text_net(kx)
    x, y = _tokens(128, 20), np.arange(128) % 3
    callback = tfb.BalanceCallback(verbose=0)
    history = model.fit(
        x, y, validation_data=(x[:32], y[:32]), epochs=4, callbacks=[callback], verbose=0
    )
    assert "val_macro_f1" in history.history
    report = callback.report
    assert report["final"]["flops"] / report["dense"]["flops"] <= 0.505
    assert report["dense"]["flops"] == analyze(_text_net(kx, 20)).cost.flops
    small = callback.optimized_model
    assert tuple(small.inputs[0].shape) == (None, None)
    tokens = _tokens(4, 9, seed=1)  # another length: the masked model and the compacted agree
    np.testing.assert_allclose(
        np.asarray(small(tokens, training=False)),
        np.asarray(model(tokens, training=False)),
        1e-4,
        1e-4,
    )


def _ragged_batches(n=96):
    """Sequences of 5-29 tokens, padded per batch: the batches' length axis is open."""
    rng = np.random.default_rng(0)
    rows = [rng.integers(1, 50, rng.integers(5, 30)).astype("int32") for _ in range(n)]
    labels = np.array([r[:3].sum() % 3 for r in rows], "int32")
    signature = (tf.TensorSpec((None,), tf.int32), tf.TensorSpec((), tf.int32))
    data = tf.data.Dataset.from_generator(
        lambda: zip(rows, labels, strict=True), output_signature=signature
    )
    return data.padded_batch(32)


@pytest.mark.slow
def test_batches_of_open_length_need_input_shape_and_work_with_it(kx):
    with pytest.raises(UnsupportedModelError, match="input_shape="):
        _text_net(kx).fit(_ragged_batches(), epochs=2, callbacks=[tfb.BalanceCallback()])
    model = _text_net(kx)
    callback = tfb.BalanceCallback(verbose=0, input_shape=(24,))
    model.fit(_ragged_batches(), epochs=3, callbacks=[callback], verbose=0)
    report = callback.report
    assert report["final"]["flops"] / report["dense"]["flops"] <= 0.505
    assert report["dense"]["flops"] == analyze(_text_net(kx, 24)).cost.flops


def test_one_shot_pruning_reads_the_image_size_from_the_data(kx):
    """A fully convolutional net (BatchNorm folded, squeeze-excite pruned) is costed at
    the data's 16x16 and the optimized model takes 24x20 images like the original."""
    model = _fully_convolutional(kx)
    rng = np.random.default_rng(0)
    x, y = rng.random((64, 16, 16, 3)).astype("float32"), rng.integers(0, 4, 64)
    small, report = tfb.prune(model, 0.5, data=(x, y), finetune_epochs=0)
    assert report["final"]["flops"] / report["dense"]["flops"] <= 0.505
    assert {r["name"]: r["status"] for r in report["passes"]}["fold_batchnorm"] == "applied"
    assert small.get_layer("excite").filters < 32  # the squeeze-excite gate is pruned too
    big = rng.random((2, 24, 20, 3)).astype("float32")
    assert tuple(small.predict(big, verbose=0).shape) == (2, 4)
    assert tuple(model.inputs[0].shape) == (None, None, None, 3)


def test_each_one_shot_pruning_is_costed_at_its_own_data_size(kx):
    """A second tfb.prune of the same model (or of its result) with images of another
    size was costed at the size the first call's data left on the model: the report's
    FLOPs were those of 16x16 images for 32x32 data."""
    model = _fully_convolutional(kx)
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 32)
    small = rng.random((32, 16, 16, 3)).astype("float32")
    large = rng.random((32, 32, 32, 3)).astype("float32")
    first, at_16 = tfb.prune(model, 0.5, data=(small, y), finetune_epochs=0)
    _, at_32 = tfb.prune(model, 0.5, data=(large, y), finetune_epochs=0)
    assert at_32["dense"]["flops"] == analyze(model, input_shape=(32, 32, 3)).cost.flops
    assert at_32["dense"]["flops"] > 3 * at_16["dense"]["flops"]
    _, again = tfb.prune(first, 0.5, data=(large, y), finetune_epochs=0)
    assert again["dense"]["flops"] == analyze(first, input_shape=(32, 32, 3)).cost.flops


@pytest.fixture(scope="module")
def open_size_saved_models(tmp_path_factory):
    """The fully convolutional net trained a step, as a tf_keras SavedModel (Keras
    metadata: prunable) and a Keras 3 export (a plain SavedModel), plus calibration data."""
    root = tmp_path_factory.mktemp("open_sizes")
    rng = np.random.default_rng(0)
    x, y = rng.random((32, 16, 16, 3)).astype("float32"), rng.integers(0, 4, 32)
    paths = {"calibration": str(root / "calibration.npz")}
    np.savez(paths["calibration"], x=x, y=y)
    for kx, name in ((keras, "keras_saved_model"), (keras3, "plain_saved_model")):
        model = _fully_convolutional(kx)
        model.fit(x, y, epochs=1, verbose=0)
        paths[name] = str(root / name)
        if kx is keras:
            model.save(paths[name])
        else:
            model.export(paths[name], verbose=False)
    return paths


def test_a_plain_saved_model_is_optimized_at_the_given_size_and_stays_open(
    open_size_saved_models, tmp_path
):
    from tf_balancer.export.savedmodel import optimize_saved_model

    source = open_size_saved_models["plain_saved_model"]
    with pytest.raises(UnsupportedModelError, match="--input_shape"):
        optimize_saved_model(source, str(tmp_path / "refused"))
    assert not (tmp_path / "refused").exists()
    report = optimize_saved_model(source, str(tmp_path / "at16"), input_shape=(16, 16, 3))
    at_32 = optimize_saved_model(source, str(tmp_path / "at32"), input_shape=(32, 32, 3))
    assert at_32["before"]["flops"] == pytest.approx(4 * report["before"]["flops"], rel=0.02)
    assert report["after"]["flops"] <= report["before"]["flops"]
    signature = tf.saved_model.load(str(tmp_path / "at16")).signatures["serving_default"]
    ((spec,),) = [list(signature.structured_input_signature[1].values())]
    assert spec.shape.as_list() == [None, None, None, 3]


def test_the_cli_prunes_a_keras_saved_model_at_the_calibration_size_with_tflite(
    open_size_saved_models, tmp_path
):
    from test_cli import _assert_one_line_error, _run

    source = open_size_saved_models["keras_saved_model"]
    _assert_one_line_error(
        _run("inspect", source, "--input_shape", "16,x"), "--input_shape", "integers"
    )
    _assert_one_line_error(_run("inspect", source, "--input_shape", "16,16"), "does not fit")
    output = tmp_path / "out"
    proc = _run(
        "optimize",
        source,
        "--output",
        str(output),
        "--calibration",
        open_size_saved_models["calibration"],
        "--config",
        str(pathlib.Path(__file__).resolve().parents[1] / "configs" / "structured_50_flops.yaml"),
        "--tflite",
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads((output / "tf_balancer_report.json").read_text())
    statuses = {r["name"]: r["status"] for r in report["passes"]}
    assert statuses["prune_channels"] == statuses["fold_batchnorm"] == "applied"
    assert report["after"]["flops"] <= 0.55 * report["before"]["flops"]
    assert report["tflite"]["max_abs_diff"] <= 1e-4
    small = keras.models.load_model(str(output))
    big = np.random.default_rng(1).random((2, 24, 20, 3)).astype("float32")
    assert tuple(small.predict(big, verbose=0).shape) == (2, 4)


@pytest.mark.slow
def test_the_callback_exports_an_open_size_model_and_its_tflite_without_data(tmp_path):
    """No validation data: the TFLite check runs on random images of the nominal size."""
    model = _fully_convolutional(keras3)
    rng = np.random.default_rng(0)
    x, y = rng.random((64, 16, 16, 3)).astype("float32"), rng.integers(0, 4, 64)
    callback = tfb.BalanceCallback(verbose=0)
    model.fit(x, y, epochs=3, callbacks=[callback], verbose=0)
    out = callback.export(str(tmp_path / "out"), tflite=True)
    report = json.loads((pathlib.Path(out) / "report.json").read_text())
    assert report["tflite"]["max_abs_diff"] <= 1e-4 and report["tflite"]["samples"] == 8
    assert report["final"]["flops"] / report["dense"]["flops"] <= 0.505

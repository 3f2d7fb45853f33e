"""TFLite export: float32, dynamic-range and full-integer models, verified, written atomically.

Real conversions with TensorFlow's TFLiteConverter and real interpreter runs on
a digits CNN trained for a few epochs; bad inputs get one typed error and leave
nothing behind.
"""

from __future__ import annotations

import os

import keras as keras3
import numpy as np
import pytest
import tensorflow as tf

import tf_balancer as tfb
from tf_balancer.demo import build_digits_cnn, compile_classifier
from tf_balancer.errors import ConfigError, ExportError, VerificationError
from tf_balancer.export.tflite import export_tflite


@pytest.fixture(scope="module")
def trained(digits):
    model = compile_classifier(build_digits_cnn(width=16, seed=0))
    model.fit(digits.x_train, digits.y_train, epochs=3, batch_size=32, verbose=0)
    return model


def _interpret(path, x):
    interpreter = tf.lite.Interpreter(model_path=path)
    index = interpreter.get_input_details()[0]["index"]
    interpreter.resize_tensor_input(index, list(x.shape))
    interpreter.allocate_tensors()
    interpreter.set_tensor(index, x)
    interpreter.invoke()
    return interpreter.get_tensor(interpreter.get_output_details()[0]["index"])


def test_float32_export_matches_the_keras_model(trained, digits, tmp_path):
    path = tmp_path / "model.tflite"
    result = export_tflite(trained, path, validation_data=(digits.x_val, digits.y_val))
    assert result.path == str(path) and result.bytes == os.path.getsize(path)
    assert result.max_abs_diff <= 1e-4 and result.samples == len(digits.x_val)
    assert result.accuracy == pytest.approx(result.reference_accuracy)
    assert result.latency_ms > 0
    x = digits.x_val[:5]
    np.testing.assert_allclose(_interpret(str(path), x), trained.predict(x, verbose=0), atol=1e-4)
    assert sorted(os.listdir(tmp_path)) == ["model.tflite"]  # no temporary file left


@pytest.mark.parametrize("quantize", ["dynamic", "int8"])
def test_quantized_exports_keep_accuracy_within_a_point(trained, digits, tmp_path, quantize):
    result = export_tflite(
        trained,
        tmp_path / f"{quantize}.tflite",
        quantize=quantize,
        calibration=digits.x_train[:200],
        validation_data=(digits.x_val, digits.y_val),
    )
    float_size = len(_float_flatbuffer(trained, tmp_path))
    assert result.bytes < 0.5 * float_size  # int8 weights
    assert result.accuracy >= result.reference_accuracy - 1.0
    assert result.reference_accuracy > 80


def _float_flatbuffer(model, tmp_path):
    path = tmp_path / "float.tflite"
    if not path.exists():
        export_tflite(model, path)
    return path.read_bytes()


def test_int8_model_computes_in_int8(trained, digits, tmp_path):
    path = tmp_path / "int8.tflite"
    export_tflite(trained, path, quantize="int8", calibration=digits.x_train[:100])
    interpreter = tf.lite.Interpreter(model_path=str(path))
    kinds = {d["dtype"] for d in interpreter.get_tensor_details() if "conv" in d["name"].lower()}
    assert np.int8 in kinds
    assert interpreter.get_input_details()[0]["dtype"] == np.float32  # float interface


def test_a_keras3_model_and_a_savedmodel_directory_export_too(digits, tmp_path):
    keras3.utils.set_random_seed(0)
    inputs = keras3.Input((16, 16, 1))
    x = keras3.layers.Conv2D(8, 3, activation="relu")(inputs)
    model = keras3.Model(inputs, keras3.layers.Dense(10)(keras3.layers.Flatten()(x)))
    result = export_tflite(model, tmp_path / "k3.tflite", calibration=digits.x_val[:32])
    assert result.max_abs_diff <= 1e-4
    saved = str(tmp_path / "saved")
    model.export(saved, format="tf_saved_model", verbose=False)
    result = export_tflite(saved, tmp_path / "from_dir.tflite")  # seeded random inputs
    assert result.samples == 8 and result.max_abs_diff <= 1e-4


def test_the_callback_exports_a_verified_tflite_model_next_to_the_savedmodel(digits, tmp_path):
    model = compile_classifier(build_digits_cnn(width=8, seed=0))
    callback = tfb.BalanceCallback(
        verbose=0,
        validation_data=(digits.x_val, digits.y_val),
        finetune_data=(digits.x_train[:256], digits.y_train[:256]),
    )
    model.fit(
        digits.x_train, digits.y_train, epochs=3, batch_size=64, callbacks=[callback], verbose=0
    )
    with pytest.raises(ConfigError, match="tflite=True"):
        callback.export(str(tmp_path / "no"), quantize="int8")
    assert not (tmp_path / "no").exists()
    path = callback.export(str(tmp_path / "out"), tflite=True, quantize="int8")
    assert sorted(os.listdir(path)) == [
        "model.tflite",
        "report.json",
        "report.md",
        "report.png",
        "saved_model",
    ]
    import json

    with open(os.path.join(path, "report.json"), encoding="utf-8") as handle:
        lite = json.load(handle)["tflite"]
    assert lite["path"] == "model.tflite" and lite["quantize"] == "int8"
    assert lite["accuracy"] >= lite["reference_accuracy"] - 1.0
    assert lite["samples"] == len(digits.x_val)


def test_bad_inputs_raise_one_typed_error_and_write_nothing(trained, digits, tmp_path):
    target = tmp_path / "model.tflite"
    with pytest.raises(ConfigError, match="quantize must be one of"):
        export_tflite(trained, target, quantize="int4")
    with pytest.raises(ConfigError, match="needs calibration inputs"):
        export_tflite(trained, target, quantize="int8", validation_data=digits.x_val)
    assert list(tmp_path.iterdir()) == []
    target.write_bytes(b"mine")
    with pytest.raises(ExportError, match="already exists"):
        export_tflite(trained, target)
    assert target.read_bytes() == b"mine"
    # each of these raised NumPy's or the OS's own error (or blamed the converter) before
    with pytest.raises(ExportError, match="is a directory; give a file path"):
        export_tflite(trained, tmp_path, overwrite=True)
    with pytest.raises(ConfigError, match="y has 5 samples but x has 64"):
        export_tflite(
            trained, tmp_path / "a.tflite", validation_data=(digits.x_val[:64], digits.y_val[:5])
        )
    with pytest.raises(ConfigError, match=r"calibration: x has shape \(32, 8, 8, 1\)"):
        export_tflite(
            trained, tmp_path / "b.tflite", quantize="int8", calibration=np.zeros((32, 8, 8, 1))
        )
    assert [p.name for p in tmp_path.iterdir()] == ["model.tflite"]


def test_an_op_tflite_cannot_run_is_named_and_nothing_is_written(tmp_path):
    class PythonStep(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32)])
        def __call__(self, x):
            doubled = tf.numpy_function(lambda a: a * 2, [x], tf.float32)
            return {"out": tf.reshape(doubled, [-1, 4])}

    module = PythonStep()
    saved = str(tmp_path / "saved")
    tf.saved_model.save(module, saved, signatures=module.__call__.get_concrete_function())
    with pytest.raises(ExportError, match="no TFLite kernel for tf.PyFunc") as raised:
        export_tflite(saved, tmp_path / "out.tflite")
    assert "\n" not in str(raised.value)
    assert sorted(os.listdir(tmp_path)) == ["saved"]


@pytest.mark.parametrize("kx", ["tf_keras", "keras3"])
def test_a_mixed_precision_model_is_refused_naming_the_float32_copy(kx, tmp_path):
    """The converter has no float16 kernels; the message said to try quantize=None,
    which was already the case. It now says what to do."""
    from tf_balancer._compat import keras

    k = keras if kx == "tf_keras" else keras3
    inp = k.Input((8, 8, 1))
    h = k.layers.Conv2D(8, 3, activation="relu", dtype="mixed_float16")(inp)
    pooled = k.layers.GlobalAveragePooling2D(dtype="mixed_float16")(h)
    model = k.Model(inp, k.layers.Dense(4, dtype="float32")(pooled))
    with pytest.raises(ExportError, match="16-bit floats.*float32 copy") as raised:
        export_tflite(model, tmp_path / "m.tflite")
    assert "quantize=None" not in str(raised.value) and "\n" not in str(raised.value)
    assert list(tmp_path.iterdir()) == []


def test_a_model_outside_tolerance_is_not_written(trained, digits, tmp_path, monkeypatch):
    """The check is real: a converted model whose outputs differ is refused."""
    from tf_balancer.export import tflite

    real = tflite._interpret
    monkeypatch.setattr(tflite, "_interpret", lambda fb, x, **kw: real(fb, x, **kw) + 1e-3)
    with pytest.raises(VerificationError, match="differs from the source"):
        export_tflite(trained, tmp_path / "m.tflite", validation_data=digits.x_val[:16])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("layer", ["LSTM", "GRU"])
def test_keras3_recurrent_models_convert_at_batch_one_and_match(digits, tmp_path, layer):
    # Their TensorList has an element shape that follows the batch size: TFLite lowers it
    # only at a fixed batch, so the export falls back to batch 1 and says so.
    keras3.utils.set_random_seed(0)
    inputs = keras3.Input((8, 8))
    x = getattr(keras3.layers, layer)(12, name="rnn")(inputs)
    model = keras3.Model(inputs, keras3.layers.Dense(10, name="head")(x))
    sequences = digits.x_val[:10].reshape(-1, 8, 8)  # 40 sequences of 8 steps
    result = export_tflite(model, tmp_path / "rnn.tflite", validation_data=sequences)
    assert result.fixed_batch == 1 and result.samples == 40
    assert result.max_abs_diff <= 1e-4
    interpreter = tf.lite.Interpreter(model_path=result.path)
    interpreter.allocate_tensors()
    detail = interpreter.get_input_details()[0]
    interpreter.set_tensor(detail["index"], sequences[:1].astype(np.float32))
    interpreter.invoke()
    out = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])
    np.testing.assert_allclose(out, model.predict(sequences[:1], verbose=0), atol=1e-4)


def test_models_with_an_open_batch_axis_keep_it(trained, digits, tmp_path):
    result = export_tflite(trained, tmp_path / "cnn.tflite", validation_data=digits.x_val[:70])
    assert result.fixed_batch is None and result.samples == 70


@pytest.mark.parametrize("with_data", [True, False])
def test_a_token_id_model_is_checked_on_integer_inputs(tmp_path, with_data):
    """Before: every check batch was cast to float32 and the interpreter refused it."""
    keras3.utils.set_random_seed(0)
    inp = keras3.Input((20,), dtype="int32")
    y = keras3.layers.GlobalAveragePooling1D()(keras3.layers.Embedding(50, 8)(inp))
    model = keras3.Model(inp, keras3.layers.Dense(3)(y))
    x = np.random.default_rng(0).integers(0, 50, (16, 20)).astype("int32")
    data = (x, np.zeros(16, "int64")) if with_data else None
    result = export_tflite(model, tmp_path / "tokens.tflite", validation_data=data)
    assert result.max_abs_diff <= 1e-5
    np.testing.assert_allclose(
        _interpret(str(tmp_path / "tokens.tflite"), x[:4]), model.predict(x[:4], verbose=0), 1e-5
    )


def test_a_model_with_two_inputs_is_refused_in_one_line(tmp_path):
    a, b = keras3.Input((4,)), keras3.Input((4,))
    model = keras3.Model([a, b], keras3.layers.Dense(2)(keras3.layers.Concatenate()([a, b])))
    x = np.zeros((4, 4), "float32")
    with pytest.raises(ConfigError, match="one input tensor; this one has 2"):
        export_tflite(model, tmp_path / "two.tflite", validation_data=([x, x], None))
    assert list(tmp_path.iterdir()) == []

"""TFLite (LiteRT) export: float32, dynamic-range and full-integer models, each verified.

:func:`export_tflite` converts a Keras model (tf_keras or Keras 3) or a
SavedModel directory with TensorFlow's ``TFLiteConverter``, runs the converted
model in the TFLite interpreter on real inputs and compares it with the source
before anything is written:

* ``quantize=None`` (float32): outputs within ``FLOAT_ATOL`` (1e-4) of the source's;
* ``"dynamic"`` (int8 weights, float activations) and ``"int8"`` (full integer:
  int8 weights and activations, calibrated on ``calibration`` inputs; the
  model's inputs and outputs stay float32): with labels, accuracy within
  ``ACCURACY_POINTS`` (1 point) of the source's on the same samples; without
  labels, the largest difference is reported.

Keras 3's recurrent layers (``LSTM``, ``GRU``, ``SimpleRNN``) keep their steps
in a TensorList that TFLite can only lower at a fixed batch size: such a model
is converted at batch 1 (``TFLiteResult.fixed_batch``), the usual on-device case.

The file is written to a temporary name next to ``path`` and renamed into place.
The result records the interpreter's median latency at batch 1.

Example:
    >>> result = export_tflite(model, "digits.tflite", quantize="int8",
    ...                        calibration=x_train[:256], validation_data=(x_val, y_val))  # doctest: +SKIP
    >>> result.accuracy, result.reference_accuracy, result.latency_ms  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import os
import re
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from tf_balancer._compat import adapter_for, is_keras3_object, is_keras_model
from tf_balancer._quiet import quietly
from tf_balancer.errors import ConfigError, ExportError, VerificationError
from tf_balancer.graph.trace import freeze
from tf_balancer.input_shapes import input_shapes
from tf_balancer.report import one_input

__all__ = [
    "TFLiteResult",
    "export_tflite",
    "check_options",
    "QUANTIZE_MODES",
    "FLOAT_ATOL",
    "ACCURACY_POINTS",
]

QUANTIZE_MODES = (None, "dynamic", "int8")
FLOAT_ATOL = 1e-4
ACCURACY_POINTS = 1.0
CALIBRATION_SAMPLES = 200
VERIFY_SAMPLES = 512


@dataclasses.dataclass(frozen=True)
class TFLiteResult:
    """What :func:`export_tflite` wrote and measured.

    Attributes:
        path: the ``.tflite`` file.
        quantize: ``None``, ``"dynamic"`` or ``"int8"``.
        bytes: its size.
        samples: inputs the check ran on.
        max_abs_diff: largest output difference from the source.
        accuracy: TFLite accuracy on the labelled samples (%), or None.
        reference_accuracy: the source's accuracy on the same samples (%), or None.
        latency_ms: interpreter median latency at batch 1.
        fixed_batch: the batch size the model was converted at when its batch axis
            could not stay open (Keras 3 recurrent layers: 1), else None.
    """

    path: str
    quantize: str | None
    bytes: int
    samples: int
    max_abs_diff: float
    accuracy: float | None
    reference_accuracy: float | None
    latency_ms: float
    fixed_batch: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def report_entry(self) -> dict[str, Any]:
        """:meth:`to_dict` with the file named relative to the export directory."""
        return {**self.to_dict(), "path": os.path.basename(self.path)}


def check_options(tflite: bool, quantize: str | None, has_calibration: bool) -> None:
    """Refuse TFLite options that cannot work, before any work is done.

    Raises:
        ConfigError: ``quantize`` without ``tflite``, an unknown ``quantize``, or
            ``"int8"`` without calibration inputs.
    """
    if quantize is not None and not tflite:
        raise ConfigError("quantize applies to the TFLite model: pass tflite=True (CLI: --tflite)")
    if quantize not in QUANTIZE_MODES:
        raise ConfigError(f"quantize must be one of {QUANTIZE_MODES}, got {quantize!r}")
    if quantize == "int8" and not has_calibration:
        raise ConfigError(
            "quantize='int8' needs calibration inputs to set the activation ranges; pass "
            "calibration=x_train[:200] (CLI: --calibration data.npz), or use quantize='dynamic'"
        )


@quietly
def export_tflite(
    model: Any,
    path: str | os.PathLike,
    *,
    quantize: str | None = None,
    calibration: Any = None,
    validation_data: Any = None,
    overwrite: bool = False,
    reference: Any = None,
) -> TFLiteResult:
    """Convert ``model`` to TFLite, verify it against ``model``, write it to ``path``.

    Args:
        model: a Keras model (tf_keras or Keras 3) or a SavedModel directory
            (its ``serving_default`` signature); never modified. One input tensor.
        path: the ``.tflite`` file to write.
        quantize: None (float32), ``"dynamic"`` or ``"int8"``.
        calibration: input samples (an array, or ``(x, y)``) for ``"int8"``
            calibration; also the check's inputs when there is no validation data.
        validation_data: ``(x, y)`` or ``x``: the samples the result is checked on
            (with labels, quantized models are checked by accuracy). Without
            any data, 8 seeded uniform random inputs.
        overwrite: replace ``path`` if it exists.
        reference: what the result is checked against, a Keras model or a
            SavedModel directory; defaults to ``model``. (``optimize`` converts
            the model before Grappler, whose fused ops TFLite cannot run, and
            checks against the SavedModel it wrote.)

    Returns:
        A :class:`TFLiteResult`.

    Raises:
        ConfigError: an unknown ``quantize``, or ``"int8"`` without calibration data.
        ExportError: ``path`` exists (without ``overwrite``), or TFLite cannot
            convert the model (the converter's first line says which op).
        VerificationError: the converted model is outside tolerance (nothing written).
    """
    path = os.path.abspath(os.fspath(path))
    _require_one_input(model if reference is None else reference)
    calib_x, calib_y = _split(calibration)
    check_options(True, quantize, calib_x is not None)
    check_x, check_y = _split(validation_data)
    if check_x is None:
        check_x, check_y = calib_x, calib_y
    if os.path.isdir(path):
        raise ExportError(f"{path} is a directory; give a file path such as {path}/model.tflite")
    if os.path.lexists(path) and not overwrite:
        raise ExportError(f"{path} already exists; pass overwrite=True or choose another path")
    reference, input_shape, dtype = _reference_fn(model if reference is None else reference)
    for name, (x, y) in (
        ("calibration", (calib_x, calib_y)),
        ("validation_data", (check_x, check_y)),
    ):
        _check_samples(name, x, y, input_shape)
    if check_x is None:  # no data: seeded random inputs (token ids 0) check the arithmetic
        shape = (8, *input_shape[1:])
        rng = np.random.default_rng(0)
        check_x = rng.uniform(size=shape) if dtype.is_floating else np.zeros(shape)
        check_x = check_x.astype(dtype.as_numpy_dtype)
    flatbuffer = _convert(model, quantize, calib_x)
    check_x, check_y = (
        check_x[:VERIFY_SAMPLES],
        None if check_y is None else check_y[:VERIFY_SAMPLES],
    )
    expected = reference(check_x)
    fixed_batch = _fixed_batch(flatbuffer)
    actual = _interpret(flatbuffer, check_x, chunk=fixed_batch or 64)
    result = _verify(quantize, expected, actual, check_y)
    _write_atomically(path, flatbuffer)
    return TFLiteResult(
        path=path,
        quantize=quantize,
        bytes=len(flatbuffer),
        samples=len(check_x),
        latency_ms=_latency_ms(flatbuffer, check_x[:1]),
        fixed_batch=fixed_batch,
        **result,
    )


def _check_samples(name: str, x: Any, y: Any, input_shape: tuple) -> None:
    """Raise :class:`ConfigError` when ``x`` does not fit the model's input (its axes
    after the batch, open ones aside) or ``y`` has another number of samples."""
    if x is None:
        return
    given, wanted = tuple(np.shape(x)), tuple(input_shape)
    if len(given) == len(wanted) - 1 and wanted[-1] in (1, None):
        given = (*given, wanted[-1])  # (n,) strings or ids for an input of shape (n, 1)
    fits = len(given) == len(wanted) and all(
        w is None or g == w for g, w in zip(given[1:], wanted[1:], strict=True)
    )
    if not fits:
        expected = "x".join("?" if d is None else str(d) for d in ("n", *wanted[1:]))
        raise ConfigError(
            f"{name}: x has shape {given} but the model takes inputs of shape ({expected}); "
            "pass samples shaped like the training data"
        )
    if y is not None and len(y) != len(x):
        raise ConfigError(
            f"{name}: y has {len(y)} samples but x has {len(x)}; give one label per sample"
        )


def _model_input(x: np.ndarray) -> np.ndarray:
    """Samples as a model takes them: floats as float32, integers (token ids) as int32."""
    return x.astype(np.float32 if np.issubdtype(x.dtype, np.floating) else np.int32)


def _split(data: Any) -> tuple[np.ndarray | None, np.ndarray | None]:
    if data is None:
        return None, None
    if isinstance(data, (tuple, list)) and len(data) == 2:
        return np.asarray(one_input(data[0])), None if data[1] is None else np.asarray(data[1])
    return np.asarray(one_input(data)), None


def _require_one_input(model: Any) -> None:
    """A Keras model with several inputs cannot be exported (the interpreter checks feed
    one tensor); a SavedModel's signature is checked when it is loaded."""
    if (is_keras_model(model) or is_keras3_object(model)) and len(model.inputs) != 1:
        raise ConfigError(
            f"TFLite export supports models with one input tensor; this one has "
            f"{len(model.inputs)}: export without tflite, or convert with tf.lite yourself"
        )


def _reference_fn(model: Any) -> tuple[Callable[[np.ndarray], np.ndarray], tuple, tf.DType]:
    """The source as ``x -> outputs``, its input shape and its input dtype."""
    if is_keras_model(model) or is_keras3_object(model):
        run = lambda x: np.asarray(model.predict(x, verbose=0, batch_size=256), np.float32)  # noqa: E731
        # open axes at their nominal sizes
        return run, input_shapes(model)[0], tf.as_dtype(model.inputs[0].dtype)
    signature = _serving_signature(os.fspath(model))
    ((key, spec),) = signature.structured_input_signature[1].items()

    def run(x: np.ndarray) -> np.ndarray:
        outputs = signature(**{key: tf.constant(x, spec.dtype)})
        return np.asarray(outputs[min(outputs)], np.float32)  # the interpreter's pick too

    return run, tuple(spec.shape), spec.dtype


def _serving_signature(path: str) -> Any:
    if not tf.saved_model.contains_saved_model(path):
        raise ConfigError(f"{path}: not a SavedModel directory; give a Keras model or a SavedModel")
    loaded = tf.saved_model.load(path)
    signature = loaded.signatures.get("serving_default")
    if signature is None or len(signature.structured_input_signature[1]) != 1:
        raise ConfigError(f"{path}: TFLite export needs a serving_default signature with one input")
    signature._tfb_loaded = loaded  # keep the variables alive with the function
    return signature


def _convert(model: Any, quantize: str | None, calib_x: np.ndarray | None) -> bytes:
    keras_model = is_keras_model(model) or is_keras3_object(model)
    with tempfile.TemporaryDirectory() as tmp:
        if keras_model:
            if len(model.inputs) != 1:
                raise ConfigError("TFLite export supports models with one input tensor")
            source = os.path.join(tmp, "saved_model")
            adapter_for(model).save_saved_model(model, source)
        else:
            source = os.fspath(model)
        try:
            converter = tf.lite.TFLiteConverter.from_saved_model(source)
            return _run_converter(converter, quantize, calib_x)
        except ExportError as err:
            if not keras_model or "TensorList" not in str(err.__cause__):
                raise
    # Keras 3's recurrent layers keep their steps in a TensorList whose element shape
    # follows the batch size: open, TFLite cannot lower it; at batch 1 it can.
    return _run_converter(_batch_one_converter(model), quantize, calib_x)


def _batch_one_converter(model: Any) -> Any:
    """A converter for ``model`` traced at a fixed batch size of 1, variables frozen
    (TFLite cannot read a variable inside the lowered while loop)."""
    spec = model.inputs[0]
    signature = tf.TensorSpec((1, *spec.shape[1:]), tf.as_dtype(spec.dtype))
    function = tf.function(lambda x: model(x, training=False)).get_concrete_function(signature)
    return tf.lite.TFLiteConverter.from_concrete_functions([freeze(function)[1]])


def _run_converter(converter: Any, quantize: str | None, calib_x: np.ndarray | None) -> bytes:
    if quantize is not None:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if quantize == "int8":
        samples = _model_input(np.asarray(calib_x[:CALIBRATION_SAMPLES]))
        converter.representative_dataset = lambda: ([s[None]] for s in samples)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    try:
        return converter.convert()
    except Exception as err:  # the converter raises several types; one line for the user
        raise ExportError(
            f"TFLite cannot convert this model ({_conversion_problem(err)}); "
            f"{_conversion_hint(err, quantize)}"
        ) from err


def _conversion_hint(err: Exception, quantize: str | None) -> str:
    """What to do about a failed conversion, from what the converter refused."""
    if re.search(r"x(b?f16)>", str(err)):  # an MLIR tensor type such as tensor<1x8x8x16xf16>
        return (
            "the model computes in 16-bit floats (mixed precision), which the converter's "
            "kernels do not take: export a float32 copy (set_global_policy('float32'), build "
            "the model again and load these weights), then quantize it if you want it smaller"
        )
    if quantize is not None:
        return "try quantize=None if a quantized kernel is missing, or export without TFLite"
    return "export without TFLite"


def _conversion_problem(err: Exception) -> str:
    """The ops the converter refused, or the first line of its message (MLIR dumps are long)."""
    text = str(err)
    ops = sorted(set(re.findall(r"'(tf\.\w+)' op", text)))
    if ops:
        return f"no TFLite kernel for {', '.join(ops)}"
    first = text.strip().splitlines()[0] if text.strip() else type(err).__name__
    return first[:200]


def _lite_interpreter(flatbuffer: bytes) -> Any:
    """``tf.lite.Interpreter`` without its notice that it moves to the LiteRT package
    (a TensorFlow-internal warning on every construction, not the user's business)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*tf.lite.Interpreter is deprecated")
        return tf.lite.Interpreter(model_content=flatbuffer)


def _interpreter(flatbuffer: bytes, shape: Sequence[int]) -> Any:
    """An interpreter whose input takes ``shape`` (where the model leaves axes open:
    the batch, or a length or image size)."""
    interpreter = _lite_interpreter(flatbuffer)
    detail = interpreter.get_input_details()[0]
    if any(d < 0 for d in detail["shape_signature"]):
        interpreter.resize_tensor_input(detail["index"], list(shape))
    interpreter.allocate_tensors()
    return interpreter


def _fixed_batch(flatbuffer: bytes) -> int | None:
    """The batch size a TFLite model was converted at, or None when it is open."""
    detail = _lite_interpreter(flatbuffer).get_input_details()[0]
    size = int(detail["shape_signature"][0])
    return None if size < 0 else size


def _interpret(flatbuffer: bytes, x: np.ndarray, chunk: int) -> np.ndarray:
    """Outputs over ``x`` in batches of ``chunk`` (the model's fixed batch size, if any)."""
    interpreters: dict[int, Any] = {}  # one per batch length (the last may be shorter)
    outputs = []
    for start in range(0, len(x), chunk):
        batch = np.asarray(x[start : start + chunk])
        if len(batch) not in interpreters:
            interpreters[len(batch)] = _interpreter(flatbuffer, batch.shape)
        interpreter = interpreters[len(batch)]
        detail = interpreter.get_input_details()[0]
        interpreter.set_tensor(detail["index"], batch.astype(detail["dtype"]))
        interpreter.invoke()
        outputs.append(interpreter.get_tensor(_first_output(interpreter)))
    return np.concatenate(outputs).astype(np.float32)


def _first_output(interpreter: Any) -> int:
    """The tensor index of the signature output with the first name (the name the
    reference reads): the flatbuffer's output order need not follow the signature's."""
    signatures = interpreter.get_signature_list()
    if not signatures:
        return interpreter.get_output_details()[0]["index"]
    key = "serving_default" if "serving_default" in signatures else min(signatures)
    details = interpreter.get_signature_runner(key).get_output_details()
    return details[min(details)]["index"]


def _verify(
    quantize: str | None, expected: np.ndarray, actual: np.ndarray, labels: np.ndarray | None
) -> dict[str, Any]:
    diff = float(np.max(np.abs(expected.reshape(actual.shape) - actual)))
    accuracy = reference = None
    if labels is not None and expected.ndim == 2 and expected.shape[1] > 1:
        truth = labels.reshape(len(labels), -1).argmax(-1) if labels.ndim > 1 else labels
        accuracy = float(np.mean(actual.argmax(-1) == truth) * 100)
        reference = float(np.mean(expected.argmax(-1) == truth) * 100)
    if quantize is None and diff > FLOAT_ATOL:
        raise VerificationError(
            f"the float32 TFLite model differs from the source by {diff:.3g} "
            f"(tolerance {FLOAT_ATOL:g}); nothing written"
        )
    if quantize is not None and accuracy is not None and accuracy < reference - ACCURACY_POINTS:
        raise VerificationError(
            f"the {quantize} TFLite model's accuracy is {accuracy:.2f}% vs {reference:.2f}% for "
            f"the source (more than {ACCURACY_POINTS:g} point lower); nothing written. Calibrate "
            "on more representative inputs, or use quantize='dynamic' or None"
        )
    return {"max_abs_diff": diff, "accuracy": accuracy, "reference_accuracy": reference}


def _latency_ms(flatbuffer: bytes, x: np.ndarray, repeats: int = 50) -> float:
    interpreter = _interpreter(flatbuffer, np.shape(x))
    detail = interpreter.get_input_details()[0]
    interpreter.set_tensor(detail["index"], np.asarray(x).astype(detail["dtype"]))
    interpreter.invoke()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        interpreter.invoke()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def _write_atomically(path: str, content: bytes) -> None:
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.tmp-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(content)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise

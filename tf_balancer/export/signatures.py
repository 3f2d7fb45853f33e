"""Serving signatures of a SavedModel: feed them, save new functions under them, verify.

The helpers :func:`~tf_balancer.export.savedmodel.optimize_saved_model` shares between
its Keras path (:mod:`tf_balancer.export.keras_path`) and its plain-GraphDef
path (:mod:`tf_balancer.export.graph_path`): inputs for a signature
(calibration samples or seeded random ones), saving one callable per source
signature with the same input specs and output keys, and checking the written
signatures against the source (or another reference) within tolerances.

Example:
    >>> loaded = tf.saved_model.load("model")  # doctest: +SKIP
    >>> sig = loaded.signatures["serving_default"]  # doctest: +SKIP
    >>> feed, origin = make_feed(sig, calibration=None, batch=8)  # doctest: +SKIP
    >>> origin, sorted(call_signature(sig, feed))  # doctest: +SKIP
    ('random', ['output_0'])
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import tensorflow as tf

from tf_balancer.errors import ConfigError, VerificationError
from tf_balancer.input_shapes import (
    fill_open_axes,
    has_open_axes,
    nominal_shapes,
    set_nominal_shapes,
    shapes_from_arrays,
)
from tf_balancer.verify import tolerance_for

__all__ = [
    "Feed",
    "Run",
    "input_specs",
    "make_feed",
    "size_open_axes",
    "call_signature",
    "save_signatures",
    "source_endpoints",
    "plain_specs",
    "verify_signatures",
    "compute_dtype_of",
]

#: Input key -> array, one batch for one signature.
Feed = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class Run:
    """What the optimization did: records, notes, and the verification reference."""

    records: list[dict[str, Any]]
    notes: list[str]
    reference: Callable[[Feed], Mapping[str, Any]] | None = None  # None: the source
    reference_name: str = "source"


def input_specs(signature: Any) -> dict[str, tf.TensorSpec]:
    """Input key -> ``tf.TensorSpec`` of a signature (its keyword arguments)."""
    return dict(signature.structured_input_signature[1])


def size_open_axes(signature: Any, input_shape: Any, calibration: Any) -> None:
    """Nominal sizes (:mod:`tf_balancer.input_shapes`) for a signature whose inputs
    leave axes other than the batch open: ``input_shape`` (one shape per input, in
    the order of :func:`input_specs`), else the calibration samples' shapes.
    Without either its FLOPs cannot be counted (the error says so)."""
    specs = input_specs(signature)
    declared = [tuple(spec.shape) for spec in specs.values()]
    if not has_open_axes(declared):
        return
    if input_shape is not None:
        set_nominal_shapes(signature, input_shape, declared)
        return
    x = None if calibration is None else calibration[0]
    if isinstance(x, Mapping) and set(specs) <= set(x):
        arrays = [np.asarray(x[key]) for key in specs]
    else:
        arrays = [np.asarray(x)] if x is not None and len(specs) == 1 else []
    shapes = shapes_from_arrays(declared, arrays)
    if shapes is not None:
        set_nominal_shapes(signature, shapes, declared)


def make_feed(signature: Any, calibration: Any, batch: int, seed: int = 0) -> tuple[Feed, str]:
    """Inputs for one signature: the first ``batch`` calibration samples, else seeded random.

    Random inputs are uniform in [0, 1) for float inputs and zeros otherwise; an
    unknown batch axis gets ``batch`` rows and any other unknown dimension its
    nominal size (:func:`size_open_axes`), else 1.
    Returns the feed and where it came from (``"calibration"`` or ``"random"``).
    """
    specs = input_specs(signature)
    x = None if calibration is None else calibration[0]
    if isinstance(x, np.ndarray) and len(specs) == 1:
        x = {next(iter(specs)): x}
    if isinstance(x, Mapping) and set(specs) <= set(x):
        feed = {}
        for key, spec in specs.items():
            array = np.asarray(x[key])[:batch].astype(spec.dtype.as_numpy_dtype)
            if not spec.shape.is_compatible_with(array.shape):
                raise ConfigError(
                    f"calibration x for input {key!r} has shape {array.shape[1:]} per sample; "
                    f"the SavedModel expects {tuple(spec.shape)[1:]}"
                )
            feed[key] = array
        return feed, "calibration"
    rng = np.random.default_rng(seed)
    feed = {}
    declared = [(None,) if s.shape.rank is None else tuple(s.shape) for s in specs.values()]
    sized = dict(zip(specs, fill_open_axes(declared, nominal_shapes(signature)), strict=True))
    for key, spec in sorted(specs.items()):
        shape = [batch if i == 0 and d is None else (d or 1) for i, d in enumerate(sized[key])]
        if spec.dtype.is_floating:
            feed[key] = rng.random(shape).astype(spec.dtype.as_numpy_dtype)
        else:  # zeros are valid indices, ids and strings
            feed[key] = tf.zeros(shape, spec.dtype).numpy()
    return feed, "random"


def call_signature(signature: Any, feed: Feed) -> dict[str, np.ndarray]:
    """Output key -> numpy array of ``signature`` called on ``feed``."""
    outputs = signature(**{k: tf.constant(v) for k, v in feed.items()})
    return {k: np.asarray(v) for k, v in outputs.items()}


def save_signatures(
    calls: Mapping[str, Callable],
    signatures: Mapping[str, Any],
    path: str,
    track=(),
    keras_model: Any = None,
    endpoints: Mapping[str, Any] | None = None,
) -> None:
    """Save ``calls[name]`` under each source signature (same input specs, output keys).

    ``calls[name]`` maps a feed (input key -> tensor) to output key -> tensor;
    ``track`` holds the variables the calls read, saved with them. With a tf_keras
    ``keras_model`` (whose variables the calls read) the directory is written by
    ``keras_model.save`` with those signatures: it loads with
    ``tf_keras.models.load_model`` as a Keras-saved source did, and with
    ``tf.saved_model.load``. ``endpoints`` (:func:`source_endpoints`) are kept as
    callable attributes of the saved root, as the source had them.
    """
    functions = {
        name: _serving(calls[name]).get_concrete_function(**input_specs(sig))
        for name, sig in signatures.items()
    }
    if keras_model is not None:
        keras_model.save(path, include_optimizer=False, signatures=functions)
        return
    root = tf.Module()
    root.captured = list(track)  # the variables the signatures read, if any
    for name, endpoint in (endpoints or {}).items():
        setattr(root, name, _endpoint(calls[name], signatures[name], endpoint))
    tf.saved_model.save(root, path, signatures=functions)


def source_endpoints(loaded: Any, signatures: Mapping[str, Any]) -> dict[str, Any]:
    """The source's callable endpoints that are also signatures (Keras 3's
    ``model.export`` writes ``serve``): name -> the endpoint's concrete function.

    ``loaded.serve(x)`` takes positional tensors and returns the model's output
    structure, where the signature takes and returns dicts; the optimized
    SavedModel gets the same endpoints (:func:`save_signatures`).
    """
    found = {}
    for name in signatures:
        endpoint = getattr(loaded, name, None)
        concretes = list(getattr(endpoint, "concrete_functions", None) or [])
        if len(concretes) == 1:
            found[name] = concretes[0]
    return found


def _endpoint(call: Callable, signature: Any, source: Any) -> Any:
    """A ``tf.function`` with ``source``'s positional inputs and output structure
    that runs ``call`` (signature input key -> tensor, to output key -> tensor)."""
    args = source.structured_input_signature[0]
    specs = tf.nest.flatten(args)
    keys = list(input_specs(signature))
    names = [spec.name if spec.name in keys else key for spec, key in zip(specs, keys, strict=True)]
    structure = source.structured_outputs

    def endpoint(*inputs):
        outputs = call(dict(zip(names, tf.nest.flatten(inputs), strict=True)))
        if isinstance(structure, dict) and set(structure) == set(outputs):
            return {key: outputs[key] for key in structure}
        ordered = sorted(outputs, key=lambda k: (len(k), k))  # output_0 < output_1 < output_10
        return tf.nest.pack_sequence_as(structure, [outputs[k] for k in ordered])

    return tf.function(endpoint, input_signature=list(args))


def _serving(call: Callable) -> Any:
    def serve(**feed):
        return call(feed)

    return tf.function(serve)


def plain_specs(signature: Any) -> tuple[dict, dict]:
    """``({input: (dtype, shape)}, {output: (dtype, shape)})`` in JSON-friendly form."""
    as_plain = lambda d: {k: (v.dtype.name, v.shape.as_list()) for k, v in d.items()}  # noqa: E731
    return as_plain(input_specs(signature)), as_plain(signature.structured_outputs)


_LOW_PRECISION = {tf.float16.as_datatype_enum: "float16", tf.bfloat16.as_datatype_enum: "bfloat16"}
_COMPUTE_OPS = frozenset(
    {"Conv2D", "MatMul", "BatchMatMulV2", "DepthwiseConv2dNative", "Einsum", "Conv3D"}
)


def compute_dtype_of(signature: Any) -> str:
    """``"float16"``/``"bfloat16"`` when a convolution or matmul of the signature's
    graph (its function library included) computes in it, else ``"float32"``."""
    graph_def = signature.graph.as_graph_def()
    nodes = list(graph_def.node)
    for function in graph_def.library.function:
        nodes += list(function.node_def)
    for node in nodes:
        if node.op in _COMPUTE_OPS and node.attr["T"].type in _LOW_PRECISION:
            return _LOW_PRECISION[node.attr["T"].type]
    return "float32"


def _verify_one(name: str, expected: Mapping, output: Any, feed: Feed, tol: Any) -> dict:
    """Max abs/rel difference of one signature's outputs; raise outside ``tol``."""
    actual = call_signature(output, feed)
    worst_abs = worst_rel = 0.0
    for key, e in sorted(expected.items()):
        e, a = np.asarray(e), actual[key]
        if a.shape != e.shape or a.dtype != e.dtype:
            raise VerificationError(
                f"signature {name!r} output {key!r} is {a.dtype}{a.shape}, not {e.dtype}{e.shape}"
            )
        diff = np.abs(e.astype(np.float64) - a.astype(np.float64))
        worst_abs = max(worst_abs, float(diff.max(initial=0.0)))
        worst_rel = max(worst_rel, float((diff / (np.abs(e) + 1e-12)).max(initial=0.0)))
        atol = tol.atol_for(e)
        if not np.allclose(a, e, rtol=tol.rtol, atol=atol):
            raise VerificationError(
                f"signature {name!r} output {key!r} differs by up to {worst_abs:.3g} "
                f"(rtol={tol.rtol:g}, atol={atol:g}); nothing was written. Loosen the "
                "verify tolerances of the config or remove the pass that changes the outputs"
            )
    return {"max_abs_diff": worst_abs, "max_rel_diff": worst_rel}


def verify_signatures(run: Run, source: Mapping, output: Any, feeds: Mapping, tol: Any) -> dict:
    """Same signatures (names, keys, dtypes, shapes) and outputs within ``tol`` of the reference.

    Args:
        run: the optimization; its ``reference`` (None: the ``source`` signatures)
            gives the expected outputs.
        source: signature name -> source signature.
        output: the loaded optimized SavedModel.
        feeds: signature name -> ``(feed, origin)`` from :func:`make_feed`.
        tol: an object with ``rtol`` and ``atol`` (a ``VerifyConfig``): used as
            they are when the signature computes in float32; under mixed
            precision they can only loosen the compute dtype's row of
            :data:`tf_balancer.verify.TOLERANCES` (:func:`compute_dtype_of`).

    Returns:
        Signature name -> ``inputs`` (origin), ``batch``, ``max_abs_diff``,
        ``max_rel_diff``, ``compute_dtype``.

    Raises:
        VerificationError: a signature changed or its outputs differ beyond ``tol``.
    """
    results = {}
    for name, (feed, origin) in feeds.items():
        mine = output.signatures.get(name)
        if mine is None or plain_specs(mine) != plain_specs(source[name]):
            found = None if mine is None else plain_specs(mine)
            raise VerificationError(
                f"signature {name!r} changed: {found} instead of {plain_specs(source[name])}"
            )
        expected = run.reference(feed) if run.reference else call_signature(source[name], feed)
        dtype = compute_dtype_of(source[name])
        tolerance = tolerance_for(dtype, tol.rtol, tol.atol)
        numbers = {**_verify_one(name, expected, mine, feed, tolerance), "compute_dtype": dtype}
        results[name] = {"inputs": origin, "batch": len(next(iter(feed.values()))), **numbers}
    return results

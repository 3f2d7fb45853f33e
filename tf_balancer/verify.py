"""Verifiers: compare a model's outputs and signature with a reference's.

How close is close enough follows the reference's compute dtype
(:func:`~tf_balancer._compat.compute_dtype`: the least precise among its
layers, e.g. float16 under ``mixed_float16``); see :data:`TOLERANCES` and
:func:`tolerance_for`.

Example:
    >>> outcome = compare_outputs(model, new_model, x, rtol=1e-4, atol=1e-5)  # doctest: +SKIP
    >>> outcome.ok                                                              # doctest: +SKIP
    True
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np
import tensorflow as tf

from tf_balancer._compat import as_model_inputs, compute_dtype, is_keras_model, is_layer, sublayers
from tf_balancer.input_shapes import input_shapes

__all__ = [
    "Outcome",
    "Tolerance",
    "TOLERANCES",
    "tolerance_for",
    "reference_dtype",
    "run_model",
    "compare_outputs",
    "random_inputs",
]


@dataclasses.dataclass(frozen=True)
class Outcome:
    """Verification result: ``ok``, the worst differences, and why not ok."""

    ok: bool
    max_abs_diff: float = 0.0
    max_rel_diff: float = 0.0
    reason: str = ""


@dataclasses.dataclass(frozen=True)
class Tolerance:
    """How far a candidate's output may be from the reference output ``e``.

    Elementwise ``|candidate - e| <= max(atol, output_atol * max|e|) + rtol * |e|``,
    with ``max|e|`` taken per output (``np.allclose`` with that ``atol``).

    Attributes:
        rtol: relative tolerance, >= 0.
        atol: absolute tolerance, >= 0.
        output_atol: absolute tolerance as a fraction of the output's scale
            ``max|e|``, >= 0. Rounding in a low-precision layer is relative to
            that layer's activations, so an output element near 0 can differ by
            as much as a large one: a per-element ``rtol`` alone would not do.

    Raises:
        ValueError: a negative or non-finite field.
    """

    rtol: float
    atol: float
    output_atol: float = 0.0

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not (np.isfinite(value) and value >= 0):
                raise ValueError(
                    f"Tolerance.{field.name} must be a finite number >= 0, got {value}"
                )

    def atol_for(self, expected: np.ndarray) -> float:
        """The absolute tolerance for one output (the larger of ``atol`` and the scaled one)."""
        scale = float(np.max(np.abs(expected), initial=0.0))
        return max(self.atol, self.output_atol * scale)


TOLERANCES: dict[str, Tolerance] = {
    "float64": Tolerance(rtol=1e-4, atol=1e-5),
    "float32": Tolerance(rtol=1e-4, atol=1e-5),
    "float16": Tolerance(rtol=2.0**-9, atol=1e-5, output_atol=2.0**-8),
    "bfloat16": Tolerance(rtol=2.0**-6, atol=1e-5, output_atol=2.0**-5),
}
"""Output tolerance of function-preserving passes per compute dtype.

=========  ===============  =====  ======================
dtype      rtol             atol   output_atol (x max|e|)
=========  ===============  =====  ======================
float32    1e-4             1e-5   0
float64    1e-4             1e-5   0
float16    2**-9 ~ 1.95e-3  1e-5   2**-8 ~ 3.9e-3
bfloat16   2**-6 ~ 1.56e-2  1e-5   2**-5 ~ 3.1e-2
=========  ===============  =====  ======================

The low-precision rows are 4 (``rtol``) and 8 (``output_atol``) unit roundoffs
``u`` (float16: 11 significand bits, ``u = 2**-11 ~ 4.9e-4``, about 3 decimal
digits; bfloat16: 8 bits, ``u = 2**-8 ~ 3.9e-3``). Measured on the passes
(``prune_channels`` against the masked model, ``fold_batchnorm``,
``fuse_activation``, ``strip_training_ops``) of a trained digits CNN, a
residual/concat CNN and MobileNetV2 with random BatchNorm statistics, in
tf_keras and Keras 3: the worst ``max|diff| / max|e|`` was 1.1e-3 in float16
(``fold_batchnorm``; ``prune_channels`` 2.2e-4), 1.1e-2 in bfloat16, 6e-7 in
float32. A real error - one channel too many removed - moved the outputs by
0.17 to 0.48 of their scale: 40x the float16 and 5x the bfloat16 tolerance.
"""


def tolerance_for(dtype: str, rtol: float | None = None, atol: float | None = None) -> Tolerance:
    """The tolerance for a reference computing in ``dtype``, with explicit values applied.

    In float32 and float64 (and any dtype not in :data:`TOLERANCES`) explicit
    ``rtol``/``atol`` replace the table's. In float16 and bfloat16 they can only
    loosen it: each is the larger of the explicit value and the table's floor,
    since no pass can do better than the dtype's rounding.

    Example:
        >>> tolerance_for("float32", rtol=1e-6)
        Tolerance(rtol=1e-06, atol=1e-05, output_atol=0.0)
        >>> tolerance_for("float16", rtol=1e-6, atol=0.1).atol
        0.1

    Args:
        dtype: a compute dtype name (``"float32"``, ``"float16"``, ...).
        rtol, atol: explicit tolerances, or None for the table's.
    """
    base = TOLERANCES.get(str(dtype), TOLERANCES["float32"])
    if base.output_atol == 0.0:
        return Tolerance(base.rtol if rtol is None else rtol, base.atol if atol is None else atol)
    return Tolerance(max(base.rtol, rtol or 0.0), max(base.atol, atol or 0.0), base.output_atol)


def reference_dtype(model: Any, outputs: list[np.ndarray]) -> str:
    """The compute dtype a reference's results carry: the least precise of its layers' and
    its outputs' floating-point dtypes (``"float32"`` when none is lower)."""
    names = [compute_dtype(model)] if is_keras_model(model) else []
    names += [o.dtype.name for o in outputs if o.dtype.name in ("float16", "bfloat16")]
    for name in ("bfloat16", "float16"):
        if name in names:
            return name
    return names[0] if names else "float32"


def run_model(model: Any, inputs: Any) -> list[np.ndarray]:
    """Outputs as a flat list of arrays, for Keras models and concrete functions."""
    if is_keras_model(model):
        outputs = model(inputs, training=False)
    else:
        args = inputs if isinstance(inputs, (list, tuple)) else [inputs]
        outputs = model(*[tf.convert_to_tensor(a) for a in args])
    return [np.asarray(o) for o in tf.nest.flatten(outputs)]


def _id_bound(model: Any) -> int | None:
    """Integer inputs below this are valid ids for every ``Embedding`` (``input_dim``)
    and ``CategoryEncoding`` (``num_tokens``) of ``model``, nested layers included;
    None when it has neither."""
    bounds = []
    for layer in sublayers(model):
        if is_layer(layer, "Embedding"):
            bounds.append(int(layer.input_dim))
        elif is_layer(layer, "CategoryEncoding"):
            bounds.append(int(layer.num_tokens))
    return min(bounds, default=None)


def random_inputs(model: Any, batch_size: int = 2, seed: int = 0) -> Any:
    """Seeded uniform [0, 1) inputs matching a Keras model's input shapes (open
    axes at their nominal sizes, :func:`tf_balancer.input_shapes.input_shapes`);
    a string input (a model starting with ``TextVectorization``) gets short texts.

    An integer input of a model with an ``Embedding`` gets token ids drawn uniformly
    below the smallest vocabulary (:func:`_id_bound`), so a few are padding (0): all
    zeros would be sequences of padding only, fully masked behind
    ``Embedding(mask_zero=True)``, whose outputs (attention over no key, averages over
    no step) rounding alone moves past the tolerance. Other integer inputs are 0.
    """
    rng = np.random.default_rng(seed)
    arrays = []
    bound = _id_bound(model)
    for shape, t in zip(input_shapes(model), model.inputs, strict=True):
        dtype = tf.as_dtype(t.dtype)
        size = (batch_size, *shape[1:])
        if dtype == tf.string:
            words = rng.choice(["the", "model", "prunes", "channels"], size=(*size, 3))
            arrays.append(tf.constant(np.apply_along_axis(" ".join, -1, words)))
        elif dtype.is_integer and bound:
            arrays.append(rng.integers(0, bound, size).astype(dtype.as_numpy_dtype))
        else:
            arrays.append(rng.random(size, dtype=np.float32).astype(dtype.as_numpy_dtype))
    return as_model_inputs(model, arrays)


def compare_outputs(
    reference: Any,
    candidate: Any,
    inputs: Any,
    rtol: float | None = None,
    atol: float | None = None,
    *,
    run: Callable[[Any, Any], list[np.ndarray]] = run_model,
) -> Outcome:
    """Same output count, shapes and dtypes, and values within the tolerance.

    The tolerance is ``tolerance_for(dtype, rtol, atol)`` for the reference's
    compute dtype (:func:`reference_dtype`): ``rtol``/``atol`` default to the
    :data:`TOLERANCES` row (float32: 1e-4/1e-5) and, in float16 or bfloat16,
    cannot go below it. ``run(model, inputs)`` computes outputs (default
    :func:`run_model`; a caller may pass one that remembers them).
    """
    expected, actual = run(reference, inputs), run(candidate, inputs)
    if len(expected) != len(actual):
        return Outcome(False, reason=f"{len(actual)} outputs instead of {len(expected)}")
    dtype = reference_dtype(reference, expected)
    tolerance = tolerance_for(dtype, rtol, atol)
    worst_abs = worst_rel = 0.0
    for i, (e, a) in enumerate(zip(expected, actual, strict=True)):
        if e.shape != a.shape or e.dtype != a.dtype:
            return Outcome(
                False, reason=f"output {i}: {a.dtype}{a.shape} instead of {e.dtype}{e.shape}"
            )
        diff = np.abs(e.astype(np.float64) - a.astype(np.float64))
        worst_abs = max(worst_abs, float(diff.max(initial=0.0)))
        worst_rel = max(worst_rel, float((diff / (np.abs(e) + 1e-12)).max(initial=0.0)))
        allowed = tolerance.atol_for(e)
        if not np.allclose(a.astype(np.float64), e.astype(np.float64), tolerance.rtol, allowed):
            reason = (
                f"output {i} differs by up to {worst_abs:.3g} (allowed {allowed:.3g} + "
                f"{tolerance.rtol:.3g} x |expected| for {dtype} compute)"
            )
            return Outcome(False, worst_abs, worst_rel, reason)
    return Outcome(True, worst_abs, worst_rel)


def compare_signature(
    reference: Any,
    candidate: Any,
    inputs: Any,
    *,
    run: Callable[[Any, Any], list[np.ndarray]] = run_model,
) -> Outcome:
    """Same output count, shapes and dtypes (for passes that change values);
    ``run`` as in :func:`compare_outputs`."""
    expected, actual = run(reference, inputs), run(candidate, inputs)
    if [(e.shape, e.dtype) for e in expected] != [(a.shape, a.dtype) for a in actual]:
        return Outcome(False, reason="output shapes or dtypes changed")
    return Outcome(True)

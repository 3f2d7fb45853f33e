"""Verifiers: compare a model's outputs and signature with a reference's.

Example:
    >>> outcome = compare_outputs(model, new_model, x, rtol=1e-4, atol=1e-5)  # doctest: +SKIP
    >>> outcome.ok                                                              # doctest: +SKIP
    True
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import tensorflow as tf

from tf_balancer._compat import is_keras_model

__all__ = ["Outcome", "run_model", "compare_outputs", "random_inputs"]


@dataclasses.dataclass(frozen=True)
class Outcome:
    """Verification result: ``ok``, the worst differences, and why not ok."""

    ok: bool
    max_abs_diff: float = 0.0
    max_rel_diff: float = 0.0
    reason: str = ""


def run_model(model: Any, inputs: Any) -> list[np.ndarray]:
    """Outputs as a flat list of arrays, for Keras models and concrete functions."""
    if is_keras_model(model):
        outputs = model(inputs, training=False)
    else:
        args = inputs if isinstance(inputs, (list, tuple)) else [inputs]
        outputs = model(*[tf.convert_to_tensor(a) for a in args])
    return [np.asarray(o) for o in tf.nest.flatten(outputs)]


def random_inputs(model: Any, batch_size: int = 2, seed: int = 0) -> Any:
    """Seeded uniform [0, 1) inputs matching a Keras model's input shapes."""
    rng = np.random.default_rng(seed)
    arrays = [
        rng.random((batch_size, *t.shape[1:]), dtype=np.float32).astype(
            tf.as_dtype(t.dtype).as_numpy_dtype
        )
        for t in model.inputs
    ]
    return arrays if len(arrays) > 1 else arrays[0]


def compare_outputs(
    reference: Any, candidate: Any, inputs: Any, rtol: float = 1e-4, atol: float = 1e-5
) -> Outcome:
    """Same output count, shapes and dtypes, and values within ``rtol``/``atol``."""
    expected, actual = run_model(reference, inputs), run_model(candidate, inputs)
    if len(expected) != len(actual):
        return Outcome(False, reason=f"{len(actual)} outputs instead of {len(expected)}")
    worst_abs = worst_rel = 0.0
    for i, (e, a) in enumerate(zip(expected, actual, strict=True)):
        if e.shape != a.shape or e.dtype != a.dtype:
            return Outcome(
                False, reason=f"output {i}: {a.dtype}{a.shape} instead of {e.dtype}{e.shape}"
            )
        diff = np.abs(e.astype(np.float64) - a.astype(np.float64))
        worst_abs = max(worst_abs, float(diff.max(initial=0.0)))
        worst_rel = max(worst_rel, float((diff / (np.abs(e) + 1e-12)).max(initial=0.0)))
        if not np.allclose(a, e, rtol=rtol, atol=atol):
            return Outcome(
                False, worst_abs, worst_rel, f"output {i} differs by up to {worst_abs:.3g}"
            )
    return Outcome(True, worst_abs, worst_rel)


def compare_signature(reference: Any, candidate: Any, inputs: Any) -> Outcome:
    """Same output count, shapes and dtypes (for passes that change values)."""
    expected, actual = run_model(reference, inputs), run_model(candidate, inputs)
    if [(e.shape, e.dtype) for e in expected] != [(a.shape, a.dtype) for a in actual]:
        return Outcome(False, reason="output shapes or dtypes changed")
    return Outcome(True)

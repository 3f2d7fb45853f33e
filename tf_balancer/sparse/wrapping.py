"""tfmot weight pruning helpers: a schedule whose target is a variable, wrapping, allocation.

Magnitude pruning zeroes the smallest weights of each prunable kernel
(tfmot's ``prune_low_magnitude``). Unstructured sparsity gives **no CPU
speed-up**: the dense kernels keep their shapes and TensorFlow still multiplies
the zeros. What it buys is a smaller *compressed* file (gzip/zip of a SavedModel
or TFLite flatbuffer), because runs of zeros compress well; M-by-N sparsity
(``m_by_n=(2, 4)``) is the pattern sparse tensor cores and XNNPACK can exploit.

Prunable layers are those whose kernels tfmot's registry prunes: Conv1D/2D/3D,
Conv2DTranspose/Conv3DTranspose, Dense, SeparableConv1D/2D (pointwise kernel),
Embedding, and custom layers with ``get_prunable_weights``. tfmot does not prune
DepthwiseConv kernels, so neither do we.

Importing tfmot sets ``TF_USE_LEGACY_KERAS=1`` (and so resolves ``tf.keras`` to
tf_keras if nothing touched it before); this module restores the variable to
what it was, but the ``tf.keras`` resolution cannot be undone.

This is the public module of weight pruning: the schedule
(:mod:`tf_balancer.sparse.schedule`), the per-layer targets
(:mod:`tf_balancer.sparse.budget`) and :func:`prunable_kernels`
(``tf_balancer.sparse._tfmot``) are defined elsewhere and re-exported here.

Example:
    >>> from tf_balancer._compat import keras
    >>> model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4, name="fc")])
    >>> wrapped, targets = wrap_for_pruning(model, {"fc": 0.5}, end_step=10)
    >>> set_targets(targets, {"fc": 0.75})
    >>> float(targets["fc"].numpy())
    0.75
"""

from __future__ import annotations

import gzip
import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import tensorflow as tf

from tf_balancer._compat import ensure_keras2_model, keras
from tf_balancer.config.checks import check_sparsity
from tf_balancer.errors import ConfigError, UnsupportedModelError
from tf_balancer.sparse._tfmot import (
    PruneLowMagnitude,
    kernel_vars,
    leaf_layers,
    prunable_kernels,
    tfmot,
)
from tf_balancer.sparse.budget import (
    balanced_sparsity_targets,
    uniform_sparsity_targets,
)
from tf_balancer.sparse.schedule import VariablePolynomialDecay

__all__ = [
    "VariablePolynomialDecay",
    "wrap_for_pruning",
    "set_targets",
    "target_variables",
    "wrappers",
    "check_m_by_n",
    "strip",
    "update_masks",
    "prunable_kernels",
    "weight_sparsity",
    "overall_sparsity",
    "compressed_weight_bytes",
    "balanced_sparsity_targets",
    "uniform_sparsity_targets",
]

_log = logging.getLogger(__name__)


def _m_by_n_ok(layer: Any) -> bool:
    """tfmot's M-by-N masks handle rank-2 (Dense) and rank-4 (Conv2D) kernels only."""
    return all(len(v.shape) in (2, 4) for v in kernel_vars(layer))


def check_m_by_n(m_by_n: Any) -> tuple[int, int] | None:
    """``None``, or ``m_by_n`` as a tuple of two ints with ``1 <= m < n`` (a list is fine).

    Raises:
        ConfigError: for anything else.
    """
    if m_by_n is None:
        return None
    try:
        m, n = m_by_n
        if int(m) != m or int(n) != n or not 1 <= m < n:
            raise ValueError
    except (TypeError, ValueError):
        raise ConfigError(
            f"m_by_n must be (m, n), integers with 1 <= m < n, got {m_by_n!r}; e.g. (2, 4)"
        ) from None
    return int(m), int(n)


def _check_targets(model: Any, targets: Mapping[str, float]) -> dict[str, float]:
    layers = {layer.name: layer for layer in leaf_layers(model)}
    if any(isinstance(layer, PruneLowMagnitude) for layer in layers.values()):
        raise ConfigError("model already has pruning wrappers; call strip(model) first")
    prunable = sorted(name for name, layer in layers.items() if kernel_vars(layer))
    for name in targets:
        if name not in prunable:
            raise ConfigError(
                f"layer {name!r} is not a prunable layer of {model.name!r} (missing, or without "
                f"a kernel tfmot prunes); prunable layers: {', '.join(prunable) or 'none'}"
            )
    return {name: check_sparsity(f"target of {name!r}", v) for name, v in targets.items()}


def wrap_for_pruning(
    model: Any,
    targets: Mapping[str, float],
    *,
    begin_step: int = 0,
    end_step: int = 1000,
    frequency: int = 100,
    power: float = 3,
    m_by_n: tuple[int, int] | None = None,
    prune_after_end: bool = False,
) -> tuple[keras.Model, dict[str, tf.Variable]]:
    """A new model whose layers named in ``targets`` are wrapped in tfmot pruning wrappers.

    Each wrapped layer gets its own :class:`VariablePolynomialDecay` (initial
    sparsity 0) whose final sparsity is a variable; change it with
    :func:`set_targets` at any time, even mid-``fit``. Train with
    ``tfmot.sparsity.keras.UpdatePruningStep()`` in the callbacks. The input
    model is not modified (its weights are copied into fresh layers).

    With ``m_by_n=(m, n)`` tfmot zeroes the ``m`` smallest of every ``n``
    consecutive weights along the input-channel axis (axis -2 of a Dense or
    Conv2D kernel), once, at pruning step 1; the schedule and targets are then
    ignored, and the returned variables hold ``m / n``. Layers whose kernels are
    neither rank 2 nor rank 4 are left unwrapped (with a warning).

    Args:
        model: a functional or Sequential tf_keras model.
        targets: layer name -> final sparsity in [0, 1).
        begin_step, end_step, frequency, power, prune_after_end: the schedule
            (see :class:`VariablePolynomialDecay`); with the default
            ``prune_after_end=False`` targets set after ``end_step`` are ignored.
        m_by_n: optional ``(m, n)``, 1 <= m < n.

    Returns:
        ``(wrapped_model, variables)``, variables keyed by layer name.

    Raises:
        UnsupportedModelError: for a Keras 3 or subclassed model.
        ConfigError: for an unknown/unprunable layer name or an invalid value.
    """
    ensure_keras2_model(model)
    if not (isinstance(model, keras.Sequential) or getattr(model, "_is_graph_network", False)):
        raise UnsupportedModelError(
            f"{type(model).__name__} is a subclassed model; tfmot pruning needs a functional "
            "or Sequential model: rebuild it with `keras.Input` and the functional API"
        )
    wanted = _check_targets(model, targets)
    m_by_n = check_m_by_n(m_by_n)
    variables: dict[str, tf.Variable] = {}
    copies: list[tuple[Any, Any]] = []

    def clone(layer: Any) -> Any:
        if isinstance(layer, keras.Model):
            return keras.models.clone_model(layer, clone_function=clone)
        new = type(layer).from_config(layer.get_config())
        copies.append((layer, new))
        if layer.name not in wanted:
            return new
        if m_by_n is not None and not _m_by_n_ok(layer):
            _log.warning("layer %r: m_by_n needs a rank-2/4 kernel; left unpruned", layer.name)
            return new
        target = m_by_n[0] / m_by_n[1] if m_by_n else wanted[layer.name]
        variable = tf.Variable(target, trainable=False, dtype=tf.float32, name=f"{layer.name}_sp")
        variables[layer.name] = variable
        schedule = VariablePolynomialDecay(
            0.0, variable, begin_step, end_step, power, frequency, prune_after_end
        )
        return tfmot.sparsity.keras.prune_low_magnitude(
            new, pruning_schedule=schedule, sparsity_m_by_n=m_by_n
        )

    wrapped = keras.models.clone_model(model, clone_function=clone)
    for old, new in copies:
        new.set_weights(old.get_weights())
    return wrapped, variables


def set_targets(variables: Mapping[str, tf.Variable], targets: Mapping[str, float]) -> None:
    """Assign new final sparsities (layer name -> value in [0, 1)); all are checked first.

    No recompile is needed; the wrappers use the new values at their next mask
    update (see :class:`VariablePolynomialDecay`).

    Raises:
        ConfigError: for an unknown layer name or a value outside [0, 1).
    """
    checked = {}
    for name, value in targets.items():
        if name not in variables:
            known = ", ".join(sorted(variables)) or "none"
            raise ConfigError(f"no pruning target for layer {name!r}; wrapped layers: {known}")
        checked[name] = check_sparsity(f"target of {name!r}", value)
    for name, value in checked.items():
        variables[name].assign(value)


def wrappers(model: Any) -> list[Any]:
    """tfmot pruning wrappers of ``model`` whose schedule is a :class:`VariablePolynomialDecay`."""
    ensure_keras2_model(model)
    return [
        layer
        for layer in leaf_layers(model)
        if isinstance(layer, PruneLowMagnitude)
        and isinstance(layer.pruning_schedule, VariablePolynomialDecay)
    ]


def target_variables(model: Any) -> dict[str, tf.Variable]:
    """Layer name -> final-sparsity variable of each :class:`VariablePolynomialDecay` wrapper.

    Finds the variables :func:`wrap_for_pruning` returned, e.g. in a callback.
    """
    return {layer.layer.name: layer.pruning_schedule.final_sparsity for layer in wrappers(model)}


def strip(model: Any) -> keras.Model:
    """``tfmot.sparsity.keras.strip_pruning``: the model without wrappers (shares layers).

    Raises:
        UnsupportedModelError: for a Keras 3 model.
    """
    return tfmot.sparsity.keras.strip_pruning(ensure_keras2_model(model))


def update_masks(model: Any, step: int) -> None:
    """Run tfmot's pruning step once, outside ``fit``, on every wrapper of ``model``.

    Sets each wrapper's pruning step to ``step``, recomputes its masks if its
    schedule prunes at that step (M-by-N masks: only at step 1) and applies
    them (``weight = weight * mask``). With a schedule ending at ``step`` this
    prunes one-shot to the final sparsities.
    """
    ensure_keras2_model(model)
    for layer in leaf_layers(model):
        if isinstance(layer, PruneLowMagnitude):
            layer.pruning_step.assign(step)
            layer.pruning_obj.conditional_mask_update()
            layer.pruning_obj.weight_mask_op()


def weight_sparsity(model: Any) -> dict[str, float]:
    """Layer name -> fraction of exact zeros in its prunable kernels (masked, if wrapped)."""
    return {
        name: float(sum(np.count_nonzero(k == 0) for k in ks) / sum(k.size for k in ks))
        for name, ks in prunable_kernels(model).items()
    }


def overall_sparsity(model: Any) -> float:
    """Fraction of exact zeros over all prunable kernels together (0.0 when there are none)."""
    kernels = [k for ks in prunable_kernels(model).values() for k in ks]
    total = sum(k.size for k in kernels)
    return float(sum(np.count_nonzero(k == 0) for k in kernels) / total) if total else 0.0


def compressed_weight_bytes(model: Any, level: int = 6) -> int:
    """Size in bytes of all the model's weights, concatenated and gzip-compressed."""
    ensure_keras2_model(model)
    data = b"".join(np.ascontiguousarray(w).tobytes() for w in model.get_weights())
    return len(gzip.compress(data, compresslevel=level))

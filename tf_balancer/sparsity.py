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
import os
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import tensorflow as tf

from tf_balancer._compat import ensure_keras2_model, keras
from tf_balancer.errors import BalanceError, ConfigError, UnsupportedModelError


def _import_tfmot() -> Any:
    saved = os.environ.get("TF_USE_LEGACY_KERAS")
    import tensorflow_model_optimization as tfmot  # sets TF_USE_LEGACY_KERAS=1

    if saved is None:
        os.environ.pop("TF_USE_LEGACY_KERAS", None)
    else:
        os.environ["TF_USE_LEGACY_KERAS"] = saved
    from tensorflow_model_optimization.python.core.keras.compat import keras as tfmot_keras
    from tensorflow_model_optimization.python.core.sparsity.keras import pruning_wrapper

    if tfmot_keras.Model is not keras.Model:
        raise UnsupportedModelError(
            "tensorflow_model_optimization did not pick up tf_keras (it uses "
            f"{tfmot_keras.__name__}); install tf_keras matching your TensorFlow version "
            "(`pip install tf_keras`) so tfmot works on Keras 2 models."
        )
    return tfmot, pruning_wrapper.PruneLowMagnitude


tfmot, _Wrapper = _import_tfmot()

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
_L = keras.layers
# Layer class (exact type, as tfmot's registry matches) -> its prunable kernel attribute.
_KERNELS: dict[type, str] = {
    **{
        cls: "kernel"
        for cls in (_L.Conv1D, _L.Conv2D, _L.Conv3D, _L.Conv2DTranspose, _L.Conv3DTranspose)
    },
    _L.Dense: "kernel",
    _L.SeparableConv1D: "pointwise_kernel",
    _L.SeparableConv2D: "pointwise_kernel",
    _L.Embedding: "embeddings",
}


def _check_sparsity(name: str, value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if not 0.0 <= number < 1.0:
        raise ConfigError(f"{name} must be a number in [0, 1), got {value!r}; e.g. 0.8")
    return number


@keras.utils.register_keras_serializable(package="tf_balancer")
class VariablePolynomialDecay(tfmot.sparsity.keras.PruningSchedule):
    """tfmot's ``PolynomialDecay`` whose final sparsity is a ``tf.Variable``.

    ``sparsity(step) = final + (initial - final) * (1 - p) ** power`` with
    ``p = clip((step - begin_step) / (end_step - begin_step), 0, 1)`` (``p = 1``
    from ``begin_step`` on when ``begin_step == end_step``); masks are updated
    every ``frequency`` steps in ``[begin_step, end_step]`` (tfmot's rule), or
    from ``begin_step`` on with ``prune_after_end=True``. ``__call__`` reads
    :attr:`final_sparsity` inside the graph, so assigning the variable changes
    the target of an already compiled ``train_function``: no recompile. The new
    target takes effect at the next mask update: after ``end_step`` only with
    ``prune_after_end=True``.

    Args:
        initial_sparsity: sparsity at ``begin_step``, in [0, 1). Defaults to 0.
        final_sparsity: a float in [0, 1) (a new variable is made) or a scalar
            float32 ``tf.Variable`` to share.
        begin_step: first pruning step, >= 0. Defaults to 0.
        end_step: step at which ``final_sparsity`` is reached. Defaults to 1000.
        power: exponent of the decay. Defaults to 3.
        frequency: steps between mask updates, > 0. Defaults to 100.
        prune_after_end: keep updating masks (at the final sparsity) after
            ``end_step``, so later target changes apply. Defaults to False.

    Raises:
        ConfigError: for an invalid sparsity or step range.

    Example:
        >>> schedule = VariablePolynomialDecay(0.0, 0.5, begin_step=0, end_step=10)
        >>> float(schedule(tf.constant(10, tf.int64))[1])
        0.5
    """

    def __init__(
        self,
        initial_sparsity: float = 0.0,
        final_sparsity: float | tf.Variable = 0.5,
        begin_step: int = 0,
        end_step: int = 1000,
        power: float = 3,
        frequency: int = 100,
        prune_after_end: bool = False,
    ) -> None:
        if not 0 <= int(begin_step) <= int(end_step) or int(frequency) <= 0:
            raise ConfigError(
                f"need 0 <= begin_step <= end_step and frequency > 0, got begin_step="
                f"{begin_step}, end_step={end_step}, frequency={frequency}"
            )
        self.initial_sparsity = _check_sparsity("initial_sparsity", initial_sparsity)
        if not isinstance(final_sparsity, tf.Variable):
            value = _check_sparsity("final_sparsity", final_sparsity)
            final_sparsity = tf.Variable(value, trainable=False, dtype=tf.float32)
        self.final_sparsity = final_sparsity
        self.begin_step, self.end_step = int(begin_step), int(end_step)
        self.power, self.frequency = power, int(frequency)
        self.prune_after_end = bool(prune_after_end)

    def __call__(self, step: Any) -> tuple[tf.Tensor, tf.Tensor]:
        with tf.name_scope("variable_polynomial_decay_pruning_schedule"):
            offset = tf.cast(step - self.begin_step, tf.float32)
            span = self.end_step - self.begin_step
            if span == 0:
                p = tf.cast(offset >= 0.0, tf.float32)
            else:
                p = tf.clip_by_value(offset / float(span), 0.0, 1.0)
            final = tf.cast(self.final_sparsity, tf.float32)  # read at run time
            decay = tf.pow(1.0 - p, float(self.power))
            sparsity = final + (self.initial_sparsity - final) * decay
        should_prune = self._should_prune_in_step(
            step, self.begin_step, -1 if self.prune_after_end else self.end_step, self.frequency
        )
        return should_prune, sparsity

    def get_config(self) -> dict[str, Any]:
        """tfmot's schedule config; ``final_sparsity`` is the variable's current value."""
        return {
            "class_name": keras.utils.get_registered_name(type(self)),
            "config": {
                "initial_sparsity": self.initial_sparsity,
                "final_sparsity": float(self.final_sparsity.numpy()),
                "begin_step": self.begin_step,
                "end_step": self.end_step,
                "power": self.power,
                "frequency": self.frequency,
                "prune_after_end": self.prune_after_end,
            },
        }


def _leaves(model: Any) -> Iterator[Any]:
    """Layers of ``model``, descending into nested models (wrappers are leaves)."""
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            yield from _leaves(layer)
        else:
            yield layer


def _kernel_vars(layer: Any) -> list[Any]:
    if type(layer) in _KERNELS:
        return [getattr(layer, _KERNELS[type(layer)])]
    if hasattr(layer, "get_prunable_weights"):
        return list(layer.get_prunable_weights())
    return []


def prunable_kernels(model: Any) -> dict[str, list[np.ndarray]]:
    """Layer name -> its prunable kernels as numpy arrays, as the forward pass sees them.

    For a layer inside a pruning wrapper the kernel is ``weight * mask`` and the
    key is the wrapped layer's own name (the name :func:`strip` restores).

    Raises:
        UnsupportedModelError: for a Keras 3 model.
    """
    ensure_keras2_model(model)
    kernels = {}
    for layer in _leaves(model):
        if isinstance(layer, _Wrapper):
            kernels[layer.layer.name] = [(w * m).numpy() for w, m, _ in layer.pruning_vars]
        elif _kernel_vars(layer):
            kernels[layer.name] = [np.asarray(v.numpy()) for v in _kernel_vars(layer)]
    return kernels


def _m_by_n_ok(layer: Any) -> bool:
    """tfmot's M-by-N masks handle rank-2 (Dense) and rank-4 (Conv2D) kernels only."""
    return all(len(v.shape) in (2, 4) for v in _kernel_vars(layer))


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
    layers = {layer.name: layer for layer in _leaves(model)}
    if any(isinstance(layer, _Wrapper) for layer in layers.values()):
        raise ConfigError("model already has pruning wrappers; call strip(model) first")
    prunable = sorted(name for name, layer in layers.items() if _kernel_vars(layer))
    for name in targets:
        if name not in prunable:
            raise ConfigError(
                f"layer {name!r} is not a prunable layer of {model.name!r} (missing, or without "
                f"a kernel tfmot prunes); prunable layers: {', '.join(prunable) or 'none'}"
            )
    return {name: _check_sparsity(f"target of {name!r}", v) for name, v in targets.items()}


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
        checked[name] = _check_sparsity(f"target of {name!r}", value)
    for name, value in checked.items():
        variables[name].assign(value)


def wrappers(model: Any) -> list[Any]:
    """tfmot pruning wrappers of ``model`` whose schedule is a :class:`VariablePolynomialDecay`."""
    ensure_keras2_model(model)
    return [
        layer
        for layer in _leaves(model)
        if isinstance(layer, _Wrapper)
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
    for layer in _leaves(model):
        if isinstance(layer, _Wrapper):
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


def uniform_sparsity_targets(model: Any, target_sparsity: float) -> dict[str, float]:
    """The same sparsity for every prunable layer.

    Raises:
        UnsupportedModelError: for a Keras 3 model.
        ConfigError: for a target outside [0, 1).
    """
    target = _check_sparsity("target_sparsity", target_sparsity)
    return {name: target for name in prunable_kernels(model)}


def balanced_sparsity_targets(
    model: Any,
    target_sparsity: float,
    scores: Mapping[str, float] | None = None,
    *,
    max_sparsity: float = 0.95,
) -> dict[str, float]:
    """Per-layer sparsities with parameter-weighted mean ``target_sparsity``.

    Layer ``l`` has ``n_l`` prunable weights and importance ``I_l`` (``scores``,
    default ``sum |w|`` of its kernels); its importance density is
    ``d_l = I_l / n_l`` (mean ``|w|`` by default), normalised by the largest.
    Keeping the fraction ``k_l = 1 - s_l`` of layer ``l`` is valued
    ``n_l d_l log k_l`` (diminishing returns); maximising the sum subject to the
    budget ``sum_l n_l s_l = T sum_l n_l`` and ``0 <= s_l <= max_sparsity`` gives,
    by the KKT conditions, ``s_l = clip(1 - lambda d_l, 0, max_sparsity)``.
    The mean is non-increasing in ``lambda``, which is found by bisection. So
    layers with low importance per weight (large layers with small weights)
    are pruned most.

    Args:
        model: a tf_keras model (wrapped or not).
        target_sparsity: parameter-weighted mean sparsity, in [0, max_sparsity].
        scores: layer name -> importance >= 0 for every prunable layer (extra
            names are ignored). Defaults to ``sum |w|``.
        max_sparsity: upper bound of every layer's sparsity, in [0, 1).

    Returns:
        Layer name -> sparsity, for every prunable layer.

    Raises:
        ConfigError: for values out of range or scores missing a layer.
        BalanceError: when zero-importance layers alone exceed the budget.

    Example:
        >>> from tf_balancer._compat import keras
        >>> dense = keras.layers.Dense
        >>> m = keras.Sequential([keras.Input((64,)), dense(64, name="a"), dense(2, name="b")])
        >>> targets = balanced_sparsity_targets(m, 0.5)
        >>> targets["a"] > targets["b"]
        True
    """
    target = _check_sparsity("target_sparsity", target_sparsity)
    cap = _check_sparsity("max_sparsity", max_sparsity)
    if target > cap:
        raise ConfigError(
            f"target_sparsity {target} exceeds max_sparsity {cap}; raise max_sparsity"
        )
    kernels = prunable_kernels(model)
    if not kernels:
        return {}
    names = list(kernels)
    sizes = np.array([sum(k.size for k in kernels[name]) for name in names], dtype=np.float64)
    importance = _importance(kernels, scores)
    density = importance / sizes
    density = density / density.max() if density.max() > 0 else density
    lam = _solve_lambda(density, sizes, target, cap)
    sparsity = np.clip(1.0 - lam * density, 0.0, cap)
    return {name: float(s) for name, s in zip(names, sparsity, strict=True)}


def _importance(
    kernels: Mapping[str, list[np.ndarray]], scores: Mapping[str, float] | None
) -> np.ndarray:
    if scores is None:
        return np.array([sum(np.abs(k).sum() for k in ks) for ks in kernels.values()], "float64")
    missing = sorted(set(kernels) - set(scores))
    if missing:
        raise ConfigError(f"scores lack prunable layers {missing}; give a score for each")
    values = np.array([float(scores[name]) for name in kernels], dtype=np.float64)
    if not np.all(np.isfinite(values) & (values >= 0)):
        raise ConfigError(f"scores must be finite numbers >= 0, got {dict(scores)}")
    return values


def _solve_lambda(density: np.ndarray, sizes: np.ndarray, target: float, cap: float) -> float:
    def mean_sparsity(lam: float) -> float:
        return float(np.dot(sizes, np.clip(1.0 - lam * density, 0.0, cap)) / sizes.sum())

    positive = density[density > 0]
    hi = 1.0 / positive.min() if positive.size else 0.0
    if mean_sparsity(hi) > target + 1e-12:
        raise BalanceError(
            f"layers with zero importance stay at max_sparsity {cap} and alone exceed "
            f"target_sparsity {target}; give them a positive score or lower max_sparsity"
        )
    lo = 0.0
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if mean_sparsity(mid) > target else (lo, mid)
    return 0.5 * (lo + hi)

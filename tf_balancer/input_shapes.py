"""The sizes at which a model with open input axes is costed.

A Keras model may leave input axes other than the batch open:
``keras.Input((None,))`` takes token sequences of any length,
``keras.Input((None, None, 3))`` images of any size. Its FLOPs depend on those
sizes, so analysis counts them at *nominal* sizes, one per open axis: given by
the user (``input_shape=`` of ``BalanceCallback``, ``prune``, ``analyze`` and
``inspect``), or read from the data (the training batches' fixed shape, the
arrays given to ``prune``). The model keeps its open axes: the compacted copy,
the exported SavedModel and the serving function take any size, as the
original does.

Nominal sizes are remembered per model (or traced function) object, weakly,
and every model a pass rebuilds from a walked model inherits them
(:func:`tf_balancer.graph.walk.rebuild`), so each re-analysis counts at the
same sizes.

Example:
    >>> from tf_balancer._compat import keras
    >>> inp = keras.Input((None, 8))
    >>> model = keras.Model(inp, keras.layers.Dense(2)(inp))
    >>> set_nominal_shapes(model, (40, 8))
    >>> input_shapes(model)
    [(None, 40, 8)]
"""

from __future__ import annotations

import operator
import weakref
from collections.abc import Sequence
from typing import Any

from tf_balancer.errors import ConfigError, UnsupportedModelError

__all__ = [
    "has_open_axes",
    "set_nominal_shapes",
    "nominal_shapes",
    "declared_shapes",
    "input_shapes",
    "open_axes_message",
    "fill_open_axes",
    "shapes_from_arrays",
    "adopt_data_shapes",
]

Shape = tuple[int | None, ...]

_NOMINAL: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_FIX = (
    "pass input_shape=... (the size of each input without the batch axis, e.g. (128,) for "
    "token sequences padded to 128, or a list of shapes for several inputs) to "
    "BalanceCallback, tf_balancer.prune, analyze or inspect (CLI: --input_shape 128): "
    "costs are counted at that size, and the pruned model still takes any size"
)


def has_open_axes(shapes: Sequence[Sequence[int | None]]) -> bool:
    """True when an axis after the batch axis of any shape is None."""
    return any(d is None for shape in shapes for d in tuple(shape)[1:])


def declared_shapes(model: Any) -> list[Shape]:
    """The shapes of a Keras model's inputs as declared (batch axis first); none for a
    subclassed model, which declares no inputs."""
    return [tuple(t.shape) for t in getattr(model, "inputs", None) or ()]


def set_nominal_shapes(obj: Any, shapes: Any, declared: Sequence[Shape] | None = None) -> None:
    """Remember the sizes at which ``obj``'s open input axes are costed.

    Args:
        obj: a Keras model, or a traced function (weakly referenced).
        shapes: one shape without the batch axis (a single input), or a list of
            them in the order of the inputs. Each must have its input's rank and
            agree with every axis the input fixes.
        declared: the inputs' shapes (batch axis first); defaults to a Keras
            model's ``inputs``' (nothing is checked for other objects).

    Raises:
        ConfigError: a shape that does not fit the inputs.
    """
    nominal = _as_shape_list(shapes)
    if declared is None and hasattr(obj, "layers") and getattr(obj, "inputs", None):
        declared = declared_shapes(obj)
    if declared is not None:
        _check_fits(nominal, [tuple(s) for s in declared])
    _NOMINAL[obj] = nominal


def nominal_shapes(obj: Any) -> list[Shape] | None:
    """The shapes given to :func:`set_nominal_shapes` (no batch axis), or None."""
    try:
        return _NOMINAL.get(obj)
    except TypeError:  # not weakly referenceable: never registered
        return None


def fill_open_axes(declared: Sequence[Shape], nominal: Sequence[Shape] | None) -> list[Shape]:
    """``declared`` shapes (batch axis first, kept) with open axes from ``nominal``."""
    if nominal is None:
        return [tuple(s) for s in declared]
    return [
        (shape[0], *(n if d is None else d for d, n in zip(shape[1:], size, strict=True)))
        for shape, size in zip(declared, nominal, strict=True)
    ]


def input_shapes(model: Any) -> list[Shape]:
    """Each input's shape (batch axis None), open axes at their nominal sizes.

    Raises:
        UnsupportedModelError: an axis is open and no nominal size is known.
    """
    declared = [(None, *s[1:]) for s in declared_shapes(model)]
    shapes = fill_open_axes(declared, nominal_shapes(model))
    if has_open_axes(shapes):
        raise UnsupportedModelError(open_axes_message(f"model {model.name!r}", declared))
    return shapes


def open_axes_message(owner: str, declared: Sequence[Shape]) -> str:
    """The error for ``owner`` (e.g. ``"model 'm'"``), whose inputs have open axes
    and no nominal sizes."""
    text = ", ".join(str(tuple(s)) for s in declared)
    return f"{owner} has input axes of unknown size {text}; {_FIX}"


def shapes_from_arrays(declared: Sequence[Shape], arrays: Sequence[Any]) -> list[Shape] | None:
    """Nominal shapes read from data: one array or tensor spec (anything with
    ``.shape``) per input of shape ``declared``, or None when they do not line up
    or an axis is open there too."""
    if len(arrays) != len(declared):
        return None
    nominal = [tuple(a.shape)[1:] for a in arrays]
    if any(len(n) != len(d) - 1 or None in n for n, d in zip(nominal, declared, strict=True)):
        return None
    return [tuple(int(x) for x in n) for n in nominal]


def adopt_data_shapes(model: Any, arrays: Sequence[Any], replace: bool = False) -> None:
    """Give a Keras model whose input axes are open, and that has no nominal sizes
    yet (or any, with ``replace``), the sizes of ``arrays`` (one array or tensor spec
    per input, in order) where every one is fixed there."""
    declared = declared_shapes(model)
    if (nominal_shapes(model) is not None and not replace) or not has_open_axes(declared):
        return
    shapes = shapes_from_arrays(declared, arrays)
    if shapes is not None:
        set_nominal_shapes(model, shapes)


def _as_shape_list(shapes: Any) -> list[Shape]:
    if not isinstance(shapes, (list, tuple)) or not shapes:
        raise ConfigError(
            f"input_shape must be a shape such as (128,) or a list of them, got {shapes!r}"
        )
    several = all(isinstance(s, (list, tuple)) for s in shapes)
    listed = list(shapes) if several else [shapes]
    for shape in listed:
        if not all(_is_size(d) for d in shape):
            raise ConfigError(
                f"input_shape {tuple(shape)}: every size must be a positive int (no batch "
                "axis, no None)"
            )
    return [tuple(operator.index(d) for d in s) for s in listed]


def _is_size(value: Any) -> bool:
    """A positive integer: a Python or NumPy int (``np.int64(128)``), not a bool."""
    if isinstance(value, bool):
        return False
    try:
        return operator.index(value) > 0
    except TypeError:
        return False


def _check_fits(nominal: list[Shape], declared: list[Shape]) -> None:
    if len(nominal) != len(declared):
        raise ConfigError(
            f"input_shape gives {len(nominal)} shape(s) but the model has {len(declared)} "
            "input(s); give one shape per input, in the order of model.inputs"
        )
    for size, shape in zip(nominal, declared, strict=True):
        fits = len(size) == len(shape) - 1 and all(
            d is None or d == n for d, n in zip(shape[1:], size, strict=True)
        )
        if not fits:
            raise ConfigError(
                f"input_shape {size} does not fit the input of shape {shape}: give the size "
                "of every axis after the batch axis, equal to the input's where it is fixed"
            )

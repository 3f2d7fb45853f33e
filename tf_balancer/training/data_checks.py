"""Up-front checks of the data given to ``BalanceCallback`` against the model.

``probe_data``, ``validation_data`` and ``finetune_data`` are first used at a
rebalance, at an epoch end or after training; a wrong shape found there costs
the training time already spent and surfaces as a raw Keras or NumPy error.
:func:`check_callback_data` runs at ``on_train_begin`` instead and raises one
:class:`~tf_balancer.errors.ConfigError` that names the argument, what the model
expects, what was given and what to do.

What is checked (a model dimension of None matches anything):

* ``x``: one array per model input, as a single array (one input), a list or
  tuple in the order of ``model.inputs``, or a dict keyed by input name; each
  array's shape after the batch dimension is the input's (a missing or extra
  trailing dimension of size 1 is accepted, as Keras accepts it); every array
  has the same number of samples, and at least one.
* ``y``: as many samples as ``x``. For a single-output model of shape
  ``(None, *out)``, ``y`` has shape ``(n, *out)``, or, for a 1-wide output or
  a classifier, ``(n, *out[:-1])`` / ``(n, *out[:-1], 1)`` (targets or class
  ids). The label shape is not checked when ``ProbeData.loss`` is custom.

Example:
    >>> check_callback_data(model, validation_data=(x_val, y_val[:10]))  # doctest: +SKIP
    Traceback (most recent call last):
    ConfigError: validation_data: y has 10 samples but x has 64; ...
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from tf_balancer.errors import ConfigError
from tf_balancer.metrics import class_label_form
from tf_balancer.report import is_classifier

__all__ = [
    "check_callback_data",
    "check_xy",
    "check_inputs",
    "check_labels",
    "input_arrays",
    "pair",
    "as_pair",
]

Shape = tuple[int | None, ...]


def _fmt(shape: Sequence[object]) -> str:
    """``(None, 16, 16, 1)``-style text of a shape."""
    return "(" + ", ".join(str(d) for d in shape) + ("," if len(shape) == 1 else "") + ")"


def _shape(array: Any) -> Shape:
    return tuple(array.shape) if hasattr(array, "shape") else np.shape(array)


def _matches(given: Shape, expected: Shape) -> bool:
    return len(given) == len(expected) and all(
        e is None or g == e for g, e in zip(given, expected, strict=True)
    )


def _input_fits(given: Shape, expected: Shape) -> bool:
    """Per-sample shapes equal, up to a trailing dimension of 1 (Keras adds or drops it)."""
    return (
        _matches(given, expected)
        or (expected[-1:] in ((1,), (None,)) and _matches(given, expected[:-1]))
        or (given[-1:] == (1,) and _matches(given[:-1], expected))
    )


def _names(model: Any, kind: str) -> list[str]:
    tensors = getattr(model, f"{kind}s", None) or []
    names = getattr(model, f"{kind}_names", None)
    return list(names) if names else [t.name.split("/")[0].split(":")[0] for t in tensors]


def input_arrays(model: Any, name: str, x: Any) -> list[Any]:
    """``x`` as one array per model input, in the order of ``model.inputs``.

    Raises:
        ConfigError: ``x``'s structure does not fit the model's inputs.
    """
    names = _names(model, "input")
    if isinstance(x, Mapping):
        if set(x) != set(names):
            raise ConfigError(
                f"{name}: x is a dict with keys {sorted(x)} but the model's inputs are "
                f"{names}; key x by exactly those input names"
            )
        return [x[n] for n in names]
    if len(names) == 1:
        return list(x) if isinstance(x, (list, tuple)) and len(x) == 1 else [x]
    if not isinstance(x, (list, tuple)) or len(x) != len(names):
        given = f"a {type(x).__name__} of {len(x)}" if isinstance(x, (list, tuple)) else "1 array"
        raise ConfigError(
            f"{name}: the model has {len(names)} inputs {names} but x is {given}; pass a "
            f"list of {len(names)} arrays in that order, or a dict keyed by input name"
        )
    return list(x)


def check_inputs(model: Any, name: str, x: Any) -> int:
    """Check ``x`` against ``model.inputs``; return its number of samples.

    Example:
        >>> check_inputs(model, "probe_data", np.zeros((8, 16, 16, 1)))  # doctest: +SKIP
        8

    Raises:
        ConfigError: wrong structure, per-sample shape or sample count, or no sample.
    """
    counts = []
    for tensor, input_name, array in zip(
        model.inputs, _names(model, "input"), input_arrays(model, name, x), strict=True
    ):
        shape, expected = _shape(array), tuple(tensor.shape)
        if not shape or not _input_fits(tuple(shape[1:]), expected[1:]):
            raise ConfigError(
                f"{name}: x for input {input_name!r} has shape {_fmt(shape)} but the model "
                f"expects {_fmt(expected)}; pass arrays of shape {_fmt(('n', *expected[1:]))} "
                "(resize or reshape the data the way the training data was)"
            )
        counts.append(int(shape[0]))
    if len(set(counts)) > 1:
        raise ConfigError(
            f"{name}: the inputs {_names(model, 'input')} have {counts} samples; give every "
            "input the same samples"
        )
    if not counts or counts[0] == 0:
        raise ConfigError(f"{name}: x is empty (0 samples); give at least one batch of samples")
    return counts[0]


def _label_forms(out: Shape, classifier: bool) -> list[Shape]:
    """Per-sample label shapes that fit one output of per-sample shape ``out``."""
    forms = [out]
    if out and (classifier or out[-1] in (1, None)):
        forms += [out[:-1], (*out[:-1], 1)]
    return forms


def check_labels(
    model: Any, name: str, y: Any, n: int, shapes: bool = True, classes: bool = False
) -> None:
    """Check ``y``: ``n`` samples per array and, for one output, a fitting shape.

    Example:
        >>> check_labels(model, "validation_data", np.zeros(64), n=64)  # doctest: +SKIP

    Raises:
        ConfigError: a sample count differs from ``n`` or the shape cannot be the
            single output's labels.
    """
    for leaf in tf.nest.flatten(y):
        shape = _shape(leaf)
        if not shape or shape[0] != n:
            given = f"shape {_fmt(shape)}" if not shape else f"{shape[0]} samples"
            raise ConfigError(
                f"{name}: y has {given} but x has {n} samples; give one label per sample "
                "of x (take x and y from the same rows)"
            )
    outputs = getattr(model, "outputs", None) or []
    if not shapes or len(outputs) != 1 or len(tf.nest.flatten(y)) != 1:
        return
    if classes:  # the labels go to the compiled loss (taylor importance, fine-tuning)
        _check_classes(model, name, tf.nest.flatten(y)[0])
    given, out = tuple(_shape(tf.nest.flatten(y)[0])), tuple(outputs[0].shape)
    forms = _label_forms(out[1:], is_classifier(model))
    if not any(_matches(given[1:], form) for form in forms):
        wanted = " or ".join(_fmt(("n", *form)) for form in forms)
        raise ConfigError(
            f"{name}: y has shape {_fmt(given)} but the model's output "
            f"{_names(model, 'output')[0]!r} has shape {_fmt(out)}; give labels of shape "
            f"{wanted} (class ids or one-hot for a classifier, one target per output value)"
        )


def _check_classes(model: Any, name: str, y: Any) -> None:
    """Labels in the form the compiled categorical cross-entropy takes: class ids in
    ``[0, classes)`` for the sparse one, one-hot rows for the other."""
    form = class_label_form(model)
    if form is None:
        return
    kind, classes = form
    shape, rank = tuple(_shape(y)), len(model.outputs[0].shape)
    one_hot = len(shape) == rank and shape[-1] == classes  # (n, ..., C) like the output
    if kind == "one_hot" and not one_hot:
        raise ConfigError(
            f"{name}: y has shape {_fmt(shape)} but the loss (categorical cross-entropy) takes "
            f"one-hot labels of shape {_fmt(('n', classes))}; pass "
            f"keras.utils.to_categorical(y, {classes}), or compile with "
            "sparse_categorical_crossentropy"
        )
    if kind != "sparse":
        return
    if one_hot:
        raise ConfigError(
            f"{name}: y has shape {_fmt(shape)} (one-hot?) but the loss (sparse categorical "
            f"cross-entropy) takes class ids of shape {_fmt(('n',))}; pass np.argmax(y, -1), "
            "or compile with categorical_crossentropy"
        )
    values = np.asarray(y)
    if values.size and (values.min() < 0 or values.max() >= classes):
        raise ConfigError(
            f"{name}: y holds class ids from {values.min()} to {values.max()} but the model "
            f"has {classes} classes (ids 0 to {classes - 1}); check the labels' encoding"
        )


def check_xy(
    model: Any,
    name: str,
    x: Any,
    y: Any = None,
    label_shapes: bool = True,
    classes: bool = False,
) -> None:
    """Check one ``(x, y)`` argument (``y`` may be None) against ``model``.

    Example:
        >>> check_xy(model, "validation_data", x_val, y_val)  # doctest: +SKIP

    Raises:
        ConfigError: naming ``name``, the expected and the given structure or shape.
    """
    n = check_inputs(model, name, x)
    if y is not None:
        check_labels(model, name, y, n, shapes=label_shapes, classes=classes)


def pair(data: Any, name: str) -> tuple[Any, Any]:
    """``(x, y)`` of a data argument given as ``(x, y)`` or ``(x, y, sample_weight)``."""
    if isinstance(data, (list, tuple)) and len(data) in (2, 3):
        return data[0], data[1]  # a third item (sample weights) is passed through
    raise ConfigError(
        f"{name} must be a tuple (x, y), got {type(data).__name__}"
        + (f" of length {len(data)}" if isinstance(data, (list, tuple)) else "")
        + "; pass the inputs and labels as (x, y)"
    )


def as_pair(data: Any, name: str) -> tuple[Any, Any]:
    """``(x, y)`` of ``data`` given as :func:`pair` takes it, or as a finite
    ``tf.data.Dataset`` of ``(x, y)`` or ``(x, y, sample_weight)`` batches (what
    ``fit`` takes), read into memory once and concatenated.

    Raises:
        ConfigError: an infinite dataset (``repeat()``; the fix: ``.take(n)``), an
            empty one, or one whose elements are not ``(x, y)`` batches.

    Example:
        >>> x, y = as_pair(tf.data.Dataset.from_tensor_slices((xs, ys)).batch(32), "data")  # doctest: +SKIP
    """
    if not isinstance(data, tf.data.Dataset):
        return pair(data, name)
    if int(data.cardinality()) == int(tf.data.INFINITE_CARDINALITY):
        raise ConfigError(
            f"{name} is an infinite tf.data.Dataset (repeat()): it is read into memory once; "
            f"give a finite one, e.g. {name}.take(n) batches"
        )
    batches = list(data.as_numpy_iterator())
    if not batches:
        raise ConfigError(f"{name} is an empty tf.data.Dataset; give it (x, y) batches")
    if not all(isinstance(b, tuple) and len(b) in (2, 3) for b in batches):
        raise ConfigError(
            f"{name} must yield (x, y) batches, got {type(batches[0]).__name__} elements; "
            "map it to (inputs, labels) pairs"
        )

    def joined(i: int) -> Any:
        parts = [b[i] for b in batches]
        return tf.nest.map_structure(lambda *arrays: np.concatenate(arrays), *parts)

    return joined(0), joined(1)


def check_callback_data(
    model: Any,
    probe: Any = None,
    validation_data: Any = None,
    finetune_data: Any = None,
    name: str = "probe_data",
    classes: bool = False,
) -> None:
    """Check ``BalanceCallback``'s data arguments against ``model``'s inputs and outputs.

    Args:
        model: the compiled model about to be trained.
        probe: a :class:`~tf_balancer.attention.importance.ProbeData`, or None.
        validation_data: ``(x, y)``, or None.
        finetune_data: ``(x, y)`` (checked) or a ``tf.data.Dataset`` (not checked), or None.
        name: the argument ``probe`` came as, for messages (``tfb.prune``'s ``data``).
        classes: also check the probe's labels against the compiled categorical
            cross-entropy (class ids in range for the sparse one, one-hot rows for the
            other), for data whose labels go to that loss.

    Raises:
        ConfigError: the first argument that does not fit, by name.

    Example:
        >>> check_callback_data(model, validation_data=(x_val, y_val))  # doctest: +SKIP
    """
    if not getattr(model, "inputs", None):
        return  # not built: nothing to check against (analysis reports it)
    if probe is not None:
        compiled = probe.loss is None
        check_xy(model, name, probe.x, probe.y, compiled, classes and compiled)
    if validation_data is not None:
        check_xy(model, "validation_data", *pair(validation_data, "validation_data"))
    if isinstance(finetune_data, tuple):
        check_xy(model, "finetune_data", *pair(finetune_data, "finetune_data"))

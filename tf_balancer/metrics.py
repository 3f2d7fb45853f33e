"""Macro-averaged recall and F1: Keras metrics and a numpy function for reports.

Both metrics accumulate a ``num_classes x num_classes`` confusion matrix (rows: true
class, columns: predicted class) across ``update_state`` calls, so the value after an
epoch is the macro score over the whole epoch, not an average of per-batch scores.
Macro means the unweighted mean over *all* ``num_classes`` classes; a class that is
undefined (recall: no true samples; F1: no true samples and no predictions) counts as 0.
This is ``sklearn.metrics.recall_score`` / ``f1_score`` with ``average="macro"``,
``zero_division=0`` and ``labels=range(num_classes)``.

Accepted shapes (``C = num_classes``):

* ``y_pred`` of shape ``(..., C)``: scores, probabilities or logits; the prediction is
  the argmax over the last axis.
* ``y_pred`` of shape ``(..., 1)`` or ``(batch,)`` with ``num_classes=2``: one binary
  output; the prediction is 1 where ``y_pred > 0.5`` (``> 0`` with ``from_logits=True``).
* ``y_true`` sparse (integer class ids, shape ``(...)`` or ``(..., 1)``) or one-hot
  (shape ``(..., C)``; argmax over the last axis, so smoothed labels work too).
  ``label_mode="auto"`` treats ``y_true`` as one-hot when it has the rank of ``y_pred``
  (at least 2) and a last dimension of ``C``; otherwise as sparse.
* ``label_mode="multi_label"``: ``C`` independent binary labels (``y_true`` and
  ``y_pred`` of shape ``(..., C)``, each score thresholded like one binary output);
  one 2x2 confusion matrix per label, macro over labels - sklearn's
  ``recall_score``/``f1_score`` on multi-label indicator arrays.

The accumulator is float64 so that counts stay exact far beyond float32's 2**24.

Example:
    >>> import numpy as np
    >>> from tf_balancer._compat import keras
    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    >>> model.compile(loss="sparse_categorical_crossentropy",
    ...               metrics=[MacroRecall(num_classes=3), MacroF1(num_classes=3)])
    >>> macro_scores([0, 1, 2, 2], [0, 2, 2, 2], num_classes=3)["recall"]
    0.6666666666666666
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import tensorflow as tf

from tf_balancer._compat import assign_local, keras

__all__ = [
    "class_label_form",
    "LABEL_MODES",
    "MacroRecall",
    "MacroF1",
    "macro_scores",
    "task_metrics",
    "output_task_metrics",
    "output_tasks",
    "OutputMetric",
    "per_output",
    "sparse_label_outputs",
]

LABEL_MODES = ("auto", "sparse", "one_hot", "multi_label")


def _validate_num_classes(num_classes: Any) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int | np.integer):
        raise ValueError(
            f"num_classes must be an int >= 2, got {num_classes!r} "
            f"({type(num_classes).__name__}); pass the number of output classes, "
            "e.g. num_classes=10 (use num_classes=2 for a single sigmoid output)."
        )
    if num_classes < 2:
        raise ValueError(
            f"num_classes must be >= 2, got {num_classes}; a binary classifier has "
            "num_classes=2 even when the model has one sigmoid output."
        )
    return int(num_classes)


def _branch(static: bool | None, dynamic: Callable[[], tf.Tensor], true_fn, false_fn):
    """``true_fn()`` / ``false_fn()`` when ``static`` is known, else a ``tf.cond``."""
    if static is None:
        return tf.cond(dynamic(), true_fn, false_fn)
    return true_fn() if static else false_fn()


class _ConfusionMatrixMetric(keras.metrics.Metric):
    """Accumulates a confusion matrix; subclasses turn it into a score in ``result``."""

    def __init__(
        self,
        num_classes: int,
        label_mode: str = "auto",
        from_logits: bool = False,
        name: str | None = None,
        dtype: Any = None,
    ) -> None:
        num_classes = _validate_num_classes(num_classes)
        if label_mode not in LABEL_MODES:
            raise ValueError(
                f"label_mode must be one of {LABEL_MODES}, got {label_mode!r}; use 'sparse' "
                "for integer class ids, 'one_hot' for (batch, num_classes) labels, or 'auto'."
            )
        if not isinstance(from_logits, bool | np.bool_):
            raise ValueError(f"from_logits must be True or False, got {from_logits!r}.")
        super().__init__(name=name, dtype=dtype)
        self.num_classes = num_classes
        multi = label_mode == "multi_label"
        self.label_mode = label_mode
        self.from_logits = bool(from_logits)
        self.confusion_matrix = self.add_weight(
            name="confusion_matrix",
            shape=(num_classes, 2, 2) if multi else (num_classes, num_classes),
            initializer="zeros",
            dtype=tf.float64,
        )

    def update_state(self, y_true, y_pred, sample_weight=None):
        """Add one batch to the confusion matrix.

        Args:
            y_true: Sparse class ids or one-hot labels (see the module docstring).
            y_pred: Model outputs: ``(..., num_classes)`` scores, or one binary output
                when ``num_classes=2``.
            sample_weight: Optional weights, broadcastable to the per-sample shape
                (e.g. ``(batch,)`` or ``(batch, 1)``).

        Returns:
            The update op in graph mode; ``None`` when executing eagerly.
        """
        y_pred = tf.convert_to_tensor(y_pred)
        y_true = tf.convert_to_tensor(y_true)
        if self.label_mode == "multi_label":
            return self._update_multi_label(y_true, y_pred, sample_weight)
        predicted = self._predicted_labels(y_pred)
        labels = tf.reshape(self._true_labels(y_true, y_pred), [-1])
        weights = None
        if sample_weight is not None:
            weights = tf.cast(tf.convert_to_tensor(sample_weight), tf.float64)
            rank = predicted.shape.rank
            if weights.shape.rank is not None and weights.shape.rank == rank + 1:
                weights = tf.squeeze(weights, axis=-1)
            weights = tf.reshape(tf.broadcast_to(weights, tf.shape(predicted)), [-1])
        # One segment sum over the flat (true, predicted) cell index: what
        # tf.math.confusion_matrix computes, without its asserts (cheap to trace in
        # every train step; Keras' losses already reject out-of-range labels).
        cells = labels * self.num_classes + tf.reshape(predicted, [-1])
        if weights is None:
            weights = tf.ones_like(cells, dtype=tf.float64)
        batch = tf.math.unsorted_segment_sum(weights, cells, self.num_classes**2)
        batch = tf.reshape(batch, (self.num_classes, self.num_classes))
        return tf.group(self.confusion_matrix.assign_add(batch))

    def _update_multi_label(self, y_true, y_pred, sample_weight):
        """Add one batch to the per-label 2x2 confusion matrices."""
        labels = self.num_classes
        predicted = tf.reshape(self._threshold(y_pred), [-1, labels])
        truth = tf.reshape(tf.cast(tf.round(tf.cast(y_true, tf.float32)), tf.int32), [-1, labels])
        cell = tf.one_hot(truth * 2 + predicted, 4, dtype=tf.float64)  # (N, labels, 4)
        if sample_weight is not None:
            weights = tf.reshape(tf.cast(sample_weight, tf.float64), [-1, 1, 1])
            cell = cell * weights
        batch = tf.reshape(tf.reduce_sum(cell, axis=0), [labels, 2, 2])
        return tf.group(self.confusion_matrix.assign_add(batch))

    def _predicted_labels(self, y_pred: tf.Tensor) -> tf.Tensor:
        """Per-sample predicted class ids, shape ``y_pred.shape[:-1]`` (or ``(batch,)``)."""
        rank = y_pred.shape.rank
        if rank is None:
            raise ValueError("y_pred must have a known rank; give the model output a shape.")
        if rank == 1:
            if self.num_classes != 2:
                raise ValueError(
                    f"y_pred has shape {y_pred.shape} (one score per sample) but "
                    f"num_classes={self.num_classes}; one score per sample is only valid "
                    "for num_classes=2, otherwise y_pred must be (batch, num_classes)."
                )
            return self._threshold(y_pred)
        last = y_pred.shape[-1]
        if last == 1 and self.num_classes != 2:
            raise ValueError(
                f"y_pred has one column but num_classes={self.num_classes}; a single "
                "output is only valid for num_classes=2 (binary)."
            )
        if last is not None and last not in (1, self.num_classes):
            raise ValueError(
                f"y_pred has {last} columns but num_classes={self.num_classes}; "
                "set num_classes to the model's number of outputs."
            )
        argmax = lambda: tf.argmax(y_pred, axis=-1, output_type=tf.int32)  # noqa: E731
        if self.num_classes != 2:
            return argmax()
        return _branch(
            None if last is None else last == 1,
            lambda: tf.equal(tf.shape(y_pred)[-1], 1),
            lambda: self._threshold(tf.squeeze(y_pred, axis=-1)),
            argmax,
        )

    def _threshold(self, scores: tf.Tensor) -> tf.Tensor:
        threshold = 0.0 if self.from_logits else 0.5
        return tf.cast(tf.cast(scores, tf.float32) > threshold, tf.int32)

    def _true_labels(self, y_true: tf.Tensor, y_pred: tf.Tensor) -> tf.Tensor:
        """Per-sample true class ids (any shape with the right number of elements)."""

        def sparse():
            if y_true.dtype.is_floating:  # Keras casts labels to y_pred's dtype.
                return tf.cast(tf.round(y_true), tf.int32)
            return tf.cast(y_true, tf.int32)

        def one_hot():
            return tf.argmax(y_true, axis=-1, output_type=tf.int32)

        if self.label_mode == "sparse":
            return sparse()
        if self.label_mode == "one_hot":
            return one_hot()
        rank_true, rank_pred = y_true.shape.rank, y_pred.shape.rank
        if rank_true is None or rank_true < 2 or rank_true != rank_pred:
            return sparse()
        last = y_true.shape[-1]
        return _branch(
            None if last is None else last == self.num_classes,
            lambda: tf.equal(tf.shape(y_true)[-1], self.num_classes),
            one_hot,
            lambda: tf.reshape(sparse(), [-1]),
        )

    def reset_state(self) -> None:
        """Zero the confusion matrix (Keras calls this at the start of each epoch);
        under a ``tf.distribute`` strategy, each device's copy directly."""
        assign_local(self.confusion_matrix, tf.zeros(self.confusion_matrix.shape, tf.float64))

    def _per_class(self) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        """True positives, true counts (row sums), predicted counts (column sums)."""
        # One read: under a tf.distribute strategy each read of the sync-on-read
        # variable is an all-reduce (across workers under MultiWorkerMirroredStrategy).
        cm = tf.convert_to_tensor(self.confusion_matrix)
        if self.label_mode == "multi_label":  # per label: rows true 0/1, columns predicted 0/1
            return cm[:, 1, 1], cm[:, 1, 0] + cm[:, 1, 1], cm[:, 0, 1] + cm[:, 1, 1]
        return tf.linalg.diag_part(cm), tf.reduce_sum(cm, axis=1), tf.reduce_sum(cm, axis=0)

    def get_config(self) -> dict[str, Any]:
        """Constructor arguments, so that ``type(m).from_config(m.get_config())`` works."""
        config = {
            "num_classes": self.num_classes,
            "label_mode": self.label_mode,
            "from_logits": self.from_logits,
        }
        return {**super().get_config(), **config}


@keras.utils.register_keras_serializable(package="tf_balancer")
class MacroRecall(_ConfusionMatrixMetric):
    """Macro-averaged recall (balanced accuracy over all ``num_classes`` classes).

    The mean over classes of ``TP_c / (number of samples of class c)``, with 0 for a
    class that has no samples; equals ``sklearn.metrics.recall_score(y, p,
    labels=range(num_classes), average="macro", zero_division=0)``.

    Args:
        num_classes: Number of classes, >= 2. Use 2 for a single sigmoid/logit output.
        label_mode: ``"sparse"`` (integer class ids), ``"one_hot"`` (``(..., C)``
            labels) or ``"auto"`` (decided from the shapes). Defaults to ``"auto"``.
        from_logits: Only for one binary output: threshold at 0 instead of 0.5.
            Defaults to ``False``.
        name: Metric name (the Keras log key). Defaults to ``"macro_recall"``.
        dtype: Dtype of ``result()``. Defaults to ``float32``.

    Raises:
        ValueError: if ``num_classes`` < 2 or ``label_mode`` is unknown.

    Example:
        >>> m = MacroRecall(num_classes=3)
        >>> m.update_state([0, 1, 2, 2], [[1, 0, 0], [0, 0, 1], [0, 0, 1], [0, 0, 1]])
        >>> round(float(m.result()), 4)
        0.6667
    """

    def __init__(
        self,
        num_classes: int,
        label_mode: str = "auto",
        from_logits: bool = False,
        name: str = "macro_recall",
        dtype: Any = None,
    ) -> None:
        super().__init__(num_classes, label_mode, from_logits, name=name, dtype=dtype)

    def result(self) -> tf.Tensor:
        """The macro recall of everything accumulated since the last reset."""
        tp, true_count, _ = self._per_class()
        return tf.cast(tf.reduce_mean(tf.math.divide_no_nan(tp, true_count)), self.dtype)


@keras.utils.register_keras_serializable(package="tf_balancer")
class MacroF1(_ConfusionMatrixMetric):
    """Macro-averaged F1 over all ``num_classes`` classes.

    The mean over classes of ``2 TP_c / (true count_c + predicted count_c)``, with 0
    for a class that is neither present nor predicted; equals
    ``sklearn.metrics.f1_score(y, p, labels=range(num_classes), average="macro",
    zero_division=0)``.

    Args:
        num_classes: Number of classes, >= 2. Use 2 for a single sigmoid/logit output.
        label_mode: ``"sparse"``, ``"one_hot"`` or ``"auto"``. Defaults to ``"auto"``.
        from_logits: Only for one binary output: threshold at 0 instead of 0.5.
            Defaults to ``False``.
        name: Metric name (the Keras log key). Defaults to ``"macro_f1"``.
        dtype: Dtype of ``result()``. Defaults to ``float32``.

    Raises:
        ValueError: if ``num_classes`` < 2 or ``label_mode`` is unknown.

    Example:
        >>> m = MacroF1(num_classes=2, from_logits=True)
        >>> m.update_state([0, 1, 1, 0], [[-2.0], [3.0], [-1.0], [-0.5]])
        >>> round(float(m.result()), 4)
        0.7333
    """

    def __init__(
        self,
        num_classes: int,
        label_mode: str = "auto",
        from_logits: bool = False,
        name: str = "macro_f1",
        dtype: Any = None,
    ) -> None:
        super().__init__(num_classes, label_mode, from_logits, name=name, dtype=dtype)

    def result(self) -> tf.Tensor:
        """The macro F1 of everything accumulated since the last reset."""
        tp, true_count, pred_count = self._per_class()
        f1 = tf.math.divide_no_nan(2.0 * tp, true_count + pred_count)
        return tf.cast(tf.reduce_mean(f1), self.dtype)


def _as_class_ids(values: Any, num_classes: int, what: str) -> np.ndarray:
    """1-D int array of class ids from ids, ``(n, 1)`` ids or ``(n, C)`` one-hot rows."""
    array = np.asarray(values)
    if array.ndim == 2 and array.shape[1] == num_classes:
        array = array.argmax(axis=1)
    elif array.ndim == 2 and array.shape[1] == 1:
        array = array[:, 0]
    if array.ndim != 1:
        raise ValueError(
            f"{what} must be class ids of shape (n,) or (n, 1), or one-hot of shape "
            f"(n, {num_classes}); got shape {array.shape}."
        )
    ids = np.rint(array).astype(np.int64) if array.dtype.kind == "f" else array.astype(np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= num_classes):
        raise ValueError(
            f"{what} holds class ids outside [0, {num_classes}) "
            f"(min {ids.min()}, max {ids.max()}); check num_classes."
        )
    return ids


def macro_scores(
    y_true: Any,
    y_pred_labels: Any,
    num_classes: int,
    sample_weight: Any = None,
) -> dict[str, float]:
    """Accuracy, macro recall and macro F1 of predicted class ids, in numpy.

    Same definitions as :class:`MacroRecall` and :class:`MacroF1` (all classes in
    ``range(num_classes)`` count; undefined per-class scores are 0). Empty input gives
    0 for every score.

    Args:
        y_true: True class ids, shape ``(n,)`` or ``(n, 1)``, or one-hot ``(n, C)``.
        y_pred_labels: Predicted class ids, same accepted shapes (e.g.
            ``model.predict(x).argmax(-1)``).
        num_classes: Number of classes, >= 2.
        sample_weight: Optional per-sample weights of shape ``(n,)``.

    Returns:
        ``{"accuracy": float, "recall": float, "f1": float}``.

    Raises:
        ValueError: for mismatched lengths, bad shapes, ids outside
            ``[0, num_classes)`` or ``num_classes`` < 2.

    Example:
        >>> scores = macro_scores([0, 0, 1, 2], [0, 1, 1, 1], num_classes=3)
        >>> {k: round(v, 3) for k, v in scores.items()}
        {'accuracy': 0.5, 'recall': 0.5, 'f1': 0.389}
    """
    num_classes = _validate_num_classes(num_classes)
    truth = _as_class_ids(y_true, num_classes, "y_true")
    pred = _as_class_ids(y_pred_labels, num_classes, "y_pred_labels")
    if truth.shape != pred.shape:
        raise ValueError(
            f"y_true has {truth.size} samples but y_pred_labels has {pred.size}; "
            "pass one prediction per label."
        )
    weights = np.ones(truth.shape) if sample_weight is None else np.asarray(sample_weight)
    weights = weights.astype(np.float64).reshape(-1)
    if weights.shape != truth.shape:
        raise ValueError(
            f"sample_weight has {weights.size} entries but there are {truth.size} samples."
        )
    cm = np.zeros((num_classes, num_classes))
    np.add.at(cm, (truth, pred), weights)
    tp, true_count, pred_count = np.diag(cm), cm.sum(axis=1), cm.sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        recall = np.where(true_count > 0, tp / true_count, 0.0)
        denom = true_count + pred_count
        f1 = np.where(denom > 0, 2.0 * tp / denom, 0.0)
    total = cm.sum()
    return {
        "accuracy": float(tp.sum() / total) if total > 0 else 0.0,
        "recall": float(recall.mean()),
        "f1": float(f1.mean()),
    }


_SPARSE_LOSSES = ("sparse_categorical_crossentropy", "sparse_categorical_focal_crossentropy")
_ONE_HOT_LOSSES = ("categorical_crossentropy", "categorical_focal_crossentropy")
_BINARY_LOSSES = ("binary_crossentropy", "binary_focal_crossentropy")


def _loss_name_and_logits(loss: Any) -> tuple[str, bool]:
    """``(snake_case name, from_logits)`` of a compiled loss (string, Loss or function)."""
    if isinstance(loss, str):
        return loss.lower(), False
    config = loss.get_config() if hasattr(loss, "get_config") else {}
    name = type(loss).__name__ if hasattr(loss, "get_config") else getattr(loss, "__name__", "")
    snake = "".join(f"_{c.lower()}" if c.isupper() else c for c in name).lstrip("_")
    return snake, bool(config.get("from_logits", False))


def _head_metrics(loss: Any, width: Any, prefix: str = "") -> list[Any]:
    """Macro recall and F1 for one output head with ``loss`` and last dimension ``width``."""
    name, from_logits = _loss_name_and_logits(loss)
    if name in _SPARSE_LOSSES + _ONE_HOT_LOSSES and width and width > 1:
        mode = "sparse" if name in _SPARSE_LOSSES else "one_hot"
        num_classes, from_logits = int(width), False
    elif name in _BINARY_LOSSES and width == 1:
        mode, num_classes = "auto", 2
    elif name in _BINARY_LOSSES and width and width > 1:
        mode, num_classes = "multi_label", int(width)
    else:
        return []
    return [
        cls(num_classes, label_mode=mode, from_logits=from_logits, name=f"{prefix}{cls_name}")
        for cls, cls_name in ((MacroRecall, "macro_recall"), (MacroF1, "macro_f1"))
    ]


def task_metrics(model: Any, outputs: Any = None) -> list[Any]:
    """Macro recall and F1 metrics that fit a single-output model's task, or ``[]``.

    The task is read from the compiled loss and the output shape: a sparse or
    categorical cross-entropy over ``C > 1`` outputs is ``C``-class classification
    (sparse or one-hot labels; logits or probabilities: the argmax is the same); a
    binary cross-entropy over one output is binary classification (threshold 0 for
    ``from_logits=True``, else 0.5); over ``C > 1`` outputs it is ``C``-label
    classification (``label_mode="multi_label"``). Regression losses and models
    with several outputs get no recall/F1 (``[]``; see
    :func:`output_task_metrics` for models with several heads). ``outputs`` as
    there.

    Example:
        >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
        >>> model.compile(loss="sparse_categorical_crossentropy")
        >>> [m.name for m in task_metrics(model)]
        ['macro_recall', 'macro_f1']
    """
    loss = getattr(model, "loss", None)
    outputs = outputs or getattr(model, "outputs", None) or []
    if loss is None or isinstance(loss, (list, tuple, dict)) or len(outputs) != 1:
        return []
    return _head_metrics(loss, outputs[0].shape[-1])


class OutputMetric:
    """A metric fed one output of a multi-output model (labels and predictions selected
    by output name from dicts, by position from lists)."""

    def __init__(self, metric: Any, index: int, output: str):
        self.metric, self.index, self.output = metric, index, output
        self.name = metric.name

    def _select(self, value: Any) -> Any:
        if isinstance(value, dict):
            return value[self.output]
        if isinstance(value, (list, tuple)):
            return value[self.index]
        return value

    def update_state(self, y_true: Any, y_pred: Any, sample_weight: Any = None) -> Any:
        weight = None if sample_weight is None else self._select(sample_weight)
        return self.metric.update_state(self._select(y_true), self._select(y_pred), weight)

    def result(self) -> Any:
        return self.metric.result()

    def reset_state(self) -> None:
        self.metric.reset_state()


def per_output(value: Any, index: int, name: str, default: Any = None) -> Any:
    """``value``'s entry for output ``name`` / number ``index``, as Keras reads a
    compile argument: a dict by output name, a list in output order, or one value
    for every output (``default`` when missing or None).

    Example:
        >>> per_output({"cls": "mse"}, 1, "reg", default=1.0)
        1.0
        >>> per_output(["a", "b"], 1, "reg")
        'b'
    """
    if isinstance(value, dict):
        return value.get(name, default)
    if isinstance(value, (list, tuple)):
        return value[index] if index < len(value) else default
    return default if value is None else value


def output_task_metrics(model: Any, outputs: Any = None) -> list[Any]:
    """:func:`task_metrics`, and for a model with several outputs the same per head.

    Each classification head ``name`` (per its compiled loss: a dict keyed by output
    name, a list in output order, or one loss for every output) gets
    ``<name>_macro_recall`` and ``<name>_macro_f1``; regression heads get none.
    ``outputs``: the model's output tensors when it has none of its own (a
    subclassed model: its functional twin's); defaults to ``model.outputs``.

    Example:
        >>> inp = keras.Input((4,))
        >>> model = keras.Model(inp, [keras.layers.Dense(3, name="cls")(inp),
        ...                           keras.layers.Dense(1, name="reg")(inp)])
        >>> model.compile(loss={"cls": "sparse_categorical_crossentropy", "reg": "mse"})
        >>> [m.name for m in output_task_metrics(model)]
        ['cls_macro_recall', 'cls_macro_f1']
    """
    outputs = outputs or getattr(model, "outputs", None) or []
    if len(outputs) <= 1 or getattr(model, "loss", None) is None:
        return task_metrics(model, outputs)
    return [
        OutputMetric(metric, index, name)
        for index, name, tensor, head_loss in _heads(model, outputs)
        if head_loss is not None
        for metric in _head_metrics(head_loss, tensor.shape[-1], prefix=f"{name}_")
    ]


def _heads(model: Any, outputs: Any) -> list[tuple[int, str, Any, Any]]:
    """``(index, name, output tensor, its compiled loss or None)`` per output."""
    from tf_balancer._compat import adapter_for

    names = adapter_for(model).output_names(model)
    loss = getattr(model, "loss", None)
    return [
        (index, name, tensor, per_output(loss, index, name))
        for index, (name, tensor) in enumerate(zip(names, outputs, strict=True))
    ]


def class_label_form(model: Any) -> tuple[str, int] | None:
    """``("sparse" | "one_hot", classes)`` for a model with one output compiled with a
    categorical cross-entropy (class ids or one-hot labels), else None.

    Example:
        >>> model.compile(loss="sparse_categorical_crossentropy")  # doctest: +SKIP
        >>> class_label_form(model)                                # doctest: +SKIP
        ('sparse', 10)
    """
    outputs = getattr(model, "outputs", None) or []
    if len(outputs) != 1:
        return None
    (_, _, tensor, loss), *_ = _heads(model, outputs)
    name = _loss_name_and_logits(loss)[0] if loss is not None else ""
    width = tensor.shape[-1]
    if not width or width < 2:
        return None
    if name in _SPARSE_LOSSES:
        return "sparse", int(width)
    return ("one_hot", int(width)) if name in _ONE_HOT_LOSSES else None


def output_tasks(model: Any) -> list[dict[str, Any]]:
    """Each output's task, in output order: ``{"name", "classifier", "multi_label"}``.

    Read from the compiled loss as :func:`output_task_metrics` reads it; an output
    without a loss (or a model not compiled) is taken for a classifier, as
    :func:`~tf_balancer.report.is_classifier` does.

    Example:
        >>> inp = keras.Input((4,))
        >>> model = keras.Model(inp, [keras.layers.Dense(3, name="cls")(inp),
        ...                           keras.layers.Dense(1, name="reg")(inp)])
        >>> model.compile(loss={"cls": "sparse_categorical_crossentropy", "reg": "mse"})
        >>> [(t["name"], t["classifier"]) for t in output_tasks(model)]
        [('cls', True), ('reg', False)]
    """
    tasks = []
    for _, name, tensor, head_loss in _heads(model, model.outputs):
        metrics = [] if head_loss is None else _head_metrics(head_loss, tensor.shape[-1])
        tasks.append(
            {
                "name": name,
                "classifier": head_loss is None or bool(metrics),
                "multi_label": any(getattr(m, "label_mode", "") == "multi_label" for m in metrics),
            }
        )
    return tasks


def sparse_label_outputs(model: Any, outputs: Any = None) -> list[tuple[str, bool]]:
    """``(output name, whether its labels are class ids)`` per output, in output order:
    an output compiled with a sparse categorical cross-entropy over ``C > 1`` classes
    takes class ids. ``outputs``: the output tensors (a subclassed model's twin's);
    defaults to ``model.outputs``. ``[]`` for a model without a compiled loss.

    Example:
        >>> inp = keras.Input((4,))
        >>> model = keras.Model(inp, [keras.layers.Dense(3, name="cls")(inp),
        ...                           keras.layers.Dense(1, name="reg")(inp)])
        >>> model.compile(loss={"cls": "sparse_categorical_crossentropy", "reg": "mse"})
        >>> sparse_label_outputs(model)
        [('cls', True), ('reg', False)]
    """
    outputs = outputs or getattr(model, "outputs", None) or []
    if getattr(model, "loss", None) is None or not outputs:
        return []
    heads = []
    for _, name, tensor, loss in _heads(model, outputs):
        width = tensor.shape[-1]
        sparse = loss is not None and _loss_name_and_logits(loss)[0] in _SPARSE_LOSSES
        heads.append((name, bool(sparse and width and width > 1)))
    return heads

"""Fine-tuning a compacted model so that it never ends below where it started.

The compacted model is compiled like the trained one (its loss, loss weights and
metrics, via ``get_compile_config``) with a fresh optimizer of the same type at
``lr_scale`` times the training optimizer's *current* learning rate (a schedule is
evaluated at the optimizer's step). It trains for ``epochs`` epochs at ``fit``'s
batch size; after each epoch it is evaluated on the validation data, and the best
weights seen, counting the weights it started from, are kept.

Example:
    >>> settings = FinetuneSettings(epochs=2, data=(x, y), batch_size=64)  # doctest: +SKIP
    >>> model, log = finetune(model, trained, settings, (x_val, y_val))    # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import numpy as np
import tensorflow as tf

from tf_balancer._compat import adapter_for, compile_arguments, keras_of
from tf_balancer.graph.walk import functional_twin
from tf_balancer.metrics import sparse_label_outputs
from tf_balancer.report import classification_scores, task_of

__all__ = [
    "FINETUNE_LR_SCALE",
    "FinetuneSettings",
    "compile_like",
    "current_learning_rate",
    "finetune",
]

logger = logging.getLogger(__name__)

FINETUNE_LR_SCALE = 0.1
"""Fine-tuning runs at this fraction of the training optimizer's current learning rate."""


@dataclasses.dataclass(frozen=True)
class FinetuneSettings:
    """How to fine-tune.

    Attributes:
        epochs: fine-tuning epochs (0: none).
        data: ``(x, y)`` or a ``tf.data.Dataset``.
        batch_size: batch size for array data (``fit``'s, when the callback saw it).
        lr_scale: fraction of the training optimizer's current learning rate.
        learning_rate: an explicit learning rate; overrides ``lr_scale``.
    """

    epochs: int = 0
    data: Any = None
    batch_size: int = 32
    lr_scale: float = FINETUNE_LR_SCALE
    learning_rate: float | None = None


def current_learning_rate(optimizer: Any) -> float:
    """The learning rate of ``optimizer``'s next step (a schedule evaluated at its step count).

    Read from ``get_config()``, where a schedule is serialized, so it means the same
    in both Kerases (tf_keras's ``optimizer.learning_rate`` is the *last* step's rate).
    """
    rate = optimizer.get_config().get("learning_rate")
    if isinstance(rate, dict):  # a serialized LearningRateSchedule
        schedules = keras_of(optimizer).optimizers.schedules
        rate = schedules.deserialize(rate)(optimizer.iterations)
    elif rate is None:
        rate = optimizer.learning_rate
    return float(np.asarray(tf.convert_to_tensor(rate)))


def _fresh_optimizer(optimizer: Any, learning_rate: float) -> Any:
    """A new optimizer of ``optimizer``'s type and config at ``learning_rate`` (no slots).

    A loss-scale wrapper (``compile`` puts one around the optimizer under a
    ``mixed_float16`` policy) takes no learning rate: its inner optimizer is made anew
    and wrapped again, the scale starting afresh like the slots.
    """
    inner = getattr(optimizer, "inner_optimizer", None)
    if inner is not None:
        return type(optimizer)(_fresh_optimizer(inner, learning_rate))
    config = dict(optimizer.get_config(), learning_rate=learning_rate)
    return type(optimizer).from_config(config)


def _copy_metric(metric: Any) -> Any:
    """A fresh copy of a ``Metric`` object (its state belongs to one model); anything
    else (a name, a function) as it is. Raises when the metric cannot be rebuilt."""
    if callable(getattr(metric, "reset_state", None)) and hasattr(metric, "get_config"):
        return type(metric).from_config(metric.get_config())
    return metric


def _compile_kwargs(trained: Any) -> dict[str, Any]:
    """``trained``'s compile arguments (its optimizer left out), each rebuilt from its
    serialized config, or, when that fails (a plain function as a metric or loss is
    serialized by name only), the object ``compile`` was given (``Metric`` objects
    copied). An argument neither can give is left out, and said so."""
    config = trained.get_compile_config() if hasattr(trained, "get_compile_config") else None
    if not config:
        return {"loss": trained.loss}
    live = compile_arguments(trained) or {}
    deserialize = keras_of(trained).saving.deserialize_keras_object
    kwargs: dict[str, Any] = {}
    for key, value in config.items():
        if key == "optimizer":
            continue
        try:
            kwargs[key] = deserialize(value)
            continue
        except Exception as err:  # noqa: BLE001 - try the object compile was given
            error = err
        try:
            kwargs[key] = tf.nest.map_structure(_copy_metric, live[key])
        except Exception:  # noqa: BLE001 - not recorded, or a metric that cannot be copied
            if key == "loss":
                kwargs[key] = trained.loss
            else:
                logger.warning("the optimized model is compiled without %s (%s)", key, error)
    return kwargs


_SPARSE_GUESSES = {
    "accuracy": "SparseCategoricalAccuracy",
    "acc": "SparseCategoricalAccuracy",
    "crossentropy": "SparseCategoricalCrossentropy",
    "ce": "SparseCategoricalCrossentropy",
}
"""Metric names tf_keras resolves from the labels' shape, and what they are for class ids."""


def _resolve_sparse_guesses(kwargs: dict[str, Any], trained: Any) -> dict[str, Any]:
    """tf_keras resolves ``"accuracy"``/``"crossentropy"`` from the labels' shape at the
    first batch, or, when the model is saved before any batch, from its outputs' shapes
    alone: class-id labels are then scored with ``categorical_accuracy`` (about 1/C) for
    the rest of the model's life (keras-team/tf-keras#277). The optimized model is
    returned compiled and unbuilt, and saved first more often than not; an output
    compiled with a sparse cross-entropy takes class ids, so its names are resolved
    here as ``fit`` would resolve them, under the same names (per output: metrics as a
    dict by output name, a list per output, or one list for every output)."""
    if adapter_for(trained).version != 2:  # Keras 3 resolves them from the loss
        return kwargs
    heads = sparse_label_outputs(trained, functional_twin(trained).outputs)
    if not any(sparse for _, sparse in heads):
        return kwargs
    classes = keras_of(trained).metrics

    def resolve(metric: Any) -> Any:
        if isinstance(metric, str) and metric.lower() in _SPARSE_GUESSES:
            return getattr(classes, _SPARSE_GUESSES[metric.lower()])(name=metric)
        return metric

    def for_heads(metrics: Any) -> Any:
        sparse = dict(heads)
        if isinstance(metrics, dict):  # by output name
            return {
                name: tf.nest.map_structure(resolve, value) if sparse.get(name) else value
                for name, value in metrics.items()
            }
        per_output = (
            isinstance(metrics, (list, tuple))
            and len(heads) > 1
            and len(metrics) == len(heads)
            and all(isinstance(m, (list, tuple)) for m in metrics)
        )
        if per_output:  # one list per output, in output order
            return [
                tf.nest.map_structure(resolve, value) if is_sparse else value
                for value, (_, is_sparse) in zip(metrics, heads, strict=True)
            ]
        if all(is_sparse for _, is_sparse in heads):  # one list for every output
            return tf.nest.map_structure(resolve, metrics)
        return metrics

    for key in ("metrics", "weighted_metrics"):
        if kwargs.get(key) is not None:
            kwargs[key] = for_heads(kwargs[key])
    return kwargs


def compile_like(model: Any, trained: Any, learning_rate: float) -> None:
    """Compile ``model`` with ``trained``'s compile arguments (loss, loss weights,
    metrics, weighted metrics, steps per execution, ...) and a fresh optimizer of
    ``trained``'s type and config at ``learning_rate``."""
    optimizer = _fresh_optimizer(trained.optimizer, learning_rate)
    kwargs = _resolve_sparse_guesses(_compile_kwargs(trained), trained)
    model.compile(optimizer=optimizer, **kwargs)


def _score(model: Any, validation: Any, classifier: bool, multi_label: bool = False) -> float:
    """Validation accuracy for classifiers, else minus the compiled loss."""
    x, y = validation[0], validation[1]
    if classifier:
        return classification_scores(model, x, y, multi_label=multi_label)["accuracy"]
    return -float(model.evaluate(x, y, verbose=0, return_dict=True)["loss"])


def finetune(
    model: Any, trained: Any, settings: FinetuneSettings, validation: Any
) -> tuple[Any, dict[str, Any]]:
    """Fine-tune ``model`` in place; return it with a log of what happened.

    Args:
        model: the compacted model.
        trained: the model that was trained (its compile config and optimizer are copied).
        settings: epochs, data, batch size and learning rate.
        validation: ``(x, y)`` scored after every epoch to keep the best weights.

    Returns:
        ``(model, log)``; ``log`` has ``learning_rate``, ``batch_size``,
        ``scores`` (the start and each epoch) and ``best_epoch`` (0 = the start).
    """
    rate = settings.learning_rate
    if rate is None:
        rate = settings.lr_scale * current_learning_rate(trained.optimizer)
    compile_like(model, trained, rate)
    task = task_of(trained, functional_twin(trained).outputs)  # (a subclassed model's twin)
    scores = [_score(model, validation, **task)]
    best, best_weights = scores[0], model.get_weights()
    data = settings.data
    for _ in range(settings.epochs):
        if isinstance(data, tuple):
            model.fit(data[0], data[1], batch_size=settings.batch_size, epochs=1, verbose=0)
        else:
            model.fit(data, epochs=1, verbose=0)
        scores.append(_score(model, validation, **task))
        if scores[-1] > best:
            best, best_weights = scores[-1], model.get_weights()
    model.set_weights(best_weights)
    best_epoch = scores.index(best)
    logger.info(
        "fine-tuned %d epochs at learning rate %.3g: validation %.4f -> %.4f (kept epoch %d)",
        settings.epochs,
        rate,
        scores[0],
        best,
        best_epoch,
    )
    log = {"learning_rate": rate, "batch_size": settings.batch_size, "scores": scores}
    return model, {**log, "best_epoch": best_epoch}

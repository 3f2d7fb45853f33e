"""Evaluation and reporting: before/after metrics, latency, size; JSON, markdown, PNG, TensorBoard.

Example:
    >>> summary = evaluate_model(model, x_val, y_val)       # doctest: +SKIP
    >>> summary["accuracy"], summary["latency_ms_b1"]        # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import tensorflow as tf

from tf_balancer._compat import adapter_for, as_model_inputs, is_keras_model
from tf_balancer.hardware import usable_cores
from tf_balancer.input_shapes import input_shapes
from tf_balancer.metrics import macro_scores, output_tasks, task_metrics

__all__ = [
    "measure_latency",
    "inference_fn",
    "one_input",
    "saved_model_size",
    "gzip_size",
    "classification_scores",
    "regression_scores",
    "is_classifier",
    "task_of",
    "task_scores",
    "evaluate_model",
    "markdown_table",
    "write_report_png",
    "summary_markdown",
    "log_layer_summaries",
]

logger = logging.getLogger(__name__)


def inference_fn(model: Any) -> Callable[[Any], Any]:
    """A Keras model as a ``tf.function`` in inference mode; anything else as it is."""
    if hasattr(model, "inputs") and hasattr(model, "layers"):
        return tf.function(lambda x: model(x, training=False))
    return model


def measure_latency(
    model: Any,
    input_shape: Sequence[int],
    batch_size: int,
    repeats: int = 20,
    budget_s: float | None = 1.0,
    dtypes: Sequence[Any] | None = None,
) -> float:
    """Median wall time (ms) of one inference call at ``batch_size`` (``model``: a Keras
    model, or a callable such as :func:`inference_fn`'s, reused without retracing;
    ``input_shape``: its input's shape, or a list of one per input).

    ``repeats`` timed calls after a trace and two warm-up calls, but none started
    once ``budget_s`` seconds have been timed (at least 3 calls; None: no budget):
    a small model gets all 20, ResNet50 at batch 64 the median of 3-5 calls of
    0.2-0.4 s each. ``dtypes``: each input's dtype (default float32); float inputs
    get uniform [0, 1) values, others zeros (valid token ids and indices).
    """
    fn = inference_fn(model)
    several = bool(input_shape) and isinstance(input_shape[0], (tuple, list))  # inputs
    shapes = list(input_shape) if several else [input_shape]
    xs = [
        _timing_input([batch_size, *shape[1:]], tf.as_dtype(dtype))
        for shape, dtype in zip(shapes, dtypes or [tf.float32] * len(shapes), strict=True)
    ]
    x = as_model_inputs(model, xs)  # a dict for a model built on a dict of inputs
    for _ in range(3):
        fn(x)  # trace and warm up
    times: list[float] = []
    while len(times) < repeats:
        if budget_s is not None and len(times) >= 3 and sum(times) >= budget_s:
            break
        start = time.perf_counter()
        [np.asarray(t) for t in tf.nest.flatten(fn(x))]  # wait for every output
        times.append(time.perf_counter() - start)
    return 1000.0 * float(np.median(times))


def _timing_input(shape: list[int], dtype: tf.DType) -> tf.Tensor:
    if dtype.is_floating:
        return tf.cast(tf.random.stateless_uniform(shape, seed=(0, 0)), dtype)
    return tf.zeros(shape, dtype)


def directory_size(path: str) -> int:
    return sum(
        os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files
    )


def saved_model_size(model: Any, serve: Any = None) -> dict[str, int]:
    """Bytes of the model as a serving SavedModel, raw and gzip-compressed (level 6,
    :func:`gzip_size`).

    A Keras model is written with only its variables and a ``serving_default``
    signature (:meth:`~tf_balancer._compat.KerasAdapter.save_serving_model`, the
    same kind of directory for both Kerases); anything else with
    ``tf.saved_model.save``. Level 6 is gzip's and ``zipfile``'s default; tar's
    own, 9, took 10x as long on 80%-sparse weights for files 2% smaller.
    ``serve``: the model's :meth:`~tf_balancer._compat.KerasAdapter.serving_function`,
    when traced already (saved as the signature, not traced again).
    """
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model")
        if is_keras_model(model):
            adapter_for(model).save_serving_model(model, path, serve)
        else:
            tf.saved_model.save(model, path)
        return {"bytes": directory_size(path), "gzip_bytes": gzip_size(path)}


GZIP_CHUNK = 4 << 20


def gzip_size(path: str, level: int = 6, chunk: int = GZIP_CHUNK) -> int:
    """Bytes of the files under ``path`` compressed with gzip at ``level``, on every core.

    Each file is compressed in ``chunk``-sized gzip members (what ``pigz`` writes)
    by a pool of threads - zlib releases the GIL - so a 100 MB SavedModel takes
    half the time on two cores; a member boundary only forgets deflate's 32 KB
    window, which adds about a hundred bytes per 4 MB member (< 0.01%).

    Example:
        >>> gzip_size("exported/")  # doctest: +SKIP
        42781351
    """
    files = sorted(os.path.join(root, f) for root, _, names in os.walk(path) for f in names)
    workers = usable_cores()  # each holds two chunks in the window below
    total = 0
    with ThreadPoolExecutor(workers) as pool:
        pending: list[Any] = []
        for name in files:
            with open(name, "rb") as handle:
                while block := handle.read(chunk):
                    pending.append(pool.submit(_gzip_member_size, block, level))
                    if len(pending) >= 2 * workers:  # a bounded window of chunks in memory
                        total += sum(f.result() for f in pending)
                        pending = []
        total += sum(f.result() for f in pending)
    return total


def _gzip_member_size(block: bytes, level: int) -> int:
    compressor = zlib.compressobj(level, zlib.DEFLATED, 31)  # 31: a gzip member
    return len(compressor.compress(block)) + len(compressor.flush())


def classification_scores(
    model: Any,
    x: Any,
    y: Any,
    num_classes: int | None = None,
    multi_label: bool = False,
    predict: Callable[[Any], Any] | None = None,
) -> dict:
    """Accuracy, macro recall and macro F1 of ``model`` on ``(x, y)``.

    Outputs of width > 1 are argmax-ed; a single output is a binary classifier
    (threshold 0 for logits, 0.5 for probabilities). Labels may be class ids or
    one-hot. ``multi_label``: each output column is its own binary label
    (thresholded the same way); accuracy is the exact-match (subset) accuracy and
    recall/F1 are macro over labels, as sklearn computes them on indicator arrays.
    """
    return _classification_of(np.asarray(_predict(model, x, predict)), y, num_classes, multi_label)


def _classification_of(
    logits: np.ndarray, y: Any, num_classes: int | None, multi_label: bool
) -> dict[str, float]:
    """:func:`classification_scores` of predictions already made."""
    if multi_label:
        return _multi_label_scores(logits, np.asarray(y))
    if logits.ndim == 1 or logits.shape[-1] == 1:
        predicted = (logits.reshape(-1) > (0.0 if logits.min() < 0 else 0.5)).astype(int)
        num_classes = num_classes or 2
    else:
        predicted = logits.reshape(-1, logits.shape[-1]).argmax(-1)
        num_classes = num_classes or logits.shape[-1]
    labels = np.asarray(y)
    if labels.ndim > 1 and labels.shape[-1] == num_classes and num_classes > 1:
        labels = labels.argmax(-1)
    return dict(macro_scores(labels.reshape(-1), predicted, num_classes))


def _multi_label_scores(scores: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    width = scores.shape[-1]
    predicted = scores.reshape(-1, width) > (0.0 if scores.min() < 0 else 0.5)
    truth = np.round(labels.reshape(-1, width)).astype(bool)
    tp = (predicted & truth).sum(0)
    true_count, predicted_count = truth.sum(0), predicted.sum(0)
    recall = np.divide(tp, true_count, out=np.zeros(width), where=true_count > 0)
    denominator = true_count + predicted_count
    f1 = np.divide(2 * tp, denominator, out=np.zeros(width), where=denominator > 0)
    accuracy = float(np.mean(np.all(predicted == truth, axis=1)))
    return {"accuracy": accuracy, "recall": float(recall.mean()), "f1": float(f1.mean())}


def one_input(x: Any) -> Any:
    """The samples of a one-input model as one array, however ``fit`` would take them:
    an array, a dict of one (``{"image": x}``, keyed by the input's name) or a list
    of one.

    Example:
        >>> one_input({"image": np.zeros((2, 4))}).shape
        (2, 4)
    """
    if isinstance(x, Mapping) and len(x) == 1:
        return next(iter(x.values()))
    if isinstance(x, (list, tuple)) and len(x) == 1:
        return x[0]
    return x


def _predict(model: Any, x: Any, predict: Callable[[Any], Any] | None) -> Any:
    """``predict(x)`` when given (a traced serving function of the model's one input,
    by batches of 256), else ``model.predict``."""
    if predict is None:
        return model.predict(x, verbose=0, batch_size=256)
    x = one_input(x)
    dtype = predict.input_signature[0].dtype
    chunks = [predict(tf.cast(x[i : i + 256], dtype)) for i in range(0, len(x), 256)]
    return np.concatenate([np.asarray(c) for c in chunks])


def regression_scores(
    model: Any, x: Any, y: Any, predict: Callable[[Any], Any] | None = None
) -> dict[str, float]:
    """Mean absolute error and root mean squared error of ``model`` on ``(x, y)``.

    Targets of shape ``(n,)`` are compared with outputs of shape ``(n, 1)`` (and
    the reverse); otherwise the shapes must match.

    Raises:
        ValueError: the targets' shape does not match the outputs'.

    Example:
        >>> regression_scores(model, x_val, y_val)  # doctest: +SKIP
        {'mae': 0.41, 'rmse': 0.55}
    """
    return _regression_of(np.asarray(_predict(model, x, predict), dtype=np.float64), y)


def _regression_of(predicted: np.ndarray, y: Any) -> dict[str, float]:
    """:func:`regression_scores` of predictions already made."""
    target = np.asarray(y, dtype=np.float64)
    if target.shape != predicted.shape and target.size == predicted.size:
        target = target.reshape(predicted.shape)
    if target.shape != predicted.shape:
        raise ValueError(
            f"regression targets of shape {target.shape} do not match the model's outputs "
            f"{predicted.shape}: give one target per output value"
        )
    error = predicted - target
    return {"mae": float(np.mean(np.abs(error))), "rmse": float(np.sqrt(np.mean(error**2)))}


def is_classifier(model: Any) -> bool:
    """Whether reports score ``model`` as a classifier (accuracy/recall/F1).

    A compiled model is a classifier when :func:`~tf_balancer.metrics.task_metrics`
    reads its loss and output as classification; a model without a compiled loss
    is taken for a classifier (the task cannot be read from it).
    """
    return task_of(model)["classifier"]


def task_of(model: Any, outputs: Any = None) -> dict[str, bool]:
    """``{"classifier": ..., "multi_label": ...}`` read once from ``model``'s compiled
    loss and output (see :func:`is_classifier`; multi-label is binary cross-entropy
    over several outputs). The keyword arguments of :func:`task_scores` and
    :func:`evaluate_model` for an uncompiled copy of ``model``. ``outputs``: the
    output tensors, for a subclassed model (its functional twin's); defaults to
    ``model.outputs``.
    """
    if getattr(model, "loss", None) is None:
        return {"classifier": True, "multi_label": False}
    metrics = task_metrics(model, outputs)
    multi_label = any(getattr(m, "label_mode", "") == "multi_label" for m in metrics)
    return {"classifier": bool(metrics), "multi_label": multi_label}


def task_scores(
    model: Any,
    x: Any,
    y: Any,
    classifier: bool | None = None,
    num_classes: int | None = None,
    multi_label: bool | None = None,
    predict: Callable[[Any], Any] | None = None,
    heads: Sequence[Mapping[str, Any]] | None = None,
) -> dict[str, float]:
    """``accuracy``/``recall``/``f1`` for classifiers, ``mae``/``rmse`` otherwise.

    A model with several outputs is scored per output, with the output's name as
    prefix (``cls_accuracy``, ``reg_mae``): ``y`` a dict by output name or a list in
    output order; ``heads`` each output's task (:func:`~tf_balancer.metrics.output_tasks`,
    read from ``model`` when None).

    Args:
        model: the model to score.
        x: inputs.
        y: labels (class ids or one-hot) or regression targets.
        classifier: the task; None reads it from ``model`` (:func:`task_of`).
        num_classes: classes of a classifier; None reads them from the output.
        multi_label: score each output column as its own binary label; None reads
            it from ``model`` (:func:`task_of`).
        predict: a single-input, single-output model's traced serving function, used
            instead of ``model.predict``. Defaults to None.

    Returns:
        The scores by name.

    Example:
        >>> model.compile(loss="mse")  # doctest: +SKIP
        >>> sorted(task_scores(model, x_val, y_val))  # doctest: +SKIP
        ['mae', 'rmse']
    """
    if len(getattr(model, "outputs", None) or []) > 1:
        return _scores_per_output(model, x, y, heads or output_tasks(model))
    if classifier is None or multi_label is None:
        task = task_of(model)
        classifier = task["classifier"] if classifier is None else classifier
        multi_label = task["multi_label"] if multi_label is None else multi_label
    if classifier:
        return classification_scores(model, x, y, num_classes, multi_label, predict)
    return regression_scores(model, x, y, predict)


def _scores_per_output(
    model: Any, x: Any, y: Any, heads: Sequence[Mapping[str, Any]]
) -> dict[str, float]:
    predicted = model.predict(x, verbose=0, batch_size=256)
    names = [head["name"] for head in heads]
    if isinstance(predicted, Mapping):
        predicted = [predicted[name] for name in names]
    labels = [y[name] for name in names] if isinstance(y, Mapping) else list(y)
    scores = {}
    for head, out, target in zip(heads, predicted, labels, strict=True):
        if head["classifier"]:
            part = _classification_of(np.asarray(out), target, None, head["multi_label"])
        else:
            part = _regression_of(np.asarray(out, dtype=np.float64), target)
        scores.update({f"{head['name']}_{k}": v for k, v in part.items()})
    return scores


def evaluate_model(
    model: Any,
    x: Any,
    y: Any,
    num_classes: int | None = None,
    latency_batches: Sequence[int] = (1, 64),
    classifier: bool | None = None,
    multi_label: bool | None = None,
    serve: Any = None,
    heads: Sequence[Mapping[str, Any]] | None = None,
) -> dict[str, float]:
    """Task scores on ``(x, y)`` (:func:`task_scores`), plus latency per batch size.

    ``classifier`` and ``multi_label`` as in :func:`task_scores`; pass them when
    ``model`` is not compiled but the task is known (e.g. a compacted copy of a
    compiled regression model). ``serve``: the model's serving function
    (:meth:`~tf_balancer._compat.KerasAdapter.serving_function`), traced once for
    the scores (single input and output) and every latency batch size.
    """
    single = serve is not None and len(model.inputs) == 1 and len(model.outputs) == 1
    predict = serve if single else None
    shapes = input_shapes(model)  # open axes at their nominal sizes
    summary = task_scores(model, x, y, classifier, num_classes, multi_label, predict, heads)
    for batch in latency_batches:
        timed = serve if single else model
        summary[f"latency_ms_b{batch}"] = measure_latency(
            timed, shapes, batch, dtypes=[t.dtype for t in model.inputs]
        )
    return summary


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """A GitHub markdown table of ``rows`` (floats get 4 significant digits)."""

    def fmt(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        if isinstance(value, int):
            return f"{value:,}"
        return str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def write_report_png(path: str, layers: Sequence[Mapping[str, Any]], title: str = "") -> None:
    """Bar charts of per-layer attention, keep ratio and FLOPs before/after."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [row["layer"] for row in layers]
    fig, axes = plt.subplots(3, 1, figsize=(max(6, 0.5 * len(names) + 2), 8), sharex=True)
    axes[0].bar(names, [row.get("attention", 0.0) for row in layers], color="tab:purple")
    axes[0].set_ylabel("attention")
    axes[1].bar(names, [row.get("keep_ratio", 1.0) for row in layers], color="tab:green")
    axes[1].set_ylabel("keep ratio")
    axes[1].set_ylim(0, 1.05)
    idx = np.arange(len(names))
    axes[2].bar(idx - 0.2, [row.get("flops_before", 0) for row in layers], 0.4, label="before")
    axes[2].bar(idx + 0.2, [row.get("flops_after", 0) for row in layers], 0.4, label="after")
    axes[2].set_ylabel("FLOPs")
    axes[2].legend()
    axes[2].set_xticks(idx, names, rotation=60, ha="right", fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def log_layer_summaries(writer: Any, step: int, values: Mapping[str, Mapping[str, float]]) -> None:
    """TensorBoard scalars ``<kind>/<layer>`` and one histogram per kind."""
    with writer.as_default(step=step):
        for kind, per_layer in values.items():
            for layer, value in per_layer.items():
                tf.summary.scalar(f"{kind}/{layer}", value)
            if per_layer:
                tf.summary.histogram(f"{kind}/all_layers", np.asarray(list(per_layer.values())))
    writer.flush()


def write_json(path: str, data: Any) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2, default=_json_default)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


_SUMMARY_ROWS = (
    ("accuracy", "accuracy"),
    ("macro recall", "recall"),
    ("macro F1", "f1"),
    ("MAE", "mae"),
    ("RMSE", "rmse"),
    ("FLOPs", "flops"),
    ("params", "params"),
    ("latency ms (batch 1)", "latency_ms_b1"),
    ("latency ms (batch 64)", "latency_ms_b64"),
    ("SavedModel bytes", "saved_model_bytes"),
    ("SavedModel gzip bytes", "saved_model_gzip_bytes"),
)


def summary_markdown(report: dict[str, Any]) -> str:
    """Before/after markdown table of a callback report.

    The dense column names the model it describes: ``dense (epoch N)`` is the
    model after ``N`` trained epochs (the snapshot taken at the first rebalance).
    """
    epochs = report["dense"].get("trained_epochs")
    dense = "dense" if epochs is None else f"dense (epoch {epochs})"
    rows = []
    for label, key in _SUMMARY_ROWS:
        before, after = report["dense"].get(key), report["final"].get(key)
        if before is None or after is None:
            continue
        ratio = f"{after / before:.3f}x" if before else ""
        rows.append({"metric": label, dense: before, "optimized": after, "ratio": ratio})
    return markdown_table(rows, ("metric", dense, "optimized", "ratio"))

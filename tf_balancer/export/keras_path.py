"""The Keras path of :func:`~tf_balancer.export.savedmodel.optimize_saved_model`.

A SavedModel with ``keras_metadata.pb`` is loaded with tf_keras and the
configured passes run through :class:`~tf_balancer.optimizer.MetaOptimizer`,
in segments: ``prune_channels`` starts a new segment because its plan (from
:func:`~tf_balancer.attention.importance.group_scores` and
:func:`~tf_balancer.attention.balance.allocate` on the calibration data) needs
the current model, and a pruning pass ends one because the model after it, not
the source, is the reference the output is verified against. The result is
saved under every source signature.

Example:
    >>> io = io_names(model, signatures)  # doctest: +SKIP
    >>> run = optimize_keras(model, io, signatures, feed, config, (x, y), "out")  # doctest: +SKIP
    >>> run.reference_name  # doctest: +SKIP
    'model after prune_channels'
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import tensorflow as tf

from tf_balancer._compat import keras
from tf_balancer.analysis import analyze
from tf_balancer.attention.balance import Bounds, allocate
from tf_balancer.attention.importance import ProbeData, group_scores
from tf_balancer.config import OptimizeConfig
from tf_balancer.errors import ConfigError, UnsupportedModelError
from tf_balancer.export.signatures import Feed, Run, input_specs, save_signatures
from tf_balancer.input_shapes import adopt_data_shapes
from tf_balancer.optimizer import MetaOptimizer
from tf_balancer.passes.base import PassContext

__all__ = ["PRUNING_PASSES", "io_names", "optimize_keras"]

_LOG = logging.getLogger(__name__)

#: Passes that change the function: they need calibration data and reset the reference.
PRUNING_PASSES = ("prune_channels", "prune_weights")


def io_names(model: Any, signatures: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """The Keras model's input and output names, checked against every signature.

    Raises:
        UnsupportedModelError: a signature's input or output keys differ from the model's.
    """
    inputs, outputs = list(model.input_names), list(model.output_names)
    for name, sig in signatures.items():
        if set(input_specs(sig)) != set(inputs) or set(sig.structured_outputs) != set(outputs):
            raise UnsupportedModelError(
                f"signature {name!r} has inputs {sorted(input_specs(sig))} and outputs "
                f"{sorted(sig.structured_outputs)}, not the Keras model's {inputs} -> {outputs}; "
                "re-save the model with model.save(path) and its default signature"
            )
    return inputs, outputs


def _caller(model: Any, inputs: list[str], outputs: list[str]) -> Callable[[Any], dict]:
    """``feed -> {output key: tensor}`` for a Keras model or a positional function."""
    keras_model = hasattr(model, "layers")

    def call(feed: Mapping[str, Any]) -> dict[str, Any]:
        xs = [feed[key] for key in inputs]
        if keras_model:
            result = model(xs if len(xs) > 1 else xs[0], training=False)
        else:
            result = model(*xs)
        return dict(zip(outputs, tf.nest.flatten(result), strict=True))

    return call


def _taylor_loss(model: Any, x: Any, y: Any) -> Callable[[Any, Any], Any]:
    """Cross-entropy matching the labels (sparse or one-hot) and outputs (logits or probs)."""
    sample = [a[:8] for a in x] if isinstance(x, list) else x[:8]
    first = np.asarray(tf.nest.flatten(model(sample, training=False))[0])
    probs = first.min() >= 0 and np.allclose(first.sum(-1), 1.0, atol=1e-3)
    one_hot = np.ndim(y) == first.ndim and np.shape(y)[-1] == first.shape[-1] > 1
    if one_hot:
        return keras.losses.CategoricalCrossentropy(from_logits=not probs)
    return keras.losses.SparseCategoricalCrossentropy(from_logits=not probs)


def _channel_plan(model, config: OptimizeConfig, calibration, inputs, notes: list) -> Any:
    """The balancer's plan for ``prune_channels`` from importance on the calibration data."""
    balance = config.balance
    x, y = calibration
    if isinstance(x, Mapping) and set(inputs) <= set(x):
        arrays = [x[key] for key in inputs]
    elif len(inputs) == 1 and not isinstance(x, Mapping):
        arrays = [x]
    else:
        raise ConfigError(f"calibration x must be a mapping with the model's inputs {inputs}")
    dtypes = [tf.as_dtype(t.dtype).as_numpy_dtype for t in model.inputs]
    x = [np.asarray(a, dtype) for a, dtype in zip(arrays, dtypes, strict=True)]
    samples = {len(a) for a in x}
    labels = {len(leaf) for leaf in tf.nest.flatten(y)} if y is not None else samples
    if len(samples | labels) > 1:
        raise ConfigError(
            f"calibration: x and y hold different numbers of samples ({sorted(samples | labels)}); "
            "give one label per sample of x"
        )
    x = x if len(x) > 1 else x[0]
    weights = (
        {balance.importance: 1.0}
        if isinstance(balance.importance, str)
        else dict(balance.importance)
    )
    if y is None and "taylor" in weights:
        notes.append("taylor importance needs labels (calibration y); used magnitude instead")
        _LOG.warning(notes[-1])
        weights["magnitude"] = weights.get("magnitude", 0.0) + weights.pop("taylor")
    loss = _taylor_loss(model, x, y) if "taylor" in weights else None
    analysis = analyze(model)
    scores = group_scores(analysis.graph, ProbeData(x, y, loss=loss), weights)
    bounds = Bounds(balance.min_keep, balance.max_prune_fraction, balance.round_to)
    plan = allocate(
        analysis, scores, balance.target, balance.target_metric, balance.strategy, bounds
    )
    notes.append(
        f"prune_channels plan ({balance.strategy}, importance {sorted(weights)}): keeps "
        f"{plan.achieved:.1%} of the {balance.target_metric} (target {balance.target:.1%})"
    )
    return plan


def _segments(passes: tuple[str, ...]) -> list[list[str]]:
    """Split before ``prune_channels`` (its plan needs the current model), after pruning,
    and before ``grappler`` (the Keras model before it is the one written)."""
    segments: list[list[str]] = [[]]
    for name in passes:
        if name in ("prune_channels", "grappler") and segments[-1]:
            segments.append([])
        segments[-1].append(name)
        if name in PRUNING_PASSES:
            segments.append([])
    return [s for s in segments if s]


def _pass_context(config: OptimizeConfig, probe: Any) -> PassContext:
    """Probe inputs, and ``prune_weights`` options from ``config.sparsity``."""
    options = {}
    if config.sparsity is not None:  # begin/end_step and frequency apply to fine-tuning only
        sp = config.sparsity
        keys = {"target_sparsity": sp.target_sparsity, "strategy": sp.strategy}
        options["prune_weights"] = {**keys, "m_by_n": sp.m_by_n}
    return PassContext(probe_inputs=probe, options=options)


def optimize_keras(
    model: Any,
    io: tuple[list[str], list[str]],
    signatures: Mapping[str, Any],
    feed: Feed,
    config: OptimizeConfig,
    calibration: Any,
    path: str,
) -> Run:
    """Run the passes in segments (see :func:`_segments`), save under every signature.

    The result is written as a Keras SavedModel of the last Keras model (loadable
    with ``tf_keras.models.load_model`` like the source); when Grappler ran last its
    graph is verified but not written (a note says so), since TensorFlow runs
    Grappler on the signatures when they execute.

    Args:
        model: the Keras model loaded from the SavedModel.
        io: its input and output names, from :func:`io_names`.
        signatures: signature name -> source signature.
        feed: the main signature's probe inputs (input key -> array).
        config: the recipe.
        calibration: ``(x, y)`` or None; ``prune_channels`` needs it.
        path: the directory to save the result in.

    Returns:
        The pass records, notes and the reference to verify against.
    """
    inputs, outputs = io
    probe = [feed[key] for key in inputs]
    adopt_data_shapes(model, probe)  # the feed's sizes, for open input axes
    ctx = _pass_context(config, probe if len(probe) > 1 else probe[0])
    records, notes, run = [], [], Run([], [])
    for segment in _segments(config.passes):
        if segment[0] == "prune_channels":
            plan = _channel_plan(model, config, calibration, inputs, notes)
            ctx = dataclasses.replace(ctx, plan=plan)
        tol = config.verify
        optimizer = MetaOptimizer(
            segment, rtol=tol.rtol, atol=tol.atol, fail_on_error=config.fail_on_error
        )
        last_keras = model
        model, report = optimizer.run(model, ctx)
        if isinstance(model, keras.Model):
            last_keras = model
        records += [dataclasses.asdict(r) for r in report.records]
        if any(r.name in PRUNING_PASSES and r.status == "applied" for r in report.records):
            run = Run([], [], _caller(model, inputs, outputs), f"model after {segment[-1]}")
    keras_model = model if isinstance(model, keras.Model) else last_keras
    if keras_model is not model:
        notes.append(
            "grappler's frozen graph is not written: the result is a Keras SavedModel "
            "(tf_keras.models.load_model works, as on the source) whose signatures call the "
            "model before Grappler; TensorFlow applies Grappler to them when they run"
        )
    call = _caller(keras_model, inputs, outputs)
    save_signatures(
        dict.fromkeys(signatures, call),
        signatures,
        path,
        keras_model.weights,
        keras_model=keras_model,
    )
    return dataclasses.replace(run, records=records, notes=notes)

"""Optimize a SavedModel on disk: passes, same serving signatures, verification, report.

:func:`optimize_saved_model` reads a SavedModel, optimizes it and writes a new
SavedModel whose signatures have the same names, input keys, output keys,
dtypes and shapes, plus ``tf_balancer_report.json``. Two kinds of source:

* **Keras** (``keras_metadata.pb`` present): the model is loaded with tf_keras
  and the configured passes run through :class:`~tf_balancer.optimizer.MetaOptimizer`
  (``prune_channels`` gets a plan from :func:`~tf_balancer.attention.importance.group_scores`
  and :func:`~tf_balancer.attention.balance.allocate` on the calibration data).
* **Plain** (e.g. a ``tf.Module``): each signature is frozen, its batch norms
  folded (``fold_batchnorm``) and Grappler run (``grappler``) on the GraphDef;
  passes that need a Keras model are skipped and noted in the report.

The output is checked against the source (or, after a pruning pass, against
the pruned model) on calibration inputs or seeded random ones; outside
``config.verify`` tolerances nothing is written. The output is built in a
temporary directory next to ``dst`` and renamed into place only at the end;
``src`` is only read.

Example:
    >>> report = optimize_saved_model("model", "model_opt", "configs/lossless.yaml")  # doctest: +SKIP
    >>> report["before"]["flops"], report["after"]["flops"]  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import tensorflow as tf
from tensorflow.python.framework import ops as tf_ops
from tensorflow.python.saved_model import loader_impl

from tf_balancer._compat import keras
from tf_balancer.analysis import analyze, load_model
from tf_balancer.attention.balance import Bounds, allocate
from tf_balancer.attention.importance import ProbeData, group_scores
from tf_balancer.config import OptimizeConfig, load_config
from tf_balancer.errors import (
    ConfigError,
    ExportError,
    ModelLoadError,
    PassError,
    UnsupportedModelError,
    VerificationError,
)
from tf_balancer.graph.graphdef_fold import fold_batchnorm_graphdef
from tf_balancer.graph.grappler import graph_def_to_function, op_type_counts, run_grappler
from tf_balancer.graph.trace import load_saved_model, op_flops, trace_function
from tf_balancer.optimizer import MetaOptimizer
from tf_balancer.passes.base import PassContext
from tf_balancer.report import atomic_directory, directory_size, write_json

__all__ = ["optimize_saved_model", "format_summary", "REPORT_NAME", "KERAS_ONLY_PASSES"]

_LOG = logging.getLogger(__name__)

REPORT_NAME = "tf_balancer_report.json"
#: Passes that rewrite Keras layers; a plain SavedModel skips them.
KERAS_ONLY_PASSES = ("strip_training_ops", "fuse_activation", "prune_channels", "prune_weights")
_PRUNING = ("prune_channels", "prune_weights")
_FUSED_BASE = {
    "_FusedConv2D": "Conv2D",
    "_FusedDepthwiseConv2dNative": "DepthwiseConv2dNative",
    "_FusedMatMul": "MatMul",
}
_COUNTED_FUSIONS = (b"BiasAdd", b"Add", b"AddV2")  # TF's profiler counts 1 FLOP per element
_CALIBRATION_HINT = "pass calibration_data=(x, y) (CLI: --calibration data.npz with arrays x, y)"

Feed = dict[str, np.ndarray]


# --------------------------------------------------------------------------- checks


def _check_source(src: str) -> None:
    if not os.path.exists(src):
        raise ModelLoadError(f"{src}: no such file or directory; give a SavedModel directory")
    if not tf.saved_model.contains_saved_model(src):
        raise ModelLoadError(f"{src}: not a SavedModel directory (no saved_model.pb inside)")
    try:
        loader_impl.parse_saved_model(src)
    except Exception as err:  # corrupt protos raise several error types
        raise ModelLoadError(
            f"{src}: saved_model.pb is corrupt or unreadable; re-export the model"
        ) from err


def _check_destination(src: str, dst: str, overwrite: bool) -> None:
    real_src, real_dst = os.path.realpath(src), os.path.realpath(dst)
    if real_src == real_dst:
        raise ExportError(f"{dst}: the output must differ from the source; choose another path")
    if os.path.commonpath([real_src, real_dst]) in (real_src, real_dst):
        raise ExportError(
            f"{dst}: the output and the source {src} must not contain each other; "
            "choose an output outside the source directory"
        )
    if os.path.lexists(dst) and not overwrite:
        raise ExportError(
            f"{dst} already exists; pass overwrite=True (CLI: --overwrite) or choose another path"
        )


def _resolve_config(config: OptimizeConfig | str | os.PathLike | None) -> OptimizeConfig:
    if config is None:
        return OptimizeConfig()
    if isinstance(config, OptimizeConfig):
        return config
    if isinstance(config, (str, os.PathLike)):
        return load_config(config)
    raise ConfigError(f"config: got a {type(config).__name__}; give an OptimizeConfig or a path")


def _calibration(data: Any) -> tuple[Any, Any] | None:
    """``(x, y)`` from an array, an ``(x, y)`` tuple, a mapping or a ``.npz`` path."""
    if isinstance(data, (str, os.PathLike)):
        try:
            loaded = np.load(os.fspath(data), allow_pickle=False)
            data = dict(loaded.items()) if hasattr(loaded, "files") else loaded
        except Exception as err:  # missing file, not a zip, bad array: all one fix
            raise ConfigError(
                f"calibration data {os.fspath(data)!r} is not a readable .npz file ({err}); "
                "write one with np.savez(path, x=inputs, y=labels)"
            ) from err
    if data is None or (isinstance(data, tuple) and len(data) == 2):
        return data
    if isinstance(data, Mapping) and "x" in data:
        return data["x"], data.get("y")
    if isinstance(data, np.ndarray):
        return data, None
    raise ConfigError(
        "calibration data must be an array x, a tuple (x, y), a mapping with key 'x' "
        "(and optional 'y') or a .npz file holding arrays x and y"
    )


def _require_calibration(config: OptimizeConfig, calibration: Any) -> None:
    asked = [name for name in config.passes if name in _PRUNING]
    if asked and calibration is None:
        raise ConfigError(
            f"passes {asked} need calibration data (for importance scores and probe inputs); "
            f"{_CALIBRATION_HINT}, or use a recipe without pruning such as configs/lossless.yaml"
        )


# --------------------------------------------------------------------------- inputs


def _kw_specs(signature: Any) -> dict[str, tf.TensorSpec]:
    return dict(signature.structured_input_signature[1])


def _feed(signature: Any, calibration: Any, batch: int, seed: int = 0) -> tuple[Feed, str]:
    """Inputs for one signature: the first ``batch`` calibration samples, else seeded random.

    Random inputs are uniform in [0, 1) for float inputs and zeros otherwise; an
    unknown batch axis gets ``batch`` rows and any other unknown dimension 1.
    """
    specs = _kw_specs(signature)
    x = None if calibration is None else calibration[0]
    if isinstance(x, np.ndarray) and len(specs) == 1:
        x = {next(iter(specs)): x}
    if isinstance(x, Mapping) and set(specs) <= set(x):
        feed = {}
        for key, spec in specs.items():
            array = np.asarray(x[key])[:batch].astype(spec.dtype.as_numpy_dtype)
            if not spec.shape.is_compatible_with(array.shape):
                raise ConfigError(
                    f"calibration x for input {key!r} has shape {array.shape[1:]} per sample; "
                    f"the SavedModel expects {tuple(spec.shape)[1:]}"
                )
            feed[key] = array
        return feed, "calibration"
    rng = np.random.default_rng(seed)
    feed = {}
    for key, spec in sorted(specs.items()):
        dims = [batch] if spec.shape.rank is None else list(spec.shape)
        shape = [batch if i == 0 and d is None else (d or 1) for i, d in enumerate(dims)]
        if spec.dtype.is_floating:
            feed[key] = rng.random(shape).astype(spec.dtype.as_numpy_dtype)
        else:  # zeros are valid indices, ids and strings
            feed[key] = tf.zeros(shape, spec.dtype).numpy()
    return feed, "random"


def _call(signature: Any, feed: Feed) -> dict[str, np.ndarray]:
    outputs = signature(**{k: tf.constant(v) for k, v in feed.items()})
    return {k: np.asarray(v) for k, v in outputs.items()}


# --------------------------------------------------------------------------- Keras


@dataclasses.dataclass(frozen=True)
class _Run:
    """What the optimization did: records, notes, and the verification reference."""

    records: list[dict[str, Any]]
    notes: list[str]
    reference: Callable[[Feed], Mapping[str, Any]] | None = None  # None: the source
    reference_name: str = "source"


def _io_names(model: Any, signatures: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    inputs, outputs = list(model.input_names), list(model.output_names)
    for name, sig in signatures.items():
        if set(_kw_specs(sig)) != set(inputs) or set(sig.structured_outputs) != set(outputs):
            raise UnsupportedModelError(
                f"signature {name!r} has inputs {sorted(_kw_specs(sig))} and outputs "
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
    dtypes = [t.dtype.as_numpy_dtype for t in model.inputs]
    x = [np.asarray(a, dtype) for a, dtype in zip(arrays, dtypes, strict=True)]
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
    """Split before ``prune_channels`` (its plan needs the current model) and after pruning."""
    segments: list[list[str]] = [[]]
    for name in passes:
        if name == "prune_channels" and segments[-1]:
            segments.append([])
        segments[-1].append(name)
        if name in _PRUNING:
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


def _optimize_keras(model, io, signatures, feed, config, calibration, path) -> _Run:
    """Run the passes in segments (see :func:`_segments`), save under every signature."""
    inputs, outputs = io
    probe = [feed[key] for key in inputs]
    ctx = _pass_context(config, probe if len(probe) > 1 else probe[0])
    records, notes, run = [], [], _Run([], [])
    for segment in _segments(config.passes):
        if segment[0] == "prune_channels":
            plan = _channel_plan(model, config, calibration, inputs, notes)
            ctx = dataclasses.replace(ctx, plan=plan)
        tol = config.verify
        optimizer = MetaOptimizer(
            segment, rtol=tol.rtol, atol=tol.atol, fail_on_error=config.fail_on_error
        )
        model, report = optimizer.run(model, ctx)
        records += [dataclasses.asdict(r) for r in report.records]
        if any(r.name in _PRUNING and r.status == "applied" for r in report.records):
            run = _Run([], [], _caller(model, inputs, outputs), f"model after {segment[-1]}")
    call = _caller(model, inputs, outputs)
    _save(dict.fromkeys(signatures, call), signatures, path, getattr(model, "weights", ()))
    return dataclasses.replace(run, records=records, notes=notes)


def _save(calls: Mapping[str, Callable], signatures: Mapping[str, Any], path: str, track=()):
    """Save ``calls[name]`` under each source signature (same input specs, output keys)."""
    root = tf.Module()
    root.captured = list(track)  # the variables the signatures read, if any
    functions = {
        name: _serving(calls[name]).get_concrete_function(**_kw_specs(sig))
        for name, sig in signatures.items()
    }
    tf.saved_model.save(root, path, signatures=functions)


def _serving(call: Callable) -> Any:
    def serve(**feed):
        return call(feed)

    return tf.function(serve)


# --------------------------------------------------------------------------- plain


def _graph_step(records, name, signature, fail_on_error, step, graph_def):
    """Run ``step(graph_def) -> (graph_def, message, stats)``; roll back a failure."""
    start = time.perf_counter()
    try:
        new, message, stats = step(graph_def)
    except Exception as err:  # a failing step is rolled back, as MetaOptimizer does
        if fail_on_error:
            raise PassError(f"pass {name!r} failed on signature {signature!r}: {err}") from err
        _LOG.warning("pass %s failed on %s and was rolled back: %s", name, signature, err)
        new, message, stats = graph_def, f"error: {err}", {}
        status = "rolled_back"
    else:
        status = "applied" if stats.get("changed", True) else "unchanged"
    records.append(
        {
            "name": name,
            "signature": signature,
            "status": status,
            "message": message,
            "seconds": time.perf_counter() - start,
            "stats": stats,
        }
    )
    return new


def _optimize_signature(name: str, signature: Any, config: OptimizeConfig, records: list) -> Any:
    frozen = trace_function(signature, batch_size=None).function
    inputs = [t.name for t in frozen.inputs]
    fetches = [t.name for t in frozen.outputs]
    outputs = tf.nest.pack_sequence_as(signature.structured_outputs, fetches)
    graph_def = frozen.graph.as_graph_def()
    keep = {ref.split(":")[0] for ref in inputs + fetches}

    def fold(gd):
        folded, stats = fold_batchnorm_graphdef(gd, protected=keep)
        stats = {
            "changed": stats["folds"] > 0,
            "folds": stats["folds"],
            "skipped": stats["skipped"],
        }
        return folded, f"folded {stats['folds']} batch norm(s)", stats

    def grappler(gd):
        optimized = run_grappler(gd, inputs, fetches, fail_on_error=config.fail_on_error)
        stats = {"nodes_before": len(gd.node), "nodes_after": len(optimized.node)}
        return optimized, f"{len(gd.node)} -> {len(optimized.node)} graph nodes", stats

    for pass_name, step in (("fold_batchnorm", fold), ("grappler", grappler)):
        if pass_name in config.passes:
            graph_def = _graph_step(records, pass_name, name, config.fail_on_error, step, graph_def)
    function = graph_def_to_function(graph_def, inputs, outputs)
    keys = sorted(_kw_specs(signature))  # the frozen inputs follow the sorted keyword order
    return lambda feed: function(*[feed[key] for key in keys])


def _optimize_plain(signatures: Mapping[str, Any], config: OptimizeConfig, path: str) -> _Run:
    records: list[dict[str, Any]] = []
    skipped = [name for name in config.passes if name in KERAS_ONLY_PASSES]
    notes = [f"skipped {name}: it needs a Keras SavedModel (keras_metadata.pb)" for name in skipped]
    calls = {
        name: _optimize_signature(name, sig, config, records) for name, sig in signatures.items()
    }
    _save(calls, signatures, path)
    return _Run(records, notes)


# --------------------------------------------------------------------------- verify, stats


def _specs(signature: Any) -> tuple[dict, dict]:
    as_plain = lambda d: {k: (v.dtype.name, v.shape.as_list()) for k, v in d.items()}  # noqa: E731
    return as_plain(_kw_specs(signature)), as_plain(signature.structured_outputs)


def _verify_one(name: str, expected: Mapping, output: Any, feed: Feed, tol: Any) -> dict:
    """Max abs/rel difference of one signature's outputs; raise outside ``tol``."""
    actual = _call(output, feed)
    worst_abs = worst_rel = 0.0
    for key, e in sorted(expected.items()):
        e, a = np.asarray(e), actual[key]
        if a.shape != e.shape or a.dtype != e.dtype:
            raise VerificationError(
                f"signature {name!r} output {key!r} is {a.dtype}{a.shape}, not {e.dtype}{e.shape}"
            )
        diff = np.abs(e.astype(np.float64) - a.astype(np.float64))
        worst_abs = max(worst_abs, float(diff.max(initial=0.0)))
        worst_rel = max(worst_rel, float((diff / (np.abs(e) + 1e-12)).max(initial=0.0)))
        if not np.allclose(a, e, rtol=tol.rtol, atol=tol.atol):
            raise VerificationError(
                f"signature {name!r} output {key!r} differs by up to {worst_abs:.3g} "
                f"(rtol={tol.rtol:g}, atol={tol.atol:g}); nothing was written. Loosen the "
                "verify tolerances of the config or remove the pass that changes the outputs"
            )
    return {"max_abs_diff": worst_abs, "max_rel_diff": worst_rel}


def _verify(run: _Run, source: Mapping, output: Any, feeds: Mapping, tol: Any) -> dict:
    """Same signatures (names, keys, dtypes, shapes) and outputs within ``tol`` of the reference."""
    results = {}
    for name, (feed, origin) in feeds.items():
        mine = output.signatures.get(name)
        if mine is None or _specs(mine) != _specs(source[name]):
            found = None if mine is None else _specs(mine)
            raise VerificationError(
                f"signature {name!r} changed: {found} instead of {_specs(source[name])}"
            )
        expected = run.reference(feed) if run.reference else _call(source[name], feed)
        numbers = _verify_one(name, expected, mine, feed, tol)
        results[name] = {"inputs": origin, "batch": len(next(iter(feed.values()))), **numbers}
    return results


def _flops(graph: tf.Graph) -> int:
    """TF profiler FLOPs; a Grappler-fused op counts as its base op plus its fused adds."""
    flops = op_flops(graph)
    for op in graph.get_operations():
        base = _FUSED_BASE.get(op.type)
        if base and not flops.get(op.name):
            node_def = type(op.node_def)()
            node_def.CopyFrom(op.node_def)
            node_def.op = base
            value = tf_ops.get_stats_for_node_def(graph, node_def, "flops").value or 0
            elements = op.outputs[0].shape.num_elements() or 0
            adds = [f for f in op.get_attr("fused_ops") if f in _COUNTED_FUSIONS]
            flops[op.name] = int(value) + elements * len(adds)
    return sum(flops.values())


def _graph_stats(signature: Any) -> dict[str, Any]:
    """Ops per type, FLOPs and params (float constant elements) at batch 1."""
    traced = trace_function(signature, batch_size=1)
    params = 0
    for node in traced.graph_def.node:
        if node.op == "Const" and tf.as_dtype(node.attr["dtype"].type).is_floating:
            params += int(np.prod([d.size for d in node.attr["value"].tensor.tensor_shape.dim]))
    ops = op_type_counts(traced.graph_def)
    return {"nodes": sum(ops.values()), "ops": ops, "flops": _flops(traced.graph), "params": params}


# --------------------------------------------------------------------------- entry point


def optimize_saved_model(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    config: OptimizeConfig | str | os.PathLike | None = None,
    calibration_data: Any = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Optimize the SavedModel ``src`` into ``dst`` (same signatures) and report.

    Args:
        src: a SavedModel directory (Keras or plain); never modified.
        dst: the output directory; must not be ``src``, inside it, or contain it.
        config: an :class:`~tf_balancer.config.OptimizeConfig`, the path of a YAML
            recipe, or None for ``OptimizeConfig()`` (the lossless passes).
        calibration_data: inputs (array, or mapping input key -> array) and labels:
            an array ``x``, a tuple ``(x, y)``, a mapping with ``x`` and optional
            ``y``, or the path of a ``.npz`` holding them. Pruning passes need it;
            verification uses its first ``verify.probe_batch_size`` samples
            (seeded random inputs of each signature's shape without it).
        overwrite: replace ``dst`` if it exists (only once the result is verified).

    Returns:
        The report, also written to ``dst/tf_balancer_report.json``: ``kind``
        (``"keras"`` or ``"plain"``), ``before``/``after`` (ops per type, FLOPs
        and params at batch 1 of the main signature, ``bytes`` on disk),
        ``passes`` (one record per pass, per signature for plain models),
        ``notes``, ``signatures`` and ``verification`` (max abs/rel difference
        per signature).

    Raises:
        ModelLoadError: ``src`` is missing, not a SavedModel or unreadable.
        ExportError: ``dst`` is ``src``, nested with it, or exists without ``overwrite``.
        ConfigError: a bad config, or a pruning pass without calibration data.
        VerificationError: the result differs from the reference beyond tolerance.

    Example:
        >>> report = optimize_saved_model("cnn", "cnn_50", "configs/structured_50_flops.yaml",
        ...                               calibration_data="calib.npz")  # doctest: +SKIP
    """
    start = time.perf_counter()
    src, dst = os.path.abspath(os.fspath(src)), os.path.abspath(os.fspath(dst))
    _check_source(src)
    _check_destination(src, dst, overwrite)
    config = _resolve_config(config)
    calibration = _calibration(calibration_data)
    _require_calibration(config, calibration)
    loaded = load_saved_model(src)  # keep alive: its signatures read its variables
    signatures = dict(loaded.signatures)
    if not signatures:
        raise ModelLoadError(f"{src}: the SavedModel has no signatures; export one to optimize")
    feeds = {
        n: _feed(s, calibration, config.verify.probe_batch_size) for n, s in signatures.items()
    }
    main = "serving_default" if "serving_default" in signatures else sorted(signatures)[0]
    before = {**_graph_stats(signatures[main]), "bytes": directory_size(src)}
    model = load_model(src)
    io = None if model is None else _io_names(model, signatures)
    with atomic_directory(dst, overwrite=overwrite) as tmp:
        if model is None:
            run = _optimize_plain(signatures, config, tmp)
        else:
            run = _optimize_keras(model, io, signatures, feeds[main][0], config, calibration, tmp)
        output = tf.saved_model.load(tmp)
        verification = _verify(run, signatures, output, feeds, config.verify)
        report = {
            "source": src,
            "output": dst,
            "kind": "plain" if model is None else "keras",
            "config": config.to_dict(),
            "signature": main,
            "signatures": {name: list(_specs(sig)) for name, sig in signatures.items()},
            "before": before,
            "after": {**_graph_stats(output.signatures[main]), "bytes": directory_size(tmp)},
            "passes": run.records,
            "notes": run.notes,
            "verification": {"reference": run.reference_name, "signatures": verification},
            "seconds": time.perf_counter() - start,
        }
        write_json(os.path.join(tmp, REPORT_NAME), report)
        with open(os.path.join(tmp, REPORT_NAME), encoding="utf-8") as handle:
            report = json.load(handle)  # the returned report is exactly the file's
    _LOG.info("optimized %s -> %s in %.1f s", src, dst, report["seconds"])
    return report


def format_summary(report: Mapping[str, Any]) -> str:
    """A few lines for the CLI: sizes, FLOPs, params, ops, passes and verification."""
    b, a = report["before"], report["after"]
    lines = [
        f"optimized {report['source']} -> {report['output']} ({report['kind']} SavedModel)",
        f"  size:   {b['bytes']:,} -> {a['bytes']:,} bytes",
        f"  FLOPs:  {b['flops']:,} -> {a['flops']:,} (batch 1, {report['signature']})",
        f"  params: {b['params']:,} -> {a['params']:,}",
        f"  ops:    {b['nodes']:,} -> {a['nodes']:,} graph nodes",
    ]
    for record in report["passes"]:
        where = f" [{record['signature']}]" if "signature" in record else ""
        lines.append(f"  pass {record['name']}{where}: {record['status']} {record['message']}")
    lines += [f"  note: {note}" for note in report["notes"]]
    verification = report["verification"]
    for name, v in verification["signatures"].items():
        lines.append(
            f"  verified {name} against the {verification['reference']} on {v['batch']} "
            f"{v['inputs']} samples: max abs diff {v['max_abs_diff']:.3g}"
        )
    return "\n".join(lines)

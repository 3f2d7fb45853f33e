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

This module checks the inputs and puts the report together; the two paths are
:mod:`tf_balancer.export.keras_path` and :mod:`tf_balancer.export.graph_path`,
and :mod:`tf_balancer.export.signatures` feeds, saves and verifies signatures.

Example:
    >>> report = optimize_saved_model("model", "model_opt", "configs/lossless.yaml")  # doctest: +SKIP
    >>> report["before"]["flops"], report["after"]["flops"]  # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import tensorflow as tf
from tensorflow.python.saved_model import loader_impl

from tf_balancer._quiet import quietly
from tf_balancer.analysis import load_model
from tf_balancer.config import OptimizeConfig, load_config
from tf_balancer.errors import ConfigError, ExportError, ModelLoadError
from tf_balancer.export.graph_path import graph_stats, optimize_signatures
from tf_balancer.export.keras_path import PRUNING_PASSES, io_names, optimize_keras
from tf_balancer.export.signatures import (
    Run,
    make_feed,
    plain_specs,
    save_signatures,
    size_open_axes,
    source_endpoints,
    verify_signatures,
)
from tf_balancer.export.tflite import check_options as check_tflite_options
from tf_balancer.export.writers import atomic_directory
from tf_balancer.graph.trace import load_saved_model
from tf_balancer.input_shapes import nominal_shapes, set_nominal_shapes
from tf_balancer.report import directory_size, write_json

__all__ = ["optimize_saved_model", "format_summary", "REPORT_NAME", "KERAS_ONLY_PASSES"]

_LOG = logging.getLogger(__name__)

REPORT_NAME = "tf_balancer_report.json"
#: Passes that rewrite Keras layers; a plain SavedModel skips them.
KERAS_ONLY_PASSES = ("strip_training_ops", "fuse_activation", "prune_channels", "prune_weights")
_CALIBRATION_HINT = "pass calibration_data=(x, y) (CLI: --calibration data.npz with arrays x, y)"


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
    asked = [name for name in config.passes if name in PRUNING_PASSES]
    if asked and calibration is None:
        raise ConfigError(
            f"passes {asked} need calibration data (for importance scores and probe inputs); "
            f"{_CALIBRATION_HINT}, or use a recipe without pruning such as configs/lossless.yaml"
        )


def _require_keras_for_pruning(config: OptimizeConfig, model: Any, src: str) -> None:
    """A pruning recipe on a SavedModel without Keras layers would prune nothing."""
    asked = [name for name in config.passes if name in PRUNING_PASSES]
    if asked and model is None:
        raise ConfigError(
            f"passes {asked} need a Keras SavedModel (keras_metadata.pb, as tf_keras model.save "
            f"writes), and {src} has none (e.g. a Keras 3 model.export): prune the Keras model "
            "in Python (tfb.prune(model, ...), then export it), or use a recipe without "
            "pruning such as configs/lossless.yaml"
        )


def _export_tflite(
    source: Any, saved_model: str, quantize: str | None, calibration: Any
) -> dict[str, Any]:
    """``model.tflite`` next to the optimized SavedModel, verified against it.

    Converted from ``source``: the optimized Keras model, or for a plain SavedModel
    its source (its passes only fold BatchNorm and run Grappler, which TFLite's
    converter does its own way; Grappler's fused ops have no TFLite kernel).
    """
    from tf_balancer.export.tflite import export_tflite

    x, y = calibration if calibration is not None else (None, None)
    if isinstance(x, Mapping):
        x = next(iter(x.values())) if len(x) == 1 else None
    result = export_tflite(
        source,
        os.path.join(saved_model, "model.tflite"),
        reference=saved_model,
        quantize=quantize,
        calibration=x,
        validation_data=None if x is None else (x, y),
    )
    return result.report_entry()


# --------------------------------------------------------------------------- plain


def _optimize_plain(loaded: Any, signatures: Mapping[str, Any], config, path: str) -> Run:
    skipped = [name for name in config.passes if name in KERAS_ONLY_PASSES]
    notes = [f"skipped {name}: it needs a Keras SavedModel (keras_metadata.pb)" for name in skipped]
    calls, records = optimize_signatures(signatures, config)
    endpoints = source_endpoints(loaded, signatures)
    save_signatures(calls, signatures, path, endpoints=endpoints)
    notes += [f"kept endpoint {name}(...) of the source" for name in endpoints]
    return Run(records, notes)


# --------------------------------------------------------------------------- entry point


@quietly
def optimize_saved_model(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    config: OptimizeConfig | str | os.PathLike | None = None,
    calibration_data: Any = None,
    overwrite: bool = False,
    tflite: bool = False,
    quantize: str | None = None,
    input_shape: Any = None,
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
        tflite: also write ``dst/model.tflite``, converted from the optimized
            SavedModel and verified against it (on the calibration data, else on
            seeded random inputs); its result is the report's ``tflite`` entry.
        quantize: with ``tflite``: None (float32), ``"dynamic"`` or ``"int8"``
            (``"int8"`` calibrates on ``calibration_data``, which it then needs).
        input_shape: for inputs with open axes besides the batch (text of any
            length, images of any size), the sizes FLOPs are counted and random
            inputs made at: a shape without the batch axis, or a list of them in
            the order of the signature's input keys. Defaults to the calibration
            data's shape. The output keeps the open axes.

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
        ConfigError: a bad config, a pruning pass or int8 quantization without
            calibration data, a pruning pass on a plain SavedModel, or ``quantize``
            without ``tflite``.
        VerificationError: the result (or its TFLite model) differs from the
            reference beyond tolerance.

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
    check_tflite_options(tflite, quantize, calibration is not None)
    loaded = load_saved_model(src)  # keep alive: its signatures read its variables
    signatures = dict(loaded.signatures)
    if not signatures:
        raise ModelLoadError(f"{src}: the SavedModel has no signatures; export one to optimize")
    for signature in signatures.values():
        size_open_axes(signature, input_shape, calibration)
    feeds = {
        n: make_feed(s, calibration, config.verify.probe_batch_size) for n, s in signatures.items()
    }
    main = "serving_default" if "serving_default" in signatures else sorted(signatures)[0]
    before = {**graph_stats(signatures[main]), "bytes": directory_size(src)}
    model = load_model(src)
    _require_keras_for_pruning(config, model, src)
    io = None if model is None else io_names(model, signatures)
    with atomic_directory(dst, overwrite=overwrite) as tmp:
        if model is None:
            run = _optimize_plain(loaded, signatures, config, tmp)
        else:
            run = optimize_keras(model, io, signatures, feeds[main][0], config, calibration, tmp)
        output = tf.saved_model.load(tmp)
        for name, signature in output.signatures.items():  # counted at the source's sizes
            if name in signatures and nominal_shapes(signatures[name]) is not None:
                set_nominal_shapes(signature, nominal_shapes(signatures[name]))
        verification = verify_signatures(run, signatures, output, feeds, config.verify)
        report = {
            "source": src,
            "output": dst,
            "kind": "plain" if model is None else "keras",
            "config": config.to_dict(),
            "signature": main,
            "signatures": {name: list(plain_specs(sig)) for name, sig in signatures.items()},
            "before": before,
            "after": {**graph_stats(output.signatures[main]), "bytes": directory_size(tmp)},
            "passes": run.records,
            "notes": run.notes,
            "verification": {"reference": run.reference_name, "signatures": verification},
            "seconds": time.perf_counter() - start,
        }
        if tflite:
            source = src if model is None else load_model(tmp)
            report["tflite"] = _export_tflite(source, tmp, quantize, calibration)
        write_json(os.path.join(tmp, REPORT_NAME), report)
        with open(os.path.join(tmp, REPORT_NAME), encoding="utf-8") as handle:
            report = json.load(handle)  # the returned report is exactly the file's
    _LOG.info("optimized %s -> %s in %.1f s", src, dst, report["seconds"])
    return report


def _uncounted(before: Mapping[str, Any], after: Mapping[str, Any]) -> str:
    """A note when TF's profiler could not count every op of either graph."""
    hidden = before.get("flops_hidden") or after.get("flops_hidden")
    return f"; not all counted: {hidden}" if hidden else ""


def format_summary(report: Mapping[str, Any]) -> str:
    """A few lines for the CLI: sizes, FLOPs, params, ops, passes and verification."""
    b, a = report["before"], report["after"]
    lines = [
        f"optimized {report['source']} -> {report['output']} ({report['kind']} SavedModel)",
        f"  size:   {b['bytes']:,} -> {a['bytes']:,} bytes",
        f"  FLOPs:  {b['flops']:,} -> {a['flops']:,} (batch 1, {report['signature']})"
        + _uncounted(b, a),
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
    lite = report.get("tflite")
    if lite:
        accuracy = (
            f", accuracy {lite['accuracy']:.2f}% (SavedModel {lite['reference_accuracy']:.2f}%)"
            if lite.get("accuracy") is not None
            else ""
        )
        lines.append(
            f"  tflite {lite['path']} ({lite['quantize'] or 'float32'}): {lite['bytes']:,} bytes, "
            f"max abs diff {lite['max_abs_diff']:.3g} on {lite['samples']} samples{accuracy}, "
            f"{lite['latency_ms']:.3f} ms at batch 1"
        )
    return "\n".join(lines)

"""Atomic writers: a result directory appears whole or not at all.

Example:
    >>> with atomic_directory("/tmp/out", overwrite=True) as tmp:  # doctest: +SKIP
    ...     write_files(tmp)
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from collections.abc import Mapping
from typing import Any

from tf_balancer._compat import adapter_for, is_keras_model
from tf_balancer._quiet import quietly
from tf_balancer.errors import ExportError
from tf_balancer.report import markdown_table, summary_markdown, write_json, write_report_png
from tf_balancer.verify import random_inputs

__all__ = ["atomic_directory", "export_result"]

_umask_lock = threading.Lock()


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows.

    Linux reports it in ``/proc/self/status``; elsewhere it is read by setting and
    restoring it (under a lock, so two tf_balancer threads never interleave).

    Example:
        >>> 0 <= current_umask() <= 0o777
        True
    """
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _umask_lock:
        mask = os.umask(0o077)
        os.umask(mask)
    return mask


class atomic_directory:  # noqa: N801  (used as a context manager, like tempfile's)
    """Write a directory atomically: build it in a temp dir, then rename into place.

    The temp dir is private (0700) while it is written; before the rename it gets
    the mode ``os.makedirs`` would give (``0o777 & ~umask``), so a result written
    under umask 022 is readable by other users (e.g. TF Serving).

    Example:
        >>> with atomic_directory("/tmp/out", overwrite=True) as tmp:  # doctest: +SKIP
        ...     write_files(tmp)

    Raises:
        ExportError: ``path`` exists and ``overwrite`` is False, ``overwrite`` would
            replace the working directory or one holding it, or ``path``'s parent
            cannot be created or written to (on entering).
    """

    def __init__(self, path: str | os.PathLike, overwrite: bool = False):
        self.path = os.path.abspath(os.fspath(path))
        self.overwrite = overwrite
        if os.path.exists(self.path) and not overwrite:
            raise ExportError(
                f"{self.path} already exists; pass overwrite=True (CLI: --overwrite) or choose another path"
            )
        cwd = os.path.realpath(os.getcwd())
        if overwrite and os.path.isdir(self.path) and _contains(os.path.realpath(self.path), cwd):
            raise ExportError(
                f"{self.path} holds the working directory {cwd}: overwriting it would delete "
                "everything in it; choose a new directory, e.g. a subdirectory such as ./out"
            )
        self.tmp = ""

    def __enter__(self) -> str:
        parent = os.path.dirname(self.path)
        try:
            os.makedirs(parent, exist_ok=True)
            self.tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(self.path)}.tmp-", dir=parent)
        except OSError as err:  # read-only, not a directory, ...: the path is unusable
            raise ExportError(
                f"cannot write {self.path}: {parent} is not a directory this process can "
                f"write to ({err.strerror or err}); choose another path"
            ) from err
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        os.chmod(self.tmp, 0o777 & ~current_umask())
        old = None
        if os.path.exists(self.path):
            old = self.tmp + ".old"
            os.replace(self.path, old)
        os.replace(self.tmp, self.path)
        if old and os.path.isdir(old) and not os.path.islink(old):
            shutil.rmtree(old, ignore_errors=True)
        elif old:  # a file (or link) stood at the path
            os.remove(old)


def _contains(directory: str, path: str) -> bool:
    """Whether ``path`` is ``directory`` or lies inside it (both real paths)."""
    return os.path.commonpath([directory, path]) == directory


def _has_data(options: Mapping[str, Any]) -> bool:
    return any(options.get(k) is not None for k in ("validation_data", "calibration"))


@quietly
def export_result(
    path: str,
    model: Any,
    report: dict[str, Any],
    overwrite: bool = False,
    tflite: Mapping[str, Any] | None = None,
) -> str:
    """Atomically write ``saved_model/``, ``report.json``, ``report.png``, ``report.md``,
    and with ``tflite`` (keyword arguments of :func:`~tf_balancer.export.tflite.export_tflite`)
    ``model.tflite``, verified against the SavedModel (its result in ``report["tflite"]``)."""
    with atomic_directory(path, overwrite) as tmp:
        if is_keras_model(model):
            adapter_for(model).save_saved_model(model, os.path.join(tmp, "saved_model"))
        if tflite is not None and is_keras_model(model) and not _has_data(tflite):
            # no data: seeded random inputs, open axes at their nominal sizes
            tflite = {**tflite, "validation_data": random_inputs(model, batch_size=8)}
        if tflite is not None:
            from tf_balancer.export.tflite import export_tflite

            result = export_tflite(
                os.path.join(tmp, "saved_model"), os.path.join(tmp, "model.tflite"), **tflite
            )
            report = {**report, "tflite": result.report_entry()}
        write_json(os.path.join(tmp, "report.json"), report)
        write_report_png(os.path.join(tmp, "report.png"), report.get("layers", []), "tf_balancer")
        layers = markdown_table(
            report.get("layers", []),
            (
                "layer",
                "attention",
                "channels_before",
                "channels_after",
                "flops_before",
                "flops_after",
            ),
        )
        with open(os.path.join(tmp, "report.md"), "w", encoding="utf-8") as handle:
            handle.write(
                f"# tf_balancer report\n\n{summary_markdown(report)}\n\n## Layers\n\n{layers}\n"
            )
    return os.path.abspath(path)

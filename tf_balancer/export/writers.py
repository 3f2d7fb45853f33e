"""Atomic writers: a result directory appears whole or not at all.

Example:
    >>> with atomic_directory("/tmp/out", overwrite=True) as tmp:  # doctest: +SKIP
    ...     write_files(tmp)
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any

from tf_balancer._compat import keras
from tf_balancer._quiet import quietly
from tf_balancer.errors import ExportError
from tf_balancer.report import markdown_table, summary_markdown, write_json, write_report_png

__all__ = ["atomic_directory", "export_result"]


class atomic_directory:  # noqa: N801  (used as a context manager, like tempfile's)
    """Write a directory atomically: build it in a temp dir, then rename into place.

    Example:
        >>> with atomic_directory("/tmp/out", overwrite=True) as tmp:  # doctest: +SKIP
        ...     write_files(tmp)

    Raises:
        ExportError: ``path`` exists and ``overwrite`` is False.
    """

    def __init__(self, path: str | os.PathLike, overwrite: bool = False):
        self.path = os.path.abspath(os.fspath(path))
        self.overwrite = overwrite
        if os.path.exists(self.path) and not overwrite:
            raise ExportError(
                f"{self.path} already exists; pass overwrite=True (CLI: --overwrite) or choose another path"
            )
        self.tmp = ""

    def __enter__(self) -> str:
        parent = os.path.dirname(self.path)
        os.makedirs(parent, exist_ok=True)
        self.tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(self.path)}.tmp-", dir=parent)
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        old = None
        if os.path.exists(self.path):
            old = self.tmp + ".old"
            os.replace(self.path, old)
        os.replace(self.tmp, self.path)
        if old:
            shutil.rmtree(old, ignore_errors=True)


@quietly
def export_result(path: str, model: Any, report: dict[str, Any], overwrite: bool = False) -> str:
    """Atomically write ``saved_model/``, ``report.json``, ``report.png``, ``report.md``."""
    with atomic_directory(path, overwrite) as tmp:
        if isinstance(model, keras.Model):
            model.save(os.path.join(tmp, "saved_model"), include_optimizer=False)
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

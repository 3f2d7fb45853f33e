"""Keep TensorFlow's internal chatter out of the console while tf_balancer works.

Freezing a graph, profiling it, saving a SavedModel or writing a checkpoint makes
TensorFlow print INFO lines, deprecation notices ("This API was designed for
TensorFlow v1") and warnings about its own internals ("Found untraced
functions"). They come from tf_balancer's calls, not the user's code, so
:func:`quiet_tensorflow` silences them *for the duration of those calls only*:

* the ``tensorflow`` and ``absl`` Python loggers pass only ERROR and above
  (a filter, removed afterwards);
* TensorFlow's deprecation notices are silenced (``deprecation.silence``);
* C++ INFO and WARNING lines (``I0000 ...``, ``W0000 ...``; TFLite's "INFO:
  Created TensorFlow Lite XNNPACK delegate") written to stderr are dropped, other
  lines (errors) are passed on;
* absl's ``logging.basicConfig()`` (called on a message when the root logger
  has no handler) is kept from configuring the user's root logger.

The user's logging configuration is never changed beyond the call.

Example:
    >>> with quiet_tensorflow():
    ...     pass
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

__all__ = ["quiet_tensorflow", "quietly", "quiet_tensorflow_startup"]

# TensorFlow's C++ INFO and WARNING lines (the TFLite converter's "Ignored
# output_format"), TFLite's runtime line (printed whatever TF_CPP_MIN_LOG_LEVEL
# says) when an interpreter first runs, and its quantizer's settings line
# ("fully_quantize: 0, inference_type: 6, ...") on every int8 conversion; errors pass
_INFO_LINE = re.compile(rb"^([IW]\d{4} |INFO: Created TensorFlow Lite |fully_quantize: )")
_lock = threading.RLock()
_depth = 0

F = TypeVar("F", bound=Callable[..., Any])


def _errors_only(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.ERROR


@contextlib.contextmanager
def _cpp_info_dropped(everything: bool = False) -> Iterator[None]:
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, ValueError, OSError):  # e.g. a notebook's captured stderr
        yield
        return
    sys.stderr.flush()
    saved = os.dup(fd)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), fd)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, fd)
            os.close(saved)
            sink.seek(0)
            lines = sink.read().splitlines(True)
            kept = [] if everything else [line for line in lines if not _INFO_LINE.match(line)]
            if kept:
                sys.stderr.write(b"".join(kept).decode("utf-8", "replace"))
                sys.stderr.flush()


@contextlib.contextmanager
def quiet_tensorflow() -> Iterator[None]:
    """Silence TensorFlow-internal INFO, deprecation and warning lines inside the block."""
    global _depth
    with _lock:
        _depth += 1
        outermost = _depth == 1
    if not outermost:
        try:
            yield
        finally:
            with _lock:
                _depth -= 1
        return
    from tensorflow.python.util import deprecation

    # TensorFlow logs through its own logger and, in parts (SavedModel saving), absl's.
    # A filter, not a level: TensorFlow resets the absl logger's level while saving.
    loggers = [logging.getLogger(name) for name in ("tensorflow", "absl")]
    for logger in loggers:
        logger.addFilter(_errors_only)
    # absl calls logging.basicConfig() on a message when the root logger has no
    # handler (TensorFlow's SavedModel code logs through absl): a placeholder
    # handler for the duration of the block keeps the user's root logger as it is.
    placeholder = None if logging.root.handlers else logging.NullHandler()
    if placeholder is not None:
        logging.root.addHandler(placeholder)
    try:
        with deprecation.silence(), _cpp_info_dropped():
            yield
    finally:
        for logger in loggers:
            logger.removeFilter(_errors_only)
        if placeholder is not None:
            logging.root.removeHandler(placeholder)
        with _lock:
            _depth -= 1


def quietly(fn: F) -> F:
    """Decorator: run ``fn`` inside :func:`quiet_tensorflow`."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with quiet_tensorflow():
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def quiet_tensorflow_startup() -> None:
    """Import TensorFlow and initialise its devices without its start-up banner.

    For the command line only: TensorFlow's import and device discovery print
    oneDNN, CUDA-stub and ``cuInit`` lines that say nothing about the command.
    """
    with _cpp_info_dropped(everything=True):
        import tensorflow as tf

        tf.config.list_logical_devices()

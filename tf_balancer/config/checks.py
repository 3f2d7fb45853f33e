"""Value checks shared by the config dataclasses and the sparsity helpers (internal).

This module imports nothing of tf_balancer but :mod:`tf_balancer.errors`, so any
stage may use it; checks against the importance and pass registries live in
:mod:`tf_balancer.config.names`.

A check takes ``(key, value)``, where ``key`` names the value in the message
(the dotted recipe key, e.g. ``balance.round_to``), and returns the value
normalised (an int given for a float is stored as a float) or raises
:class:`~tf_balancer.errors.ConfigError` saying what was given and what is
allowed. :mod:`tf_balancer.config.schema` builds each section's ``_CHECKS`` from them.

Numbers are strict: a bool is never a number, a float is never an int, a
string is never a float.

Example:
    >>> integer(1)("balance.round_to", 8)
    8
    >>> real(lambda v: v >= 0, "a number >= 0")("verify.atol", 1)
    1.0
    >>> one_of("flops", "params")("balance.target_metric", "macs")
    Traceback (most recent call last):
    ...
    tf_balancer.errors.ConfigError: balance.target_metric: got 'macs' (str); expected one of 'flops', 'params'
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from tf_balancer.errors import ConfigError

__all__ = [
    "Check",
    "FrozenWeights",
    "reject",
    "real",
    "integer",
    "one_of",
    "boolean",
    "sequence",
    "m_by_n",
    "section",
    "check_sparsity",
]

Check = Callable[[str, Any], Any]  # (dotted key, value) -> normalised value, or raise


def reject(key: str, value: Any, allowed: str, hint: str = "") -> ConfigError:
    """The error for ``value`` at ``key``: what was given, what is ``allowed``, a ``hint``."""
    message = f"{key}: got {value!r} ({type(value).__name__}); expected {allowed}"
    return ConfigError(message + (f". {hint}" if hint else ""))


def _string_number_hint(value: Any) -> str:
    if not isinstance(value, str):
        return ""
    try:
        float(value)
    except ValueError:
        return ""
    return (
        "Write the number without quotes; PyYAML reads exponents only with a dot "
        "(write 1.0e-4, not 1e-4)"
    )


def real(ok: Callable[[float], bool], allowed: str) -> Check:
    """A check for a real number (not bool, not str) with ``ok(value)``, stored as float."""

    def check(key: str, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise reject(key, value, allowed, _string_number_hint(value))
        if not math.isfinite(value) or not ok(float(value)):
            raise reject(key, value, allowed)
        return float(value)

    return check


def integer(minimum: int) -> Check:
    """A check for an integer (not bool, not float) >= ``minimum``."""

    def check(key: str, value: Any) -> int:
        allowed = f"an integer >= {minimum}"
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise reject(key, value, allowed, _string_number_hint(value))
        if value < minimum:
            raise reject(key, value, allowed)
        return int(value)

    return check


def integer_or(minimum: int, word: str) -> Check:
    """A check for an integer >= ``minimum`` or the string ``word``."""
    number = integer(minimum)

    def check(key: str, value: Any) -> int | str:
        if value == word:
            return word
        try:
            return number(key, value)
        except ConfigError:
            raise reject(key, value, f"an integer >= {minimum} or {word!r}") from None

    return check


def one_of(*choices: str) -> Check:
    """A check for one of the strings ``choices``."""

    def check(key: str, value: Any) -> str:
        if not isinstance(value, str) or value not in choices:
            raise reject(key, value, "one of " + ", ".join(repr(c) for c in choices))
        return value

    return check


def boolean(key: str, value: Any) -> bool:
    """Check that ``value`` is ``True`` or ``False`` (not 0, 1 or a string)."""
    if not isinstance(value, bool):
        raise reject(key, value, "true or false")
    return value


def sequence(key: str, value: Any, what: str) -> tuple[Any, ...]:
    """``value`` (a list or tuple, not a string) as a tuple; ``what`` describes it."""
    if isinstance(value, str | bytes) or not isinstance(value, list | tuple):
        raise reject(key, value, what)
    return tuple(value)


class FrozenWeights(Mapping[str, float]):
    """A read-only, hashable ``{name: weight}`` mapping (keeps configs hashable)."""

    def __init__(self, items: Mapping[str, float]):
        self._items = dict(items)

    def __getitem__(self, key: str) -> float:
        return self._items[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(frozenset(self._items.items()))

    def __repr__(self) -> str:
        return repr(self._items)


def m_by_n(key: str, value: Any) -> tuple[int, int] | None:
    """None, or a pair ``(m, n)`` of integers with ``1 <= m < n``."""
    if value is None:
        return None
    allowed = "null or a pair [m, n] of integers with 1 <= m < n (m zeros in every n weights)"
    pair = sequence(key, value, allowed)
    if len(pair) != 2:
        raise reject(key, value, allowed)
    m, n = (integer(1)(f"{key}[{i}]", v) for i, v in enumerate(pair))
    if m >= n:
        raise reject(key, value, allowed)
    return (m, n)


def section(cls: type, optional: bool) -> Check:
    """A check for an instance of the config section ``cls`` (or None if ``optional``)."""

    def check(key: str, value: Any) -> Any:
        if not (isinstance(value, cls) or (optional and value is None)):
            allowed = f"a {cls.__name__}" + (" or None" if optional else "")
            hint = f"Give a mapping of its keys (YAML or from_dict) or a {cls.__name__}"
            raise reject(key, value, allowed, hint)
        return value

    return check


def check_sparsity(name: str, value: Any) -> float:
    """``value`` as a float in [0, 1) (a fraction of zero weights); ``name`` is for the message."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if not 0.0 <= number < 1.0:
        raise ConfigError(f"{name} must be a number in [0, 1), got {value!r}; e.g. 0.8")
    return number

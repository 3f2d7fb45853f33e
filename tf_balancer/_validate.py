"""Value checks shared by the config dataclasses and the sparsity helpers (internal).

A check takes ``(key, value)``, where ``key`` names the value in the message
(the dotted recipe key, e.g. ``balance.round_to``), and returns the value
normalised (an int given for a float is stored as a float) or raises
:class:`~tf_balancer.errors.ConfigError` saying what was given and what is
allowed. :mod:`tf_balancer.config` builds each section's ``_CHECKS`` from them.

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
from typing import TYPE_CHECKING, Any

from tf_balancer.errors import ConfigError

if TYPE_CHECKING:
    from tf_balancer.config import OptimizeConfig

__all__ = [
    "Check",
    "FrozenWeights",
    "reject",
    "real",
    "integer",
    "one_of",
    "boolean",
    "sequence",
    "importance",
    "m_by_n",
    "section",
    "pass_names",
    "pass_sections",
    "check_sparsity",
]

Check = Callable[[str, Any], Any]  # (dotted key, value) -> normalised value, or raise
_LAST_ONLY_PASSES = ("grappler",)  # returns a concrete function, not a Keras model


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


def importance(key: str, value: Any) -> str | FrozenWeights:
    """A criterion name, or a ``{name: weight}`` mapping with weights >= 0, not all 0."""
    from tf_balancer.attention.importance import registered_importances

    names = registered_importances()
    if isinstance(value, str):
        return one_of(*names)(key, value)
    if not isinstance(value, Mapping) or not value:
        raise reject(key, value, "a criterion name or a non-empty {name: weight} mapping")
    weights = {}
    for name, weight in value.items():
        if not isinstance(name, str) or name not in names:
            raise ConfigError(
                f"unknown key '{key}.{name}'; importance criteria are " + ", ".join(names)
            )
        weights[name] = real(lambda w: w >= 0, "a number >= 0")(f"{key}.{name}", weight)
    if not any(weights.values()):
        raise reject(key, value, "weights that are not all 0")
    return FrozenWeights(weights)


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


def pass_names(value: Any) -> tuple[str, ...]:
    """Registered pass names, each once, ``grappler`` (if present) last."""
    from tf_balancer.passes.base import registered_passes

    names = sequence("passes", value, "a non-empty list of pass names")
    if not names:
        raise reject("passes", value, "a non-empty list of pass names")
    registered = registered_passes()
    for i, name in enumerate(names):
        if not isinstance(name, str) or name not in registered:
            allowed = "a registered pass: " + ", ".join(registered)
            raise reject(f"passes[{i}]", name, allowed)
        if name in names[:i]:
            raise reject(f"passes[{i}]", name, "each pass at most once; remove the duplicate")
    for name in _LAST_ONLY_PASSES:
        if name in names and names[-1] != name:
            raise reject(
                "passes",
                list(names),
                f"{name!r} as the last pass",
                "Move it to the end: it returns a concrete function, not a Keras model",
            )
    return names


def pass_sections(config: OptimizeConfig) -> None:
    """Check that ``balance``/``sparsity`` are set exactly when their pass is listed."""
    for pass_name, name, recipe in (
        ("prune_channels", "balance", "configs/structured_50_flops.yaml"),
        ("prune_weights", "sparsity", "configs/sparse_80.yaml"),
    ):
        listed = pass_name in config.passes
        has_section = getattr(config, name) is not None
        if listed and not has_section:
            raise ConfigError(
                f"{name}: passes contains {pass_name!r} but {name!r} is not set; "
                f"add a {name}: section (see {recipe}) or remove {pass_name!r} from passes"
            )
        if has_section and not listed:
            raise ConfigError(
                f"{name}: {name!r} is set but {pass_name!r} is not in passes; "
                f"add {pass_name!r} to passes (see {recipe}) or remove the {name}: section"
            )


def check_sparsity(name: str, value: Any) -> float:
    """``value`` as a float in [0, 1) (a fraction of zero weights); ``name`` is for the message."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if not 0.0 <= number < 1.0:
        raise ConfigError(f"{name} must be a number in [0, 1), got {value!r}; e.g. 0.8")
    return number

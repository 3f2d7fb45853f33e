"""Optimization recipes: frozen dataclasses, validation, YAML load/dump.

A recipe (``configs/*.yaml``) loads only into :class:`OptimizeConfig`; every
value is checked in ``__post_init__`` and a bad one raises
:class:`~tf_balancer.errors.ConfigError` naming the dotted key (e.g.
``balance.round_to``), the value given and what is allowed. Unknown keys, at
any level, are rejected the same way.

Numbers are strict: a bool is never a number, a float is never an int, a
string is never a float. An int is accepted where a float is expected and
stored as a float.

Example:
    >>> config = OptimizeConfig.from_dict({
    ...     "passes": ["strip_training_ops", "prune_channels", "fold_batchnorm"],
    ...     "balance": {"target": 0.5, "importance": {"taylor": 1, "bn_scale": 0.5}},
    ... })
    >>> config.balance.target_metric, dict(config.balance.importance)
    ('flops', {'taylor': 1.0, 'bn_scale': 0.5})
    >>> OptimizeConfig.from_dict(config.to_dict()) == config
    True
    >>> config.with_overrides(balance={"round_to": 0})
    Traceback (most recent call last):
    ...
    tf_balancer.errors.ConfigError: balance.round_to: got 0 (int); expected an integer >= 1
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any, ClassVar

import yaml

from tf_balancer.errors import ConfigError

__all__ = [
    "BalanceConfig",
    "SparsityConfig",
    "VerifyConfig",
    "OptimizeConfig",
    "load_config",
    "dump_config",
    "DEFAULT_PASSES",
]

DEFAULT_PASSES: tuple[str, ...] = (
    "strip_training_ops",
    "fold_batchnorm",
    "fuse_activation",
    "grappler",
)
_TARGET_METRICS = ("flops", "params")
_BALANCE_STRATEGIES = ("balanced", "uniform", "global")
_SPARSITY_STRATEGIES = ("balanced", "uniform")
_LAST_ONLY_PASSES = ("grappler",)  # returns a concrete function, not a Keras model


# --------------------------------------------------------------------------- checks


_Check = Callable[[str, Any], Any]  # (dotted key, value) -> normalised value, or raise


def _reject(key: str, value: Any, allowed: str, hint: str = "") -> ConfigError:
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


def _real(ok: Callable[[float], bool], allowed: str) -> _Check:
    """A check for a real number (not bool, not str) with ``ok(value)``, stored as float."""

    def check(key: str, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise _reject(key, value, allowed, _string_number_hint(value))
        if not math.isfinite(value) or not ok(float(value)):
            raise _reject(key, value, allowed)
        return float(value)

    return check


def _integer(minimum: int) -> _Check:
    """A check for an integer (not bool, not float) >= ``minimum``."""

    def check(key: str, value: Any) -> int:
        allowed = f"an integer >= {minimum}"
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise _reject(key, value, allowed, _string_number_hint(value))
        if value < minimum:
            raise _reject(key, value, allowed)
        return int(value)

    return check


def _one_of(*choices: str) -> _Check:
    """A check for one of the strings ``choices``."""

    def check(key: str, value: Any) -> str:
        if not isinstance(value, str) or value not in choices:
            raise _reject(key, value, "one of " + ", ".join(repr(c) for c in choices))
        return value

    return check


def _bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _reject(key, value, "true or false")
    return value


def _sequence(key: str, value: Any, what: str) -> tuple[Any, ...]:
    if isinstance(value, str | bytes) or not isinstance(value, list | tuple):
        raise _reject(key, value, what)
    return tuple(value)


class _FrozenWeights(Mapping[str, float]):
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


def _importance(key: str, value: Any) -> str | _FrozenWeights:
    """A criterion name, or a ``{name: weight}`` mapping with weights >= 0, not all 0."""
    from tf_balancer.attention.importance import registered_importances

    names = registered_importances()
    if isinstance(value, str):
        return _one_of(*names)(key, value)
    if not isinstance(value, Mapping) or not value:
        raise _reject(key, value, "a criterion name or a non-empty {name: weight} mapping")
    weights = {}
    for name, weight in value.items():
        if not isinstance(name, str) or name not in names:
            raise ConfigError(
                f"unknown key '{key}.{name}'; importance criteria are " + ", ".join(names)
            )
        weights[name] = _real(lambda w: w >= 0, "a number >= 0")(f"{key}.{name}", weight)
    if not any(weights.values()):
        raise _reject(key, value, "weights that are not all 0")
    return _FrozenWeights(weights)


def _m_by_n(key: str, value: Any) -> tuple[int, int] | None:
    if value is None:
        return None
    allowed = "null or a pair [m, n] of integers with 1 <= m < n (m zeros in every n weights)"
    pair = _sequence(key, value, allowed)
    if len(pair) != 2:
        raise _reject(key, value, allowed)
    m, n = (_integer(1)(f"{key}[{i}]", v) for i, v in enumerate(pair))
    if m >= n:
        raise _reject(key, value, allowed)
    return (m, n)


def _section(cls: type, optional: bool) -> _Check:
    def check(key: str, value: Any) -> Any:
        if not (isinstance(value, cls) or (optional and value is None)):
            allowed = f"a {cls.__name__}" + (" or None" if optional else "")
            hint = f"Give a mapping of its keys (YAML or from_dict) or a {cls.__name__}"
            raise _reject(key, value, allowed, hint)
        return value

    return check


# --------------------------------------------------------------------------- sections


class _Section:
    """Mixin: validation from ``_CHECKS`` and ``to_dict``/``from_dict`` round trip.

    ``_KEY`` is the section's name in a recipe (the prefix of its dotted keys);
    ``_CHECKS`` maps each field to a check returning the normalised value.
    """

    _KEY: ClassVar[str] = ""
    _CHECKS: ClassVar[dict[str, _Check]] = {}

    def __post_init__(self) -> None:
        for name, check in self._CHECKS.items():
            key = f"{self._KEY}.{name}" if self._KEY else name
            object.__setattr__(self, name, check(key, getattr(self, name)))

    def to_dict(self) -> dict[str, Any]:
        """Plain ``dict``/``list``/scalar form, safe for ``yaml.safe_dump`` and JSON."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Any:
        """Build from a mapping (e.g. parsed YAML); missing keys take their defaults.

        Raises:
            ConfigError: if ``data`` is not a mapping, has an unknown key, or a bad value.
        """
        where = cls._KEY or "the top level"
        if not isinstance(data, Mapping):
            raise _reject(where, data, "a mapping of keys to values")
        allowed = [f.name for f in dataclasses.fields(cls)]
        for key in data:
            if key not in allowed:
                dotted = f"{cls._KEY}.{key}" if cls._KEY else str(key)
                raise ConfigError(
                    f"unknown key {dotted!r} in {where}; allowed keys: {', '.join(allowed)}"
                )
        return cls(**data)


def _plain(value: Any) -> Any:
    if isinstance(value, _Section):
        return value.to_dict()
    if isinstance(value, Mapping):
        return dict(value)
    return list(value) if isinstance(value, tuple) else value


@dataclasses.dataclass(frozen=True)
class BalanceConfig(_Section):
    """Budget for structured (channel) pruning, used by the ``prune_channels`` pass.

    Attributes:
        target: fraction of ``target_metric`` to keep, in (0, 1]. Defaults to 0.5.
        target_metric: ``"flops"`` or ``"params"``. Defaults to ``"flops"``.
        strategy: ``"balanced"`` (cost-aware), ``"uniform"`` or ``"global"``.
            Defaults to ``"balanced"``.
        importance: a registered criterion name (``magnitude``, ``taylor``,
            ``activation``, ``bn_scale``) or ``{name: weight}`` to combine several;
            weights >= 0, not all 0. Defaults to ``"taylor"``.
        min_keep: fewest channels left in any layer, >= 1. Defaults to 4.
        max_prune_fraction: largest fraction of a layer's channels removed, in
            (0, 1). Defaults to 0.9.
        round_to: kept channel counts are multiples of this, >= 1. Defaults to 1.

    Example:
        >>> BalanceConfig(target=0.3, round_to=8).to_dict()["round_to"]
        8
    """

    _KEY: ClassVar[str] = "balance"
    _CHECKS: ClassVar[dict[str, _Check]] = {
        "target": _real(lambda v: 0 < v <= 1, "a number in (0, 1]"),
        "target_metric": _one_of(*_TARGET_METRICS),
        "strategy": _one_of(*_BALANCE_STRATEGIES),
        "importance": lambda key, value: _importance(key, value),
        "min_keep": _integer(1),
        "max_prune_fraction": _real(lambda v: 0 < v < 1, "a number in (0, 1)"),
        "round_to": _integer(1),
    }

    target: float = 0.5
    target_metric: str = "flops"
    strategy: str = "balanced"
    importance: str | Mapping[str, float] = "taylor"
    min_keep: int = 4
    max_prune_fraction: float = 0.9
    round_to: int = 1


@dataclasses.dataclass(frozen=True)
class SparsityConfig(_Section):
    """tfmot weight pruning (unstructured or m-by-n), used by the ``prune_weights`` pass.

    Attributes:
        target_sparsity: final fraction of zero weights, in [0, 1). With
            ``m_by_n`` it must equal m / n. Defaults to 0.8.
        m_by_n: ``(m, n)``: m zeros in every n consecutive weights (tfmot's
            ``sparsity_m_by_n``), 1 <= m < n; YAML ``[2, 4]``. Defaults to None.
        strategy: ``"balanced"`` (per-layer targets from the balancer) or
            ``"uniform"`` (the same target everywhere). Defaults to ``"balanced"``.
        begin_step: first pruning step, >= 0. Defaults to 0.
        end_step: last pruning step, > ``begin_step``. Defaults to 1000.
        frequency: steps between mask updates, >= 1. Defaults to 100.
        power: ``PolynomialDecay`` exponent, >= 1. Defaults to 3.

    Example:
        >>> SparsityConfig.from_dict({"target_sparsity": 0.5, "m_by_n": [2, 4]}).m_by_n
        (2, 4)
    """

    _KEY: ClassVar[str] = "sparsity"
    _CHECKS: ClassVar[dict[str, _Check]] = {
        "target_sparsity": _real(lambda v: 0 <= v < 1, "a number in [0, 1)"),
        "m_by_n": lambda key, value: _m_by_n(key, value),
        "strategy": _one_of(*_SPARSITY_STRATEGIES),
        "begin_step": _integer(0),
        "end_step": _integer(1),
        "frequency": _integer(1),
        "power": _integer(1),
    }

    target_sparsity: float = 0.8
    m_by_n: tuple[int, int] | None = None
    strategy: str = "balanced"
    begin_step: int = 0
    end_step: int = 1000
    frequency: int = 100
    power: int = 3

    def __post_init__(self) -> None:
        super().__post_init__()
        k = self._KEY
        if self.end_step <= self.begin_step:
            allowed = f"an integer > {k}.begin_step ({self.begin_step})"
            raise _reject(f"{k}.end_step", self.end_step, allowed)
        if self.m_by_n is not None:
            m, n = self.m_by_n
            if not math.isclose(self.target_sparsity, m / n):
                allowed = f"{m / n:g} (= {m}/{n}) because {k}.m_by_n is [{m}, {n}]"
                hint = f"Set target_sparsity: {m / n:g} or change m_by_n"
                raise _reject(f"{k}.target_sparsity", self.target_sparsity, allowed, hint)


@dataclasses.dataclass(frozen=True)
class VerifyConfig(_Section):
    """Tolerances of the output check after each function-preserving pass.

    Attributes:
        rtol: relative tolerance, >= 0. Defaults to 1e-4.
        atol: absolute tolerance, >= 0. Defaults to 1e-5.
        probe_batch_size: samples in the probe batch, >= 1. Defaults to 8.

    Example:
        >>> VerifyConfig(atol=1e-3).rtol
        0.0001
    """

    _KEY: ClassVar[str] = "verify"
    _CHECKS: ClassVar[dict[str, _Check]] = {
        "rtol": _real(lambda v: v >= 0, "a number >= 0"),
        "atol": _real(lambda v: v >= 0, "a number >= 0"),
        "probe_batch_size": _integer(1),
    }

    rtol: float = 1e-4
    atol: float = 1e-5
    probe_batch_size: int = 8


_SECTIONS: dict[str, type[_Section]] = {
    "balance": BalanceConfig,
    "sparsity": SparsityConfig,
    "verify": VerifyConfig,
}


@dataclasses.dataclass(frozen=True)
class OptimizeConfig(_Section):
    """A whole optimization recipe: which passes run, in order, and their settings.

    Attributes:
        passes: registered pass names, run in this order; non-empty, no
            duplicates, ``grappler`` (if present) last. Defaults to
            :data:`DEFAULT_PASSES` (the lossless passes).
        balance: structured pruning budget; set exactly when ``prune_channels``
            is in ``passes`` (needs calibration data). Defaults to None.
        sparsity: tfmot weight pruning; set exactly when ``prune_weights`` is in
            ``passes`` (needs calibration data). Defaults to None.
        verify: output-check tolerances. Defaults to ``VerifyConfig()``.
        fail_on_error: raise when a pass fails instead of rolling it back.
            Defaults to False.

    Example:
        >>> config = OptimizeConfig()
        >>> config.passes[-1], config.balance
        ('grappler', None)
        >>> config.with_overrides(fail_on_error=True).fail_on_error
        True
    """

    _CHECKS: ClassVar[dict[str, _Check]] = {
        "passes": lambda key, value: _passes(value),
        "balance": _section(BalanceConfig, optional=True),
        "sparsity": _section(SparsityConfig, optional=True),
        "verify": _section(VerifyConfig, optional=False),
        "fail_on_error": _bool,
    }

    passes: tuple[str, ...] = DEFAULT_PASSES
    balance: BalanceConfig | None = None
    sparsity: SparsityConfig | None = None
    verify: VerifyConfig = dataclasses.field(default_factory=VerifyConfig)
    fail_on_error: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_pass_sections(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> OptimizeConfig:
        """Build from a mapping such as parsed YAML; missing keys take their defaults.

        Example:
            >>> OptimizeConfig.from_dict({"verify": {"atol": 1.0e-3}}).verify.atol
            0.001

        Raises:
            ConfigError: for a non-mapping, an unknown key (at any level) or a bad value.
        """
        if isinstance(data, Mapping):
            data = dict(data)
            for name, section in _SECTIONS.items():
                if data.get(name) is not None:
                    data[name] = section.from_dict(data[name])
        return super().from_dict(data)

    def with_overrides(self, **overrides: Any) -> OptimizeConfig:
        """A validated copy with some fields replaced (``dataclasses.replace``).

        A mapping given for ``balance``, ``sparsity`` or ``verify`` updates that
        section key by key (starting from its defaults when it is unset).

        Example:
            >>> base = OptimizeConfig(passes=("strip_training_ops", "prune_channels"),
            ...                       balance=BalanceConfig())
            >>> base.with_overrides(balance={"target": 0.25}).balance.target
            0.25

        Raises:
            ConfigError: for an unknown field or a bad value.
        """
        allowed = [f.name for f in dataclasses.fields(self)]
        for key, value in overrides.items():
            if key not in allowed:
                raise ConfigError(f"unknown key {key!r}; allowed keys: {', '.join(allowed)}")
            if key in _SECTIONS and isinstance(value, Mapping):
                current = getattr(self, key)
                merged = {**(current.to_dict() if current is not None else {}), **value}
                overrides[key] = _SECTIONS[key].from_dict(merged)
        return dataclasses.replace(self, **overrides)


def _passes(value: Any) -> tuple[str, ...]:
    from tf_balancer.passes.base import registered_passes

    names = _sequence("passes", value, "a non-empty list of pass names")
    if not names:
        raise _reject("passes", value, "a non-empty list of pass names")
    registered = registered_passes()
    for i, name in enumerate(names):
        if not isinstance(name, str) or name not in registered:
            allowed = "a registered pass: " + ", ".join(registered)
            raise _reject(f"passes[{i}]", name, allowed)
        if name in names[:i]:
            raise _reject(f"passes[{i}]", name, "each pass at most once; remove the duplicate")
    for name in _LAST_ONLY_PASSES:
        if name in names and names[-1] != name:
            raise _reject(
                "passes",
                list(names),
                f"{name!r} as the last pass",
                "Move it to the end: it returns a concrete function, not a Keras model",
            )
    return names


def _check_pass_sections(config: OptimizeConfig) -> None:
    for pass_name, section, recipe in (
        ("prune_channels", "balance", "configs/structured_50_flops.yaml"),
        ("prune_weights", "sparsity", "configs/sparse_80.yaml"),
    ):
        listed = pass_name in config.passes
        has_section = getattr(config, section) is not None
        if listed and not has_section:
            raise ConfigError(
                f"{section}: passes contains {pass_name!r} but {section!r} is not set; "
                f"add a {section}: section (see {recipe}) or remove {pass_name!r} from passes"
            )
        if has_section and not listed:
            raise ConfigError(
                f"{section}: {section!r} is set but {pass_name!r} is not in passes; "
                f"add {pass_name!r} to passes (see {recipe}) or remove the {section}: section"
            )


# --------------------------------------------------------------------------- YAML


def load_config(path: str | os.PathLike[str]) -> OptimizeConfig:
    """Read a YAML recipe (``yaml.safe_load``) into a validated :class:`OptimizeConfig`.

    Example:
        >>> config = load_config("configs/lossless.yaml")  # doctest: +SKIP
        >>> config.passes[0]  # doctest: +SKIP
        'strip_training_ops'

    Raises:
        ConfigError: if the file is missing or unreadable, is not valid YAML, its
            top level is not a mapping, or a value is invalid (the message starts
            with the path).
    """
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as handle:
            data = yaml.safe_load(handle)
    except FileNotFoundError:
        raise ConfigError(
            f"config file {path!r} not found; pass the path of a YAML recipe such as "
            "configs/lossless.yaml"
        ) from None
    except OSError as err:
        raise ConfigError(f"cannot read config file {path!r}: {err}") from err
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: invalid YAML, fix the syntax: {err}") from err
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"{path}: the top level must be a mapping of keys (passes, balance, ...), "
            f"got {type(data).__name__}; see configs/README.md"
        )
    try:
        return OptimizeConfig.from_dict(data)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from err


def dump_config(config: OptimizeConfig, path: str | os.PathLike[str]) -> None:
    """Write ``config`` as YAML that :func:`load_config` reads back to an equal config.

    Example:
        >>> dump_config(OptimizeConfig(), "/tmp/recipe.yaml")  # doctest: +SKIP
        >>> load_config("/tmp/recipe.yaml") == OptimizeConfig()  # doctest: +SKIP
        True
    """
    if not isinstance(config, OptimizeConfig):
        raise _reject("config", config, "an OptimizeConfig")
    with open(os.fspath(path), "w", encoding="utf-8") as handle:
        yaml.safe_dump(config.to_dict(), handle, sort_keys=False, default_flow_style=None)

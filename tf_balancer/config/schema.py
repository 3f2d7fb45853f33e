"""Optimization recipes: frozen dataclasses validated in ``__post_init__``.

A recipe (``configs/*.yaml``) loads only into :class:`OptimizeConfig`; every
value is checked in ``__post_init__`` (by the checks in :mod:`tf_balancer.config.checks`)
and a bad one raises :class:`~tf_balancer.errors.ConfigError` naming the dotted key (e.g.
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
from collections.abc import Mapping
from typing import Any, ClassVar

from tf_balancer.config import checks, names
from tf_balancer.errors import ConfigError

__all__ = [
    "BalanceConfig",
    "SparsityConfig",
    "VerifyConfig",
    "OptimizeConfig",
    "DEFAULT_PASSES",
]

DEFAULT_PASSES: tuple[str, ...] = (
    "strip_training_ops",
    "fold_batchnorm",
    "fuse_activation",
    "grappler",
)
_TARGET_METRICS = ("flops", "params", "latency")
_BALANCE_STRATEGIES = ("balanced", "uniform", "global")
_SPARSITY_STRATEGIES = ("balanced", "uniform")


# --------------------------------------------------------------------------- sections


class _Section:
    """Mixin: validation from ``_CHECKS`` and ``to_dict``/``from_dict`` round trip.

    ``_KEY`` is the section's name in a recipe (the prefix of its dotted keys);
    ``_CHECKS`` maps each field to a check returning the normalised value.
    """

    _KEY: ClassVar[str] = ""
    _CHECKS: ClassVar[dict[str, checks.Check]] = {}

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
            raise checks.reject(where, data, "a mapping of keys to values")
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
        target_metric: ``"flops"``, ``"params"`` or ``"latency"``. Defaults to ``"flops"``.
        strategy: ``"balanced"`` (cost-aware), ``"uniform"`` or ``"global"``.
            Defaults to ``"balanced"``.
        importance: a registered criterion name (``magnitude``, ``taylor``,
            ``activation``, ``bn_scale``) or ``{name: weight}`` to combine several;
            weights >= 0, not all 0. Defaults to ``"taylor"``.
        min_keep: fewest channels left in any layer, >= 1. Defaults to 4.
        max_prune_fraction: largest fraction of a layer's channels removed, in
            (0, 1). Defaults to 0.9.
        round_to: kept channel counts are multiples of this, >= 1, or ``"auto"``
            (the CPU's float32 vector width, see ``Bounds``). Defaults to 1.

    Example:
        >>> BalanceConfig(target=0.3, round_to=8).to_dict()["round_to"]
        8
    """

    _KEY: ClassVar[str] = "balance"
    _CHECKS: ClassVar[dict[str, checks.Check]] = {
        "target": checks.real(lambda v: 0 < v <= 1, "a number in (0, 1]"),
        "target_metric": checks.one_of(*_TARGET_METRICS),
        "strategy": checks.one_of(*_BALANCE_STRATEGIES),
        "importance": lambda key, value: names.importance(key, value),
        "min_keep": checks.integer(1),
        "max_prune_fraction": checks.real(lambda v: 0 < v < 1, "a number in (0, 1)"),
        "round_to": checks.integer_or(1, "auto"),
    }

    target: float = 0.5
    target_metric: str = "flops"
    strategy: str = "balanced"
    importance: str | Mapping[str, float] = "taylor"
    min_keep: int = 4
    max_prune_fraction: float = 0.9
    round_to: int | str = 1


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
    _CHECKS: ClassVar[dict[str, checks.Check]] = {
        "target_sparsity": checks.real(lambda v: 0 <= v < 1, "a number in [0, 1)"),
        "m_by_n": lambda key, value: checks.m_by_n(key, value),
        "strategy": checks.one_of(*_SPARSITY_STRATEGIES),
        "begin_step": checks.integer(0),
        "end_step": checks.integer(1),
        "frequency": checks.integer(1),
        "power": checks.integer(1),
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
            raise checks.reject(f"{k}.end_step", self.end_step, allowed)
        if self.m_by_n is not None:
            m, n = self.m_by_n
            if not math.isclose(self.target_sparsity, m / n):
                allowed = f"{m / n:g} (= {m}/{n}) because {k}.m_by_n is [{m}, {n}]"
                hint = f"Set target_sparsity: {m / n:g} or change m_by_n"
                raise checks.reject(f"{k}.target_sparsity", self.target_sparsity, allowed, hint)


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
    _CHECKS: ClassVar[dict[str, checks.Check]] = {
        "rtol": checks.real(lambda v: v >= 0, "a number >= 0"),
        "atol": checks.real(lambda v: v >= 0, "a number >= 0"),
        "probe_batch_size": checks.integer(1),
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

    _CHECKS: ClassVar[dict[str, checks.Check]] = {
        "passes": lambda key, value: names.pass_names(value),
        "balance": checks.section(BalanceConfig, optional=True),
        "sparsity": checks.section(SparsityConfig, optional=True),
        "verify": checks.section(VerifyConfig, optional=False),
        "fail_on_error": checks.boolean,
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


def _check_pass_sections(config: OptimizeConfig) -> None:
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

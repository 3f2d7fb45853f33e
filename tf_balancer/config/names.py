"""Checks of names against the registries: importance criteria and graph passes (internal).

The config schema validates recipe names when it is built, so this module looks
the registries up (importing :mod:`tf_balancer.attention.importance` and
:mod:`tf_balancer.passes.base` on first use). That is why ``config`` sits above
``passes`` in the package's layering while :mod:`tf_balancer.config.checks`
stays a floor every stage may import.

Example:
    >>> pass_names(["strip_training_ops", "fold_batchnorm"])
    ('strip_training_ops', 'fold_batchnorm')
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tf_balancer.config.checks import FrozenWeights, one_of, real, reject, sequence
from tf_balancer.errors import ConfigError

__all__ = ["importance", "pass_names"]

_LAST_ONLY_PASSES = ("grappler",)  # returns a concrete function, not a Keras model


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

"""The pass contract: ``GraphPass``, ``PassResult``, ``PassContext`` and the registry.

A pass is Grappler's ``GraphOptimizer`` in Python: a ``name`` and one ``run``
entry point. It never mutates its input model; it returns a new model, or the
same object with ``changed=False`` when there is nothing to do.

Example:
    >>> @register_pass("noop_example")
    ... class NoOp(GraphPass):
    ...     def run(self, model, graph, ctx):
    ...         return PassResult(model, changed=False, message="nothing to do")
    >>> "noop_example" in registered_passes()
    True
    >>> unregister_pass("noop_example")
"""

from __future__ import annotations

import abc
import dataclasses
import types
from collections.abc import Mapping
from typing import Any, ClassVar

from tf_balancer.errors import ConfigError

__all__ = [
    "PassContext",
    "PassResult",
    "GraphPass",
    "register_pass",
    "unregister_pass",
    "get_pass",
    "registered_passes",
]

_EMPTY: Mapping[str, Any] = types.MappingProxyType({})


@dataclasses.dataclass(frozen=True)
class PassContext:
    """What a pass may read besides the model.

    Attributes:
        probe_inputs: a batch of model inputs; verifiers compare outputs on it.
        plan: a balancer :class:`~tf_balancer.attention.balance.Allocation`
            (channels to keep per group), used by ``prune_channels``.
        sparsity: layer name -> target weight sparsity, used by ``prune_weights``.
        options: pass name -> keyword options for that pass.
    """

    probe_inputs: Any = None
    plan: Any = None
    sparsity: Mapping[str, float] = dataclasses.field(default_factory=dict)
    options: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)

    def options_for(self, name: str) -> Mapping[str, Any]:
        return self.options.get(name, _EMPTY)


@dataclasses.dataclass(frozen=True)
class PassResult:
    """Outcome of one pass: the (new) model, whether it changed, and stats."""

    model: Any
    changed: bool
    message: str = ""
    stats: Mapping[str, Any] = dataclasses.field(default_factory=dict)


class GraphPass(abc.ABC):
    """Base class of graph passes; subclasses are registered with :func:`register_pass`.

    Class attributes:
        name: the registry name (set by ``register_pass``).
        preserves_function: when True the optimizer checks the result's outputs
            against :meth:`reference` on the probe batch and rolls back on mismatch.
        keras_output: False for passes whose result is not a Keras model (e.g.
            ``grappler`` returns a concrete function); such a pass must run last.
    """

    name: ClassVar[str] = ""
    preserves_function: ClassVar[bool] = True
    keras_output: ClassVar[bool] = True

    @abc.abstractmethod
    def run(self, model: Any, graph: Any, ctx: PassContext) -> PassResult:
        """Return a :class:`PassResult`; never mutate ``model``."""

    def reference(self, model: Any, graph: Any, ctx: PassContext) -> Any:
        """The model whose outputs the result must reproduce (default: the input)."""
        return model


_REGISTRY: dict[str, type[GraphPass]] = {}


def register_pass(name: str):
    """Class decorator registering a :class:`GraphPass` under ``name``.

    Raises:
        ValueError: if ``name`` is already registered.
    """

    def decorate(cls: type[GraphPass]) -> type[GraphPass]:
        if name in _REGISTRY:
            raise ValueError(f"a pass named {name!r} is already registered ({_REGISTRY[name]})")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def unregister_pass(name: str) -> None:
    """Remove a registered pass (for tests and notebooks)."""
    _REGISTRY.pop(name, None)


def registered_passes() -> list[str]:
    """Names of all registered passes, sorted."""
    _load_builtin_passes()
    return sorted(_REGISTRY)


def get_pass(name: str) -> GraphPass:
    """A new instance of the pass registered as ``name``.

    Raises:
        ConfigError: for an unknown name; the message lists the registered ones.
    """
    _load_builtin_passes()
    if name not in _REGISTRY:
        raise ConfigError(
            f"unknown pass {name!r}; registered passes: {', '.join(sorted(_REGISTRY))}"
        )
    return _REGISTRY[name]()


def _load_builtin_passes() -> None:
    import tf_balancer.passes  # noqa: F401  (registers the built-in passes)

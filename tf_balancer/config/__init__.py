"""Optimization recipes: frozen dataclasses, validation, YAML load/dump.

* :mod:`~tf_balancer.config.schema`: ``OptimizeConfig`` and its sections, validated in
  ``__post_init__``.
* :mod:`~tf_balancer.config.checks`: the value checks (a floor: imports only ``errors``).
* :mod:`~tf_balancer.config.names`: checks against the importance and pass registries.
* :mod:`~tf_balancer.config.yaml_io`: ``load_config`` / ``dump_config``.

Example:
    >>> from tf_balancer.config import OptimizeConfig
    >>> OptimizeConfig().passes[0]
    'strip_training_ops'
"""

from tf_balancer.config.schema import (
    DEFAULT_PASSES,
    BalanceConfig,
    OptimizeConfig,
    SparsityConfig,
    VerifyConfig,
)
from tf_balancer.config.yaml_io import dump_config, load_config

__all__ = [
    "BalanceConfig",
    "SparsityConfig",
    "VerifyConfig",
    "OptimizeConfig",
    "load_config",
    "dump_config",
    "DEFAULT_PASSES",
]

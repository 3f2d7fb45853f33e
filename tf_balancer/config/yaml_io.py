"""YAML recipes: :func:`load_config` and :func:`dump_config` for :class:`OptimizeConfig`."""

from __future__ import annotations

import os
from collections.abc import Mapping

import yaml

from tf_balancer.config import checks
from tf_balancer.config.schema import OptimizeConfig
from tf_balancer.errors import ConfigError

__all__ = ["load_config", "dump_config"]


def load_config(path: str | os.PathLike[str]) -> OptimizeConfig:
    """Read a YAML recipe (``yaml.safe_load``) into a validated :class:`OptimizeConfig`.

    Example:
        >>> config = load_config("configs/lossless.yaml")  # doctest: +SKIP
        >>> config.passes[0]  # doctest: +SKIP
        'strip_training_ops'

    Raises:
        ConfigError: if the file is missing or unreadable, is not UTF-8 text, is
            not valid YAML, its top level is not a mapping, or a value is invalid
            (the message starts with the path).
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
    except UnicodeError as err:
        raise ConfigError(
            f"{path}: not UTF-8 text ({err}); save the file as UTF-8 (your editor's "
            "encoding setting, or e.g. `iconv -f latin1 -t utf-8 OLD.yaml > NEW.yaml`)"
        ) from err
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
        raise checks.reject("config", config, "an OptimizeConfig")
    with open(os.fspath(path), "w", encoding="utf-8") as handle:
        yaml.safe_dump(config.to_dict(), handle, sort_keys=False, default_flow_style=None)

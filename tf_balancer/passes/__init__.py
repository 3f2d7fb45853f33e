"""Built-in graph passes; importing this package registers them."""

import importlib

_BUILTIN = (
    "strip_training_ops",
    "fold_batchnorm",
    "fuse_activation",
    "prune_channels",
    "prune_weights",
    "grappler",
)

for _name in _BUILTIN:
    try:
        importlib.import_module(f"tf_balancer.passes.{_name}")
    except ModuleNotFoundError as _err:  # a pass module not written yet
        if _err.name != f"tf_balancer.passes.{_name}":
            raise

"""Built-in graph passes; importing this package registers them."""

import importlib

BUILTIN_PASSES = (
    "strip_training_ops",
    "fold_batchnorm",
    "fuse_activation",
    "prune_channels",
    "prune_weights",
    "grappler",
)

for _name in BUILTIN_PASSES:
    importlib.import_module(f"tf_balancer.passes.{_name}")

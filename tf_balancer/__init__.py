"""tf_balancer: cost-aware structured pruning for tf_keras models."""

__version__ = "0.1.0"

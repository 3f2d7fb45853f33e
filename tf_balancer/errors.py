"""Typed exceptions raised by tf_balancer.

Every message says what to do about it. All exceptions derive from
:class:`TFBalancerError`, so callers can catch the whole family at once.
"""

from __future__ import annotations


class TFBalancerError(Exception):
    """Base class of every error tf_balancer raises on purpose."""


class UnsupportedModelError(TFBalancerError, TypeError):
    """The model is not something tf_balancer can analyse (e.g. a Keras 3 model)."""


class ModelLoadError(TFBalancerError, ValueError):
    """A path does not exist or does not hold a readable SavedModel."""


class ConfigError(TFBalancerError, ValueError):
    """A configuration value is invalid; the message names the key and the fix."""


class BalanceError(TFBalancerError, ValueError):
    """The balancer cannot meet a target; the message names the blocking layer."""


class VerificationError(TFBalancerError):
    """An optimized model's outputs or signature differ from the original's."""


class PassError(TFBalancerError):
    """A graph pass failed and ``fail_on_error=True`` was requested."""


class ExportError(TFBalancerError, FileExistsError):
    """An export destination is unusable (exists, or lies inside the source)."""


KERAS3_FIX = (
    "unstructured sparsity (mode='sparse', the prune_weights pass) uses tfmot, which needs a "
    "Keras 2 (tf_keras) model: build it with `import tf_keras as keras`, or set "
    "TF_USE_LEGACY_KERAS=1 before importing TensorFlow so that `tf.keras` is tf_keras; "
    "structured pruning (mode='structured') works with Keras 3 as it is."
)

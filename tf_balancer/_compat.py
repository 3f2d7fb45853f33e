"""The Keras boundary: the only module that imports Keras.

tfmot and tf_balancer work on Keras 2 models, i.e. the ``tf_keras`` package.
``import tf_keras`` works whether or not ``TF_USE_LEGACY_KERAS`` is set, so this
module never depends on that variable. A Keras 3 model (``keras`` >= 3, the
default ``tf.keras`` since TF 2.16) is detected here and rejected with a message
that says how to switch.

Example:
    >>> from tf_balancer._compat import keras, ensure_keras2_model
    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    >>> ensure_keras2_model(model) is model
    True
"""

from __future__ import annotations

import sys
from typing import Any

import tf_keras as keras

from tf_balancer.errors import KERAS3_FIX, UnsupportedModelError

__all__ = ["keras", "layers", "is_keras3_object", "ensure_keras2_model", "is_keras_model"]

layers = keras.layers


def is_keras3_object(obj: Any) -> bool:
    """True when ``obj`` is a Keras 3 layer or model (without importing Keras 3)."""
    keras3 = sys.modules.get("keras")
    if keras3 is None or not str(getattr(keras3, "__version__", "")).startswith("3"):
        return False  # Keras 3 was never imported, so no Keras 3 object can exist.
    return isinstance(obj, keras3.Layer)


def is_keras_model(obj: Any) -> bool:
    """True for a tf_keras ``Model`` (Sequential, Functional or subclassed)."""
    return isinstance(obj, keras.Model)


def ensure_keras2_model(model: Any) -> keras.Model:
    """Return ``model`` if it is a tf_keras model, else raise a clear error.

    Raises:
        UnsupportedModelError: for a Keras 3 model (with the fix), or for
            anything that is not a Keras model at all.
    """
    if is_keras_model(model):
        return model
    if is_keras3_object(model):
        raise UnsupportedModelError(f"Keras 3 model given ({type(model).__name__}); {KERAS3_FIX}")
    raise UnsupportedModelError(
        f"expected a tf_keras Model, got {type(model).__name__}; {KERAS3_FIX}"
    )

"""tfmot, imported without leaking ``TF_USE_LEGACY_KERAS``, and the kernels it prunes (internal).

Importing tfmot sets ``TF_USE_LEGACY_KERAS=1`` (and so resolves ``tf.keras`` to
tf_keras if nothing touched it before); this module restores the variable to
what it was, but the ``tf.keras`` resolution cannot be undone. Importing it
fails with :class:`~tf_balancer.errors.UnsupportedModelError` when tfmot did
not pick up tf_keras.

Prunable layers are those whose kernels tfmot's registry prunes: Conv1D/2D/3D,
Conv2DTranspose/Conv3DTranspose, Dense, SeparableConv1D/2D (pointwise kernel),
Embedding, and custom layers with ``get_prunable_weights``. The public
:func:`prunable_kernels` is re-exported by :mod:`tf_balancer.sparse.wrapping`.

Example:
    >>> from tf_balancer._compat import keras
    >>> model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4, name="fc")])
    >>> prunable_kernels(model)["fc"][0].shape
    (8, 4)
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import numpy as np

from tf_balancer._compat import ensure_keras2_model, keras
from tf_balancer.errors import UnsupportedModelError

__all__ = ["tfmot", "PruneLowMagnitude", "leaf_layers", "kernel_vars", "prunable_kernels"]


def _import_tfmot() -> Any:
    saved = os.environ.get("TF_USE_LEGACY_KERAS")
    import tensorflow_model_optimization as tfmot  # sets TF_USE_LEGACY_KERAS=1

    if saved is None:
        os.environ.pop("TF_USE_LEGACY_KERAS", None)
    else:
        os.environ["TF_USE_LEGACY_KERAS"] = saved
    from tensorflow_model_optimization.python.core.keras.compat import keras as tfmot_keras
    from tensorflow_model_optimization.python.core.sparsity.keras import pruning_wrapper

    if tfmot_keras.Model is not keras.Model:
        raise UnsupportedModelError(
            "tensorflow_model_optimization did not pick up tf_keras (it uses "
            f"{tfmot_keras.__name__}); install tf_keras matching your TensorFlow version "
            "(`pip install tf_keras`) so tfmot works on Keras 2 models."
        )
    return tfmot, pruning_wrapper.PruneLowMagnitude


#: The ``tensorflow_model_optimization`` module and its pruning wrapper class.
tfmot, PruneLowMagnitude = _import_tfmot()

_L = keras.layers
# Layer class (exact type, as tfmot's registry matches) -> its prunable kernel attribute.
_KERNELS: dict[type, str] = {
    **{
        cls: "kernel"
        for cls in (_L.Conv1D, _L.Conv2D, _L.Conv3D, _L.Conv2DTranspose, _L.Conv3DTranspose)
    },
    _L.Dense: "kernel",
    _L.SeparableConv1D: "pointwise_kernel",
    _L.SeparableConv2D: "pointwise_kernel",
    _L.Embedding: "embeddings",
}


def leaf_layers(model: Any) -> Iterator[Any]:
    """Layers of ``model``, descending into nested models (wrappers are leaves)."""
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            yield from leaf_layers(layer)
        else:
            yield layer


def kernel_vars(layer: Any) -> list[Any]:
    """The variables of ``layer`` that tfmot prunes (empty for an unprunable layer)."""
    if type(layer) in _KERNELS:
        return [getattr(layer, _KERNELS[type(layer)])]
    if hasattr(layer, "get_prunable_weights"):
        return list(layer.get_prunable_weights())
    return []


def prunable_kernels(model: Any) -> dict[str, list[np.ndarray]]:
    """Layer name -> its prunable kernels as numpy arrays, as the forward pass sees them.

    For a layer inside a pruning wrapper the kernel is ``weight * mask`` and the
    key is the wrapped layer's own name (the name :func:`~tf_balancer.sparse.wrapping.strip`
    restores).

    Raises:
        UnsupportedModelError: for a Keras 3 model.
    """
    ensure_keras2_model(model)
    kernels = {}
    for layer in leaf_layers(model):
        if isinstance(layer, PruneLowMagnitude):
            kernels[layer.layer.name] = [(w * m).numpy() for w, m, _ in layer.pruning_vars]
        elif kernel_vars(layer):
            kernels[layer.name] = [np.asarray(v.numpy()) for v in kernel_vars(layer)]
    return kernels

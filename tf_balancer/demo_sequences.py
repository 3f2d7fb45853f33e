"""Sequence models for the digits data read as 8 time steps of 8 features.

scikit-learn's bundled 8x8 digits, each image row one time step: what the
tests, ``benchmarks/bench_sequences.py`` and the "pruning a transformer"
notebook prune. Every builder takes the Keras to build with (``tf_keras`` by
default; pass ``keras`` for Keras 3) and returns logits.

Example:
    >>> data = load_digit_sequences(seed=0)
    >>> data.x_train.shape[1:]
    (8, 8)
    >>> model = build_digits_transformer()
    >>> [layer.name for layer in model.layers if "mha" in layer.name]
    ['mha0', 'mha1']
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tf_balancer._compat import keras as _tf_keras
from tf_balancer.demo import DigitsData

__all__ = [
    "load_digit_sequences",
    "position_embedding",
    "build_digits_transformer",
    "build_digits_lstm",
    "build_digits_bigru",
]

STEPS, FEATURES = 8, 8


def load_digit_sequences(seed: int = 0, val_fraction: float = 0.25) -> DigitsData:
    """The digits as ``(n, 8, 8)`` float32 sequences in [0, 1] (rows are time steps);
    the same split as :func:`~tf_balancer.demo.load_digits_data` with the same seed."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    sequences = digits.images.astype("float32") / 16.0
    labels = digits.target.astype("int32")
    order = np.random.default_rng(seed).permutation(len(labels))
    n_val = int(len(labels) * val_fraction)
    val, train = order[:n_val], order[n_val:]
    return DigitsData(sequences[train], labels[train], sequences[val], labels[val])


_POSITION_LAYERS: dict[Any, Any] = {}


def position_embedding(keras_module: Any = None) -> type:
    """A learned position embedding layer class for ``keras_module`` (``tf_keras``,
    ``keras`` or ``tf.keras``): adds a ``(steps, width)`` table to every sample
    (registered for saving as ``tf_balancer>PositionEmbedding``)."""
    module = keras_module or _tf_keras
    base = module.layers.Layer  # tf.keras and keras share Keras 3's
    if base not in _POSITION_LAYERS:

        class PositionEmbedding(base):
            def build(self, input_shape: Any) -> None:
                self.table = self.add_weight(
                    name="table", shape=tuple(input_shape[1:]), initializer="random_normal"
                )

            def call(self, inputs: Any) -> Any:
                return inputs + self.table

        register = module.utils.register_keras_serializable(package="tf_balancer")
        _POSITION_LAYERS[base] = register(PositionEmbedding)
    return _POSITION_LAYERS[base]


def _start(keras_module: Any, seed: int) -> tuple[Any, Any, Any]:
    """The Keras to build with (seeded), its layers, and the ``(8, 8)`` sequence input."""
    k = keras_module or _tf_keras
    k.utils.set_random_seed(seed)
    return k, k.layers, k.Input((STEPS, FEATURES), name="sequence")


def build_digits_transformer(
    keras_module: Any = None,
    width: int = 32,
    heads: int = 4,
    ffn: int = 64,
    blocks: int = 2,
    seed: int = 0,
) -> Any:
    """A Transformer encoder classifier: Dense projection + position embedding,
    ``blocks`` x (MultiHeadAttention + residual + LayerNormalization, FFN +
    residual + LayerNormalization), average pooling, Dense logits."""
    k, layers, inp = _start(keras_module, seed)
    x = layers.Dense(width, name="proj")(inp)
    x = position_embedding(k)(name="position")(x)
    for b in range(blocks):
        attended = layers.MultiHeadAttention(heads, width // heads, name=f"mha{b}")(x, x)
        x = layers.LayerNormalization(name=f"ln{b}a")(layers.Add(name=f"res{b}a")([x, attended]))
        h = layers.Dense(ffn, activation="relu", name=f"ffn{b}a")(x)
        h = layers.Dense(width, name=f"ffn{b}b")(h)
        x = layers.LayerNormalization(name=f"ln{b}b")(layers.Add(name=f"res{b}b")([x, h]))
    x = layers.GlobalAveragePooling1D(name="pool")(x)
    return k.Model(inp, layers.Dense(10, name="logits")(x), name="digits_transformer")


def build_digits_lstm(keras_module: Any = None, units: int = 32, seed: int = 0) -> Any:
    """Two stacked LSTMs (the first returns sequences), a Dense layer, Dense logits."""
    k, layers, inp = _start(keras_module, seed)
    x = layers.LSTM(units, return_sequences=True, name="lstm1")(inp)
    x = layers.LSTM(units, name="lstm2")(x)
    x = layers.Dense(32, activation="relu", name="fc")(x)
    return k.Model(inp, layers.Dense(10, name="logits")(x), name="digits_lstm")


def build_digits_bigru(keras_module: Any = None, units: int = 24, seed: int = 0) -> Any:
    """A Bidirectional GRU over the sequence, average pooling, a Dense layer, Dense logits."""
    k, layers, inp = _start(keras_module, seed)
    gru = layers.GRU(units, return_sequences=True)
    x = layers.Bidirectional(gru, name="bigru")(inp)
    x = layers.GlobalAveragePooling1D(name="pool")(x)
    x = layers.Dense(32, activation="relu", name="fc")(x)
    return k.Model(inp, layers.Dense(10, name="logits")(x), name="digits_bigru")

"""The digits example: data, a small CNN, and the end-to-end demo run.

scikit-learn ships the 8x8 digits images inside its wheel, so nothing is
downloaded. The images are upsampled to 16x16 so the CNN has some spatial work.

Example:
    >>> data = load_digits_data(seed=0)
    >>> data.x_train.shape[1:], data.num_classes
    ((16, 16, 1), 10)
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow as tf

from tf_balancer._compat import keras

__all__ = ["DigitsData", "load_digits_data", "build_digits_cnn"]


@dataclasses.dataclass(frozen=True)
class DigitsData:
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    num_classes: int = 10


def load_digits_data(seed: int = 0, val_fraction: float = 0.25) -> DigitsData:
    """scikit-learn's bundled digits as 16x16x1 float32 images in [0, 1]."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = digits.images.astype("float32") / 16.0
    images = np.kron(images, np.ones((1, 2, 2), dtype="float32"))[..., None]
    labels = digits.target.astype("int32")
    order = np.random.default_rng(seed).permutation(len(labels))
    n_val = int(len(labels) * val_fraction)
    val, train = order[:n_val], order[n_val:]
    return DigitsData(images[train], labels[train], images[val], labels[val])


def build_digits_cnn(width: int = 32, seed: int = 0, name: str = "digits_cnn") -> keras.Model:
    """A small Conv+BN+ReLU CNN with a residual block, for 16x16x1 digits."""
    tf.keras.utils.set_random_seed(seed)
    layers = keras.layers
    inp = keras.Input((16, 16, 1), name="image")
    x = layers.Conv2D(width, 3, padding="same", use_bias=False, name="conv1")(inp)
    x = layers.BatchNormalization(momentum=0.9, name="bn1")(x)
    x = layers.ReLU(name="relu1")(x)
    y = layers.Conv2D(width, 3, padding="same", use_bias=False, name="conv2")(x)
    y = layers.BatchNormalization(momentum=0.9, name="bn2")(y)
    y = layers.ReLU(name="relu2")(y)
    y = layers.Conv2D(width, 3, padding="same", use_bias=False, name="conv3")(y)
    y = layers.BatchNormalization(momentum=0.9, name="bn3")(y)
    x = layers.ReLU(name="res_relu")(layers.Add(name="res_add")([x, y]))
    x = layers.MaxPooling2D(name="pool1")(x)
    x = layers.Conv2D(2 * width, 3, padding="same", use_bias=False, name="conv4")(x)
    x = layers.BatchNormalization(momentum=0.9, name="bn4")(x)
    x = layers.ReLU(name="relu4")(x)
    x = layers.MaxPooling2D(name="pool2")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dropout(0.2, name="dropout")(x)
    x = layers.Dense(64, activation="relu", name="fc")(x)
    out = layers.Dense(10, name="logits")(x)
    return keras.Model(inp, out, name=name)


def compile_classifier(model: keras.Model, learning_rate: float = 3e-3) -> keras.Model:
    """Compile with Adam and sparse categorical cross-entropy on logits."""
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


def run_demo(output: str = "demo_out", epochs: int = 1, seed: int = 0) -> None:
    """Train the digits CNN briefly, save it, and print its ``inspect`` table."""
    import os

    from tf_balancer.analysis import inspect

    data = load_digits_data(seed)
    model = compile_classifier(build_digits_cnn(seed=seed))
    print(f"Training a small CNN on scikit-learn digits for {epochs} epoch(s)...")
    model.fit(data.x_train, data.y_train, epochs=epochs, batch_size=64, verbose=2)
    _, accuracy = model.evaluate(data.x_val, data.y_val, verbose=0)
    print(f"validation accuracy: {accuracy:.4f}")
    path = os.path.join(output, "dense_model")
    os.makedirs(output, exist_ok=True)
    model.save(path)
    print(f"\nSaved the model to {path}; its analysis (`tf-balancer inspect {path}`):\n")
    print(inspect(path).table())

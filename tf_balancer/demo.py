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

from tf_balancer._compat import keras

__all__ = ["DigitsData", "load_digits_data", "build_digits_cnn", "compile_classifier", "run_demo"]


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
    keras.utils.set_random_seed(seed)  # tf_keras: `tf.keras` may be Keras 3 here
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


def run_demo(output: str = "demo_out", epochs: int = 10, seed: int = 0) -> dict:
    """Train the digits CNN with ``BalanceCallback`` to 50% FLOPs and export the result.

    The callback runs on its defaults - Taylor importance streamed from the
    training batches, the default schedule (the dense model trains the first eighth,
    pruning ramps to the target, the last quarter of the epochs recovers) -
    except ``round_to="auto"``: kept channel counts are multiples of the CPU's
    vector width, so the compacted model runs as fast as its FLOPs promise. The
    compacted model is fine-tuned for 2 epochs (best epoch kept), and ``output``
    receives the optimized SavedModel, report.json, report.png, report.md and the
    TensorBoard logs.

    Returns:
        The callback's report (a dict).
    """
    import os
    import shutil
    import sys

    from tf_balancer.training.callback import BalanceCallback
    from tf_balancer.training.ramp import default_schedule

    data = load_digits_data(seed)
    model = compile_classifier(build_digits_cnn(seed=seed))
    schedule = default_schedule(epochs)
    callback = BalanceCallback(
        target=0.5,
        round_to="auto",
        validation_data=(data.x_val, data.y_val),
        finetune_epochs=2,
        finetune_data=(data.x_train, data.y_train),
        log_dir=os.path.join(output, "tensorboard"),
    )
    shutil.rmtree(os.path.join(output, "tensorboard"), ignore_errors=True)  # one run per log dir
    print(f"[1/3] Training a small CNN on scikit-learn digits for {epochs} epochs;")
    print(
        f"      pruning ramps to 50% FLOPs over epochs {schedule[0] + 1}-{schedule[-1] + 1} "
        "(balanced budgets, Taylor importance from the training gradients,"
    )
    print("      channel counts rounded to the CPU's vector width so the result runs faster).")
    model.fit(
        data.x_train,
        data.y_train,
        epochs=epochs,
        batch_size=32,
        validation_data=(data.x_val, data.y_val),
        callbacks=[callback],
        verbose=2,
    )
    print("[2/3] Removed pruned channels, fine-tuned, folded BatchNorm, fused activations;")
    print(
        "      the table above compares the dense model (at the first rebalance) with the result."
    )
    path = callback.export(os.path.join(output, "result"), overwrite=True)
    print(f"[3/3] Wrote {output}/")
    print(
        f"  result/saved_model/  the optimized SavedModel: tf.saved_model.load('{path}/saved_model')"
    )
    print("  result/report.json   full report (per-layer attention, keep ratios, passes)")
    print("  result/report.png    per-layer attention / keep ratio / FLOPs chart")
    print("  result/report.md     the table above, plus per-layer rows")
    bin_dir = os.path.dirname(sys.executable)  # the venv's scripts, wherever the user is
    tensorboard = os.path.join(bin_dir, "tensorboard")
    print(f"  tensorboard/         {tensorboard} --logdir {output}/tensorboard")
    print(
        f"Inspect the result:    {os.path.join(bin_dir, 'tf-balancer')} inspect {path}/saved_model"
    )
    return callback.report

"""``probe_data``, ``validation_data`` and ``finetune_data`` checked at ``on_train_begin``.

The callback is driven by hand (``set_model``, ``set_params``, ``on_train_begin``)
as ``fit`` would: a mismatch raises one ``ConfigError`` naming the argument before
any training time is spent.
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from conftest import small_cnn_head

from tf_balancer._compat import keras
from tf_balancer.attention.importance import ProbeData
from tf_balancer.demo import build_digits_cnn, compile_classifier
from tf_balancer.errors import ConfigError
from tf_balancer.training.callback import BalanceCallback
from tf_balancer.training.data_checks import check_xy

N = 16


@pytest.fixture(scope="module")
def classifier():
    """Digits CNN: input ``image`` (None, 16, 16, 1), output ``logits`` (None, 10)."""
    return compile_classifier(build_digits_cnn(width=8, seed=0))


@pytest.fixture(scope="module")
def two_input_model():
    keras.utils.set_random_seed(0)
    image = keras.Input((16, 16, 1), name="image")
    meta = keras.Input((3,), name="meta")
    x = keras.layers.Conv2D(8, 3, activation="relu", name="conv1")(image)
    x = keras.layers.Conv2D(8, 3, activation="relu", name="conv2")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    m = keras.layers.Dense(8, activation="relu", name="meta_fc")(meta)
    x = keras.layers.Concatenate()([x, m])
    model = keras.Model([image, meta], keras.layers.Dense(4, name="logits")(x))
    model.compile(
        optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    return model


@pytest.fixture(scope="module")
def regressor():
    model = small_cnn_head()
    return model


def _images(n: int = N, shape=(16, 16, 1)) -> np.ndarray:
    return np.random.default_rng(0).random((n, *shape), dtype=np.float32)


def _ids(n: int = N, classes: int = 10) -> np.ndarray:
    return np.arange(n) % classes


def _begin(model, **kwargs) -> BalanceCallback:
    callback = BalanceCallback(verbose=0, **kwargs)  # construction never raises for data
    callback.set_model(model)
    callback.set_params({"epochs": 2})
    callback.on_train_begin()
    return callback


def _raises(model, *needles: str, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        _begin(model, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message
    return message


def test_probe_data_with_the_wrong_image_shape_names_probe_data(classifier):
    _raises(
        classifier,
        "probe_data",
        "(16, 28, 28, 1)",
        "(None, 16, 16, 1)",
        "'image'",
        probe_data=(_images(shape=(28, 28, 1)), _ids()),
    )


@pytest.mark.parametrize("argument", ["probe_data", "validation_data", "finetune_data"])
def test_labels_shorter_than_inputs_name_the_argument(classifier, argument):
    data = (_images(), _ids(N - 6))
    extra = {"validation_data": (_images(), _ids())} if argument == "finetune_data" else {}
    message = _raises(classifier, argument, "10 samples", f"x has {N}", **{argument: data}, **extra)
    assert message.startswith(argument)


@pytest.mark.parametrize("argument", ["probe_data", "validation_data", "finetune_data"])
def test_empty_arrays_name_the_argument(classifier, argument):
    data = (_images(0), _ids(0))
    extra = {"validation_data": (_images(), _ids())} if argument == "finetune_data" else {}
    _raises(classifier, argument, "empty", **{argument: data}, **extra)


def test_validation_data_of_the_wrong_image_shape_names_validation_data(classifier):
    _raises(
        classifier,
        "validation_data",
        "(16, 8, 8, 1)",
        "(None, 16, 16, 1)",
        validation_data=(_images(shape=(8, 8, 1)), _ids()),
    )


def test_validation_labels_of_the_wrong_width_name_the_output(classifier):
    _raises(
        classifier,
        "validation_data",
        f"y has shape ({N}, 5)",
        "'logits'",
        "(None, 10)",
        "(n, 10) or (n,) or (n, 1)",
        validation_data=(_images(), np.eye(5)[_ids(classes=5)]),
    )


@pytest.mark.parametrize(
    "labels",
    [_ids(), _ids().reshape(-1, 1), np.eye(10)[_ids()]],
    ids=["class_ids", "class_ids_column", "one_hot"],
)
def test_classifier_labels_of_every_accepted_form_pass(classifier, labels):
    data = (_images(), labels)
    callback = _begin(classifier, probe_data=data, validation_data=data, finetune_data=data)
    callback.hooks.remove()
    # Keras accepts a missing trailing dimension of 1 too.
    check_xy(classifier, "validation_data", _images(shape=(16, 16)), labels)


def test_two_input_model_with_list_or_dict_inputs_passes(two_input_model):
    images, meta, labels = _images(), np.zeros((N, 3), np.float32), _ids(classes=4)
    callback = _begin(
        two_input_model,
        probe_data=ProbeData([images, meta], labels),
        validation_data=({"meta": meta, "image": images}, labels),
        finetune_data=([images, meta], labels),
    )
    callback.hooks.remove()


@pytest.mark.parametrize(
    ("x", "needles"),
    [
        (lambda images, meta: images, ("2 inputs ['image', 'meta']", "1 array")),
        (lambda images, meta: [images], ("2 inputs", "list of 1")),
        (lambda images, meta: {"image": images, "extra": meta}, ("keys ['extra', 'image']",)),
        (lambda images, meta: [images, meta[:4]], ("[16, 4] samples",)),
        (lambda images, meta: [meta, images], ("'image'", "(16, 3)", "(None, 16, 16, 1)")),
    ],
    ids=["one_array", "short_list", "wrong_keys", "uneven_samples", "swapped"],
)
def test_two_input_model_with_mismatched_inputs_names_validation_data(two_input_model, x, needles):
    images, meta = _images(), np.zeros((N, 3), np.float32)
    data = (x(images, meta), _ids(classes=4))
    _raises(two_input_model, "validation_data", *needles, validation_data=data)


@pytest.mark.parametrize("shape", [(N,), (N, 1)], ids=["flat", "column"])
def test_regression_targets_pass(regressor, shape):
    targets = np.linspace(0.0, 9.0, N).reshape(shape)
    _begin(regressor, validation_data=(_images(), targets)).hooks.remove()


def test_regression_targets_of_the_wrong_width_name_validation_data(regressor):
    _raises(
        regressor,
        "validation_data",
        f"y has shape ({N}, 3)",
        "(None, 1)",
        validation_data=(_images(), np.zeros((N, 3))),
    )


def test_validation_data_that_is_not_a_pair_names_it(classifier):
    _raises(classifier, "validation_data must be a tuple (x, y)", validation_data=_images())


def test_finetune_dataset_is_not_checked(classifier):
    dataset = tf.data.Dataset.from_tensor_slices((_images(shape=(28, 28, 1)), _ids())).batch(4)
    callback = _begin(classifier, finetune_data=dataset)
    callback.hooks.remove()


def test_custom_probe_loss_skips_the_label_shape_but_not_the_count(classifier):
    odd = np.zeros((N, 7))
    callback = _begin(classifier, probe_data=ProbeData(_images(), odd, loss=lambda y, p: 0.0))
    callback.hooks.remove()
    _raises(classifier, "probe_data", "y has 3 samples", probe_data=ProbeData(_images(), odd[:3]))

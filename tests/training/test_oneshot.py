"""``tfb.prune``: one call from a trained_digits_cnn model to a compacted, fine-tuned, folded model."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import subclassed_cnn

import tf_balancer as tfb
from tf_balancer.analysis import analyze
from tf_balancer.demo import build_digits_cnn
from tf_balancer.errors import ConfigError


@pytest.fixture(scope="module")
def pruned(trained_digits_cnn, digits):
    before = [w.copy() for w in trained_digits_cnn.get_weights()]
    model, report = tfb.prune(
        trained_digits_cnn,
        target=0.5,
        data=(digits.x_train, digits.y_train),
        validation_data=(digits.x_val, digits.y_val),
        finetune_epochs=1,
    )
    return before, model, report


def test_prune_meets_the_target_and_leaves_the_users_model_alone(trained_digits_cnn, pruned):
    before, model, report = pruned
    for got, want in zip(trained_digits_cnn.get_weights(), before, strict=True):
        np.testing.assert_array_equal(got, want)
    assert analyze(model).cost.flops <= 0.5 * analyze(trained_digits_cnn).cost.flops * 1.01
    assert report["final"]["flops"] <= 0.5 * report["dense"]["flops"] * 1.01
    assert [p["name"] for p in report["passes"]][:2] == ["prune_channels", "strip_training_ops"]


def test_prune_reports_accuracy_before_and_after_finetuning(pruned):
    _, _, report = pruned
    scores = report["finetune"]["scores"]
    assert len(scores) == 2  # the compacted model, then one fine-tuned epoch
    assert report["final"]["accuracy"] == pytest.approx(max(scores), abs=1e-6)
    assert report["final"]["accuracy"] >= scores[0]
    assert report["finetune"]["batch_size"] == 32


def test_prune_without_validation_data_skips_finetuning(trained_digits_cnn, digits):
    model, report = tfb.prune(trained_digits_cnn, 0.5, (digits.x_train[:256], digits.y_train[:256]))
    assert report["finetune"] is None
    assert report["final"]["flops"] <= 0.5 * report["dense"]["flops"] * 1.01


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"target": 0.0}, "target"),
        ({"target": 0.5, "importance": "taylor"}, "probe data"),
        ({"target": 0.5, "data": ([1, 2, 3],)}, r"\(x, y\)"),
        ({"target": "half"}, "target must be a number"),
        ({"target": True}, "target must be a number"),
        ({"finetune_epochs": "2"}, "finetune_epochs must be an int"),
        ({"finetune_epochs": 1.5}, "finetune_epochs must be an int"),
        ({"batch_size": 0}, "batch_size must be an int >= 1"),
    ],
)
def test_prune_rejects_bad_arguments(trained_digits_cnn, kwargs, match):
    kwargs = {"finetune_epochs": 0, **kwargs}
    with pytest.raises(ConfigError, match=match):
        tfb.prune(trained_digits_cnn, **kwargs)


@pytest.mark.parametrize(
    "labels, match",
    [
        (lambda y: np.eye(10)[y], r"one-hot\?.*np.argmax"),
        (lambda y: y + 10, "class ids from 10 to 19 but the model has 10 classes"),
        (lambda y: y[:5], "y has 5 samples"),
    ],
    ids=["one_hot_for_a_sparse_loss", "ids_out_of_range", "too_few_labels"],
)
def test_prune_names_labels_that_do_not_fit_the_loss(trained_digits_cnn, digits, labels, match):
    """Before, these reached Keras' loss and raised its own error from deep inside."""
    x, y = digits.x_train[:64], digits.y_train[:64]
    with pytest.raises(ConfigError, match=match):
        tfb.prune(trained_digits_cnn, 0.5, (x, labels(y)), finetune_epochs=0)


def test_prune_accepts_a_numpy_target(trained_digits_cnn, digits):
    data = (digits.x_train[:64], digits.y_train[:64])
    _, report = tfb.prune(trained_digits_cnn, np.float32(0.5), data, finetune_epochs=0)
    assert report["final"]["flops"] <= 0.5 * report["dense"]["flops"] * 1.01


def test_prune_of_a_built_subclassed_model_and_of_inputs_keyed_by_name(digits):
    """A built subclassed model declares no inputs: the data is checked against its
    functional twin (was "the model has 0 inputs"); a two-input model's x may be a dict
    (the report's samples were sliced as a list: TypeError)."""
    import keras as keras3

    keras3.utils.set_random_seed(0)
    net = subclassed_cnn(keras3, filters=16)
    net(digits.x_train[:1])
    net.compile("adam", keras3.losses.SparseCategoricalCrossentropy(from_logits=True))
    data = (digits.x_train[:128], digits.y_train[:128])
    _, report = tfb.prune(net, 0.5, data, validation_data=data, finetune_epochs=0)
    assert report["final"]["flops"] <= 0.5 * report["dense"]["flops"] * 1.01

    img, aux = keras3.Input((16, 16, 1), name="img"), keras3.Input((4,), name="aux")
    merged = keras3.layers.Concatenate()(
        [net.pool(net.conv(img)), keras3.layers.Dense(8, activation="relu")(aux)]
    )
    two = keras3.Model([img, aux], keras3.layers.Dense(10)(merged))
    two.compile("adam", keras3.losses.SparseCategoricalCrossentropy(from_logits=True))
    x = {"img": digits.x_train[:128], "aux": np.ones((128, 4), "float32")}
    _, report = tfb.prune(two, 0.5, (x, data[1]), validation_data=(x, data[1]), finetune_epochs=0)
    assert report["final"]["flops"] <= 0.5 * report["dense"]["flops"] * 1.01
    assert "accuracy" in report["final"]


def test_a_keras3_model_built_on_a_dict_of_inputs_is_pruned_and_reported(digits):
    """``keras.Model({"img": img, "aux": aux}, ...)``: Keras 3 calls it with a dict
    only, and the report's latency and SavedModel size, and the verification's random
    inputs, called it with a list: tfb.prune raised ValueError, and the callback without
    validation data rolled prune_channels back, then raised."""
    import keras as keras3

    keras3.utils.set_random_seed(0)
    img, aux = keras3.Input((16, 16, 1), name="img"), keras3.Input((4,), name="aux")
    y = keras3.layers.Conv2D(16, 3, activation="relu")(img)
    y = keras3.layers.Conv2D(16, 3, activation="relu")(y)
    merged = keras3.layers.Concatenate()(
        [keras3.layers.GlobalAveragePooling2D()(y), keras3.layers.Dense(8, activation="relu")(aux)]
    )
    model = keras3.Model({"img": img, "aux": aux}, keras3.layers.Dense(10)(merged))
    model.compile("adam", keras3.losses.SparseCategoricalCrossentropy(from_logits=True))
    x = {"img": digits.x_train[:128], "aux": np.ones((128, 4), "float32")}
    labels = digits.y_train[:128]
    for validation in (None, (x, labels)):
        small, report = tfb.prune(
            model, 0.5, (x, labels), validation_data=validation, finetune_epochs=0
        )
        assert report["final"]["flops"] <= 0.5 * report["dense"]["flops"] * 1.01
        assert ("latency_ms_b1" in report["final"]) == (validation is not None)
        np.testing.assert_allclose(small.predict(x, verbose=0).shape, (128, 10))
    callback = tfb.BalanceCallback(verbose=0)
    model.fit(x, labels, epochs=3, batch_size=32, callbacks=[callback], verbose=0)
    statuses = {r["name"]: r["status"] for r in callback.report["passes"]}
    assert statuses["prune_channels"] == "applied"


def test_prune_of_an_uncompiled_model_asks_for_compile_when_finetuning(digits):
    model = build_digits_cnn(width=8, seed=0)
    with pytest.raises(ConfigError, match="compile"):
        tfb.prune(model, 0.5, (digits.x_train[:64], digits.y_train[:64]), importance="magnitude")


def test_the_optimized_model_comes_back_compiled_like_the_trained_one(pruned, digits):
    """Ready for evaluate or more fit (was uncompiled: users had to compile it again)."""
    _, model, report = pruned
    scores = model.evaluate(digits.x_val, digits.y_val, verbose=0, return_dict=True)
    assert {"loss", "accuracy"} <= set(scores)
    assert scores["accuracy"] == pytest.approx(report["final"]["accuracy"], abs=1e-6)
    model.fit(digits.x_train[:64], digits.y_train[:64], epochs=1, verbose=0)


def test_prune_takes_a_finite_dataset_of_batches_as_it_takes_arrays(trained_digits_cnn, digits):
    """data and validation_data as fit takes them: the same plan as from the arrays."""
    import tensorflow as tf

    x, y = digits.x_train[:256], digits.y_train[:256]
    batches = tf.data.Dataset.from_tensor_slices((x, y)).batch(48)  # a ragged last batch
    val = tf.data.Dataset.from_tensor_slices((digits.x_val[:96], digits.y_val[:96])).batch(32)
    kwargs = {"target": 0.5, "finetune_epochs": 0}
    from_arrays, _ = tfb.prune(trained_digits_cnn, data=(x, y), **kwargs)
    from_dataset, report = tfb.prune(
        trained_digits_cnn, data=batches, validation_data=val, **kwargs
    )
    assert [w.shape for w in from_dataset.get_weights()] == [
        w.shape for w in from_arrays.get_weights()
    ]
    assert "accuracy" in report["final"]  # scored on the validation dataset


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda ds: ds.repeat(), r"infinite.*take\(n\)"),
        (lambda ds: ds.take(0), "empty"),
        (lambda ds: ds.map(lambda x, y: x), r"\(x, y\) batches"),
    ],
)
def test_prune_refuses_a_dataset_it_cannot_read_once(trained_digits_cnn, digits, make, match):
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices((digits.x_train[:64], digits.y_train[:64])).batch(32)
    with pytest.raises(ConfigError, match=match):
        tfb.prune(trained_digits_cnn, data=make(ds), finetune_epochs=0)

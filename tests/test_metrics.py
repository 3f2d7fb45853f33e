"""MacroRecall / MacroF1 / macro_scores agree with scikit-learn's macro scores."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from sklearn.metrics import accuracy_score, f1_score, recall_score  # noqa: E402

from tf_balancer._compat import keras  # noqa: E402
from tf_balancer.metrics import MacroF1, MacroRecall, macro_scores  # noqa: E402

QUICK = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def sk_scores(y_true, y_pred, num_classes, sample_weight=None):
    kwargs = dict(
        labels=list(range(num_classes)),
        average="macro",
        zero_division=0,
        sample_weight=sample_weight,
    )
    return recall_score(y_true, y_pred, **kwargs), f1_score(y_true, y_pred, **kwargs)


def metric_values(y_true, y_pred, num_classes, sample_weight=None, **kwargs):
    recall = MacroRecall(num_classes=num_classes, **kwargs)
    f1 = MacroF1(num_classes=num_classes, **kwargs)
    for metric in (recall, f1):
        metric.update_state(y_true, y_pred, sample_weight=sample_weight)
    return float(recall.result()), float(f1.result())


@st.composite
def multiclass_batches(draw):
    """(labels, scores, weights, num_classes); few samples so some classes go missing."""
    num_classes = draw(st.integers(2, 7))
    n = draw(st.integers(1, 40))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, n)
    scores = rng.normal(size=(n, num_classes)).astype("float32")
    weights = rng.uniform(0.0, 3.0, n).astype("float32")
    return labels, scores, weights, num_classes


@QUICK
@given(batch=multiclass_batches(), weighted=st.booleans())
def test_sparse_labels_match_sklearn(batch, weighted):
    labels, scores, weights, num_classes = batch
    sw = weights if weighted else None
    expected = sk_scores(labels, scores.argmax(1), num_classes, sw)
    np.testing.assert_allclose(metric_values(labels, scores, num_classes, sw), expected, atol=1e-6)
    # Keras hands sparse labels and weights over as (batch, 1) float columns.
    got = metric_values(
        labels[:, None].astype("float32"), scores, num_classes, None if sw is None else sw[:, None]
    )
    np.testing.assert_allclose(got, expected, atol=1e-6)


@QUICK
@given(batch=multiclass_batches(), weighted=st.booleans(), explicit=st.booleans())
def test_one_hot_labels_match_sklearn(batch, weighted, explicit):
    labels, scores, weights, num_classes = batch
    sw = weights if weighted else None
    one_hot = np.eye(num_classes, dtype="float32")[labels]
    mode = "one_hot" if explicit else "auto"
    expected = sk_scores(labels, scores.argmax(1), num_classes, sw)
    got = metric_values(one_hot, scores, num_classes, sw, label_mode=mode)
    np.testing.assert_allclose(got, expected, atol=1e-6)


@QUICK
@given(
    n=st.integers(1, 40),
    seed=st.integers(0, 2**31 - 1),
    from_logits=st.booleans(),
    column=st.booleans(),
    weighted=st.booleans(),
)
def test_binary_output_matches_sklearn(n, seed, from_logits, column, weighted):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    outputs = rng.normal(size=n).astype("float32")
    if not from_logits:
        outputs = 1.0 / (1.0 + np.exp(-outputs))
    predicted = (outputs > (0.0 if from_logits else 0.5)).astype(int)
    sw = rng.uniform(0.0, 2.0, n) if weighted else None
    expected = sk_scores(labels, predicted, 2, sw)
    y_pred = outputs[:, None] if column else outputs
    y_true = labels[:, None] if column else labels
    got = metric_values(y_true, y_pred, 2, sw, from_logits=from_logits)
    np.testing.assert_allclose(got, expected, atol=1e-6)


@QUICK
@given(
    n=st.integers(1, 40),
    labels=st.integers(2, 6),
    seed=st.integers(0, 2**31 - 1),
    from_logits=st.booleans(),
    weighted=st.booleans(),
)
def test_multi_label_matches_sklearn(n, labels, seed, from_logits, weighted):
    """``label_mode="multi_label"``: sklearn's macro scores on indicator arrays."""
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, 2, (n, labels))
    outputs = rng.normal(size=(n, labels)).astype("float32")
    if not from_logits:
        outputs = 1.0 / (1.0 + np.exp(-outputs))
    predicted = (outputs > (0.0 if from_logits else 0.5)).astype(int)
    sw = rng.uniform(0.0, 2.0, n) if weighted else None
    kwargs = dict(average="macro", zero_division=0, sample_weight=sw)
    expected = recall_score(truth, predicted, **kwargs), f1_score(truth, predicted, **kwargs)
    got = metric_values(
        truth.astype("float32"),
        outputs,
        labels,
        sw,
        label_mode="multi_label",
        from_logits=from_logits,
    )
    np.testing.assert_allclose(got, expected, atol=1e-6)


def test_task_metrics_for_a_multi_label_head():
    from tf_balancer.metrics import task_metrics

    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="sigmoid")])
    model.compile(loss="binary_crossentropy")
    metrics = task_metrics(model)
    assert [m.name for m in metrics] == ["macro_recall", "macro_f1"]
    assert {m.label_mode for m in metrics} == {"multi_label"} and metrics[0].num_classes == 3


def test_binary_output_with_one_hot_labels():
    labels = np.array([0, 1, 1, 0, 1])
    probs = np.array([[0.2], [0.9], [0.4], [0.7], [0.6]], dtype="float32")
    expected = sk_scores(labels, (probs[:, 0] > 0.5).astype(int), 2)
    got = metric_values(np.eye(2)[labels], probs, 2)
    np.testing.assert_allclose(got, expected, atol=1e-6)


def test_auto_mode_keeps_sparse_labels_whose_width_equals_num_classes():
    # Segmentation-style labels (batch, h, w) with w == num_classes are still sparse.
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, (4, 5, 3))
    scores = rng.normal(size=(4, 5, 3, 3)).astype("float32")
    expected = sk_scores(labels.ravel(), scores.argmax(-1).ravel(), 3)
    np.testing.assert_allclose(metric_values(labels, scores, 3), expected, atol=1e-6)


@QUICK
@given(batch=multiclass_batches(), cuts=st.lists(st.integers(0, 40), max_size=4))
def test_accumulation_equals_one_update_on_concatenation(batch, cuts):
    labels, scores, weights, num_classes = batch
    bounds = [0, *sorted(c % (len(labels) + 1) for c in cuts), len(labels)]
    for cls in (MacroRecall, MacroF1):
        pieces, whole = cls(num_classes), cls(num_classes)
        for start, stop in zip(bounds[:-1], bounds[1:], strict=True):
            pieces.update_state(labels[start:stop], scores[start:stop], weights[start:stop])
        whole.update_state(labels, scores, weights)
        np.testing.assert_allclose(pieces.result(), whole.result(), atol=1e-6)
        np.testing.assert_allclose(pieces.confusion_matrix, whole.confusion_matrix, rtol=1e-12)


def test_reset_state_forgets_previous_batches():
    metric = MacroF1(num_classes=3)
    metric.update_state([0, 1, 2], np.eye(3)[[1, 2, 0]])
    assert float(metric.result()) == 0.0
    metric.reset_state()
    assert not np.any(metric.confusion_matrix.numpy())
    metric.update_state([0, 1, 2], np.eye(3))
    assert float(metric.result()) == pytest.approx(1.0)


def test_empty_metric_is_zero():
    assert float(MacroRecall(num_classes=4).result()) == 0.0
    assert float(MacroF1(num_classes=4).result()) == 0.0


def test_works_inside_tf_function_with_unknown_shapes():
    recall, f1 = MacroRecall(num_classes=4), MacroF1(num_classes=4)
    spec_true = tf.TensorSpec([None, None], tf.float32)
    spec_pred = tf.TensorSpec([None, None], tf.float32)

    @tf.function(input_signature=[spec_true, spec_pred])
    def step(y_true, y_pred):
        recall.update_state(y_true, y_pred)
        f1.update_state(y_true, y_pred)
        return recall.result(), f1.result()

    rng = np.random.default_rng(1)
    labels = rng.integers(0, 4, 30)
    scores = rng.normal(size=(30, 4)).astype("float32")
    step(np.eye(4, dtype="float32")[labels[:12]], scores[:12])  # one-hot, decided at run time
    got = step(labels[12:, None].astype("float32"), scores[12:])  # sparse column
    expected = sk_scores(labels, scores.argmax(1), 4)
    np.testing.assert_allclose([float(v) for v in got], expected, atol=1e-6)


def test_binary_output_decided_at_run_time_inside_tf_function():
    metric = MacroF1(num_classes=2)
    spec = tf.TensorSpec([None, None], tf.float32)

    @tf.function(input_signature=[spec, spec])
    def step(y_true, y_pred):
        metric.update_state(y_true, y_pred)
        return metric.result()

    labels = np.array([0, 1, 1, 0, 1, 0])
    probs = np.array([0.1, 0.8, 0.3, 0.6, 0.9, 0.2], dtype="float32")
    step(labels[:3, None].astype("float32"), probs[:3, None])  # one sigmoid column
    scores = np.stack([1.0 - probs[3:], probs[3:]], axis=1)  # two softmax columns
    got = float(step(labels[3:, None].astype("float32"), scores))
    assert got == pytest.approx(sk_scores(labels, (probs > 0.5).astype(int), 2)[1], abs=1e-6)


def test_compile_and_evaluate_match_sklearn():
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(96, 6)).astype("float32")
    y = rng.integers(0, 4, 96)
    w = rng.uniform(0.5, 2.0, 96).astype("float32")
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(4)])
    model.compile(
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[MacroRecall(num_classes=4), MacroF1(num_classes=4)],
        weighted_metrics=[MacroRecall(num_classes=4, name="w_recall")],
    )
    model.fit(x, y, batch_size=32, epochs=1, verbose=0)
    logs = model.evaluate(x, y, sample_weight=w, batch_size=20, verbose=0, return_dict=True)
    predicted = model.predict(x, verbose=0).argmax(1)
    recall, f1 = sk_scores(y, predicted, 4)
    assert logs["macro_recall"] == pytest.approx(recall, abs=1e-6)
    assert logs["macro_f1"] == pytest.approx(f1, abs=1e-6)
    assert logs["w_recall"] == pytest.approx(sk_scores(y, predicted, 4, w)[0], abs=1e-6)


def test_compile_and_evaluate_one_hot_and_binary():
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(2)
    x = rng.normal(size=(64, 5)).astype("float32")
    y = rng.integers(0, 3, 64)
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(3, activation="softmax")])
    model.compile(loss="categorical_crossentropy", metrics=[MacroF1(num_classes=3)])
    logs = model.evaluate(x, np.eye(3)[y], batch_size=16, verbose=0, return_dict=True)
    expected = sk_scores(y, model.predict(x, verbose=0).argmax(1), 3)[1]
    assert logs["macro_f1"] == pytest.approx(expected, abs=1e-6)

    yb = rng.integers(0, 2, 64)
    binary = keras.Sequential([keras.Input((5,)), keras.layers.Dense(1)])
    binary.compile(
        loss=keras.losses.BinaryCrossentropy(from_logits=True),
        metrics=[MacroRecall(num_classes=2, from_logits=True)],
    )
    logs = binary.evaluate(x, yb, batch_size=16, verbose=0, return_dict=True)
    predicted = (binary.predict(x, verbose=0)[:, 0] > 0).astype(int)
    assert logs["macro_recall"] == pytest.approx(sk_scores(yb, predicted, 2)[0], abs=1e-6)


@pytest.mark.parametrize("cls", [MacroRecall, MacroF1])
def test_get_config_round_trip(cls):
    metric = cls(num_classes=5, label_mode="one_hot", from_logits=True, name="m", dtype="float64")
    config = metric.get_config()
    clone = cls.from_config(config)
    assert clone.get_config() == config
    assert (clone.num_classes, clone.label_mode, clone.from_logits) == (5, "one_hot", True)
    assert clone.name == "m" and clone.dtype == "float64"
    restored = keras.metrics.deserialize(keras.metrics.serialize(metric))
    assert isinstance(restored, cls) and restored.get_config() == config


@pytest.mark.parametrize("cls", [MacroRecall, MacroF1])
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_classes": 1}, "num_classes must be >= 2"),
        ({"num_classes": 0}, "num_classes must be >= 2"),
        ({"num_classes": 2.0}, "num_classes must be an int"),
        ({"num_classes": True}, "num_classes must be an int"),
        ({"num_classes": 3, "label_mode": "onehot"}, "label_mode must be one of"),
        ({"num_classes": 3, "from_logits": "yes"}, "from_logits must be True or False"),
    ],
)
def test_bad_constructor_args_raise_value_error(cls, kwargs, message):
    with pytest.raises(ValueError, match=message):
        cls(**kwargs)


def test_prediction_width_mismatch_raises_value_error():
    with pytest.raises(ValueError, match="num_classes=3"):
        MacroRecall(num_classes=3).update_state([0, 1], [[0.3], [0.8]])
    with pytest.raises(ValueError, match="5 columns"):
        MacroF1(num_classes=3).update_state([0, 1], np.zeros((2, 5)))


@QUICK
@given(batch=multiclass_batches(), weighted=st.booleans(), one_hot=st.booleans())
def test_macro_scores_matches_sklearn(batch, weighted, one_hot):
    labels, scores, weights, num_classes = batch
    sw = weights if weighted else None
    predicted = scores.argmax(1)
    y_true = np.eye(num_classes)[labels] if one_hot else labels
    got = macro_scores(y_true, predicted, num_classes, sample_weight=sw)
    recall, f1 = sk_scores(labels, predicted, num_classes, sw)
    accuracy = accuracy_score(labels, predicted, sample_weight=sw)
    assert set(got) == {"accuracy", "recall", "f1"}
    np.testing.assert_allclose(
        [got["accuracy"], got["recall"], got["f1"]], [accuracy, recall, f1], atol=1e-9
    )
    np.testing.assert_allclose(
        [got["recall"], got["f1"]], metric_values(labels, scores, num_classes, sw), atol=1e-6
    )


def test_macro_scores_rejects_bad_input():
    with pytest.raises(ValueError, match="3 samples but y_pred_labels has 2"):
        macro_scores([0, 1, 1], [0, 1], num_classes=2)
    with pytest.raises(ValueError, match="outside"):
        macro_scores([0, 3], [0, 1], num_classes=3)
    with pytest.raises(ValueError, match="num_classes must be >= 2"):
        macro_scores([0], [0], num_classes=1)
    with pytest.raises(ValueError, match="sample_weight has 1 entries"):
        macro_scores([0, 1], [0, 1], num_classes=2, sample_weight=[1.0])
    assert macro_scores([], [], num_classes=2) == {"accuracy": 0.0, "recall": 0.0, "f1": 0.0}

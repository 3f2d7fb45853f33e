"""GradientStream: streamed first-order Taylor equals the probe-batch Taylor on the same batches."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from tf_balancer.analysis import analyze
from tf_balancer.attention.importance import ProbeData, get_importance, group_scores
from tf_balancer.attention.streaming import GradientStream, producer_weights
from tf_balancer.demo import build_digits_cnn, compile_classifier
from tf_balancer.demo_sequences import (
    build_digits_bigru,
    build_digits_lstm,
    build_digits_transformer,
    load_digit_sequences,
)

_MODELS = {
    "cnn": lambda: build_digits_cnn(width=8, seed=0),
    "lstm": lambda: build_digits_lstm(units=8),
    "bigru": lambda: build_digits_bigru(units=6),
    "transformer": lambda: build_digits_transformer(width=16, ffn=16),
}


@pytest.fixture(scope="module", params=list(_MODELS))
def setup(request, digits):
    """A trained model (CNN on images; recurrent and attention models on the
    digits read as sequences), its analysis, and its data."""
    data = digits if request.param == "cnn" else load_digit_sequences(0)
    model = compile_classifier(_MODELS[request.param]())
    model.fit(data.x_train[:256], data.y_train[:256], epochs=1, verbose=0)
    return model, analyze(model), data


def _grads(model, x, y):
    with tf.GradientTape() as tape:
        loss = model.loss(y, model(x, training=False))
    return tape.gradient(loss, model.trainable_variables)


def test_stream_equals_probe_taylor_on_the_same_batches(setup):
    model, analysis, digits = setup
    stream = GradientStream(analysis.graph)
    batches = [(digits.x_train[i : i + 64], digits.y_train[i : i + 64]) for i in (0, 64, 128)]
    for x, y in batches:
        stream.update(zip(_grads(model, x, y), model.trainable_variables, strict=True))
    probe = ProbeData(digits.x_train[:192], digits.y_train[:192], batch_size=64)
    expected = get_importance("taylor")(analysis.graph, probe)
    got = get_importance("taylor")(analysis.graph, stream)
    assert stream.batches == 3
    assert got.keys() == expected.keys()
    for name in expected:
        np.testing.assert_allclose(got[name], expected[name], rtol=1e-4, atol=1e-9)


def test_stream_update_is_abs_of_the_per_channel_sum_of_w_times_g(setup):
    model, analysis, digits = setup
    stream = GradientStream(analysis.graph)
    grads = _grads(model, digits.x_train[:32], digits.y_train[:32])
    by_id = {id(v): g for v, g in zip(model.trainable_variables, grads, strict=True)}
    stream.update(zip(grads, model.trainable_variables, strict=True))
    expected: dict[str, np.ndarray] = {}
    for name, weight, axis in producer_weights(analysis.graph):
        product = weight.numpy() * by_id[id(weight)].numpy()
        along = product.sum(axis=tuple(i for i in range(product.ndim) if i != axis.axis))
        expected[name] = expected.get(name, 0.0) + along.reshape(axis.blocks, -1).sum(0)
    scores = stream.scores()
    for name, value in expected.items():
        np.testing.assert_allclose(scores[name], np.abs(value), rtol=1e-5, atol=1e-9)


def test_reset_starts_a_new_window_and_ignores_foreign_variables(setup):
    model, analysis, digits = setup
    stream = GradientStream(analysis.graph)
    stream.update(
        zip(
            _grads(model, digits.x_train[:32], digits.y_train[:32]),
            model.trainable_variables,
            strict=True,
        )
    )
    assert stream.batches == 1 and any(s.sum() > 0 for s in stream.scores().values())
    stream.reset()
    assert stream.batches == 0 and all(s.sum() == 0 for s in stream.scores().values())
    other = tf.Variable(tf.ones((3, 3)))
    stream.update([(tf.ones((3, 3)), other), (None, model.trainable_variables[0])])
    assert all(s.sum() == 0 for s in stream.scores().values())


def test_an_inactive_stream_skips_the_work_inside_a_traced_step(setup):
    model, analysis, digits = setup
    stream = GradientStream(analysis.graph)
    grads = _grads(model, digits.x_train[:32], digits.y_train[:32])

    @tf.function
    def step():
        stream.update(zip(grads, model.trainable_variables, strict=True))

    step()
    before = {name: s.copy() for name, s in stream.scores().items()}
    stream.set_active(False)  # the traced step reads the flag: no retrace needed
    step()
    assert stream.batches == 1
    assert all(np.array_equal(before[n], s) for n, s in stream.scores().items())
    stream.set_active(True)
    step()
    assert stream.batches == 2


def test_group_scores_accepts_a_stream(setup):
    model, analysis, digits = setup
    stream = GradientStream(analysis.graph)
    stream.update(
        zip(
            _grads(model, digits.x_train[:64], digits.y_train[:64]),
            model.trainable_variables,
            strict=True,
        )
    )
    scores = group_scores(analysis.graph, stream, {"taylor": 1.0, "magnitude": 0.5})
    assert {g.id for g in analysis.graph.prunable_groups} == set(scores)
    assert all(np.all(s >= 0) and np.any(s > 0) for s in scores.values())


def test_loss_scaled_gradients_are_unscaled_and_overflowed_batches_skipped(setup):
    # Mixed precision: Keras 3 hands the optimizer gradients times the loss scale, and a
    # batch whose gradients overflowed (the loss-scale optimizer skips it) must add nothing.
    model, analysis, digits = setup
    grads = _grads(model, digits.x_train[:32], digits.y_train[:32])
    variables = model.trainable_variables
    plain = GradientStream(analysis.graph)
    plain.update(zip(grads, variables, strict=True))
    stream = GradientStream(analysis.graph)
    stream.update(zip([g * 1024.0 for g in grads], variables, strict=True), scale=1024.0)
    overflowed = [tf.fill(tf.shape(grads[-1]), np.inf)]
    stream.update(zip([*grads[:-1], *overflowed], variables, strict=True))
    assert stream.batches == 1
    for name, expected in plain.scores().items():
        np.testing.assert_allclose(stream.scores()[name], expected, rtol=1e-5, atol=1e-9)


def test_probe_data_uses_every_sample_it_is_given(digits):
    probe = ProbeData(digits.x_train[:512], digits.y_train[:512])
    assert sum(len(x) for x, _ in probe.batches()) == 512
    assert sum(len(x) for x, _ in ProbeData(digits.x_train[:100], max_batches=1).batches()) == 64

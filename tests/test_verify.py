"""Tests of the verifiers: ``compare_outputs``, ``compare_signature``, ``random_inputs``."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from tf_balancer._compat import keras
from tf_balancer.verify import (
    Outcome,
    compare_outputs,
    compare_signature,
    random_inputs,
    run_model,
)

L = keras.layers


def _dense(units=3, dtype="float32", seed=0):
    keras.utils.set_random_seed(seed)
    inp = keras.Input((4,), name="x")
    return keras.Model(inp, L.Dense(units, dtype=dtype, name="dense")(inp))


def _copy(model, shift=0.0):
    new = keras.models.clone_model(model)
    new.set_weights(model.get_weights())
    for layer in new.layers:
        if getattr(layer, "bias", None) is not None:
            layer.bias.assign(layer.bias + shift)
    return new


def _two_outputs(seed=0):
    keras.utils.set_random_seed(seed)
    inp = keras.Input((4,), name="x")
    hidden = L.Dense(5, activation="relu", name="hidden")(inp)
    return keras.Model(inp, [L.Dense(3, name="a")(hidden), L.Dense(2, name="b")(hidden)])


X = np.random.default_rng(0).normal(size=(6, 4)).astype("float32")


def test_identical_models_are_ok():
    model = _dense()
    outcome = compare_outputs(model, _copy(model), X)
    assert outcome == Outcome(True, 0.0, 0.0, "")


def test_small_differences_within_tolerance_are_ok_and_reported():
    model = _dense()
    outcome = compare_outputs(model, _copy(model, shift=1e-6), X, rtol=1e-4, atol=1e-5)
    assert outcome.ok
    assert 0.0 < outcome.max_abs_diff < 1e-5


def test_differences_beyond_tolerance_are_not_ok():
    model = _dense()
    outcome = compare_outputs(model, _copy(model, shift=0.5), X)
    assert not outcome.ok
    assert outcome.max_abs_diff == pytest.approx(0.5, rel=1e-5)
    assert outcome.max_rel_diff > 0
    assert "output 0" in outcome.reason


def test_tolerances_are_honoured():
    model = _dense()
    shifted = _copy(model, shift=1e-3)
    assert not compare_outputs(model, shifted, X, rtol=0.0, atol=1e-4).ok
    assert compare_outputs(model, shifted, X, rtol=0.0, atol=1e-2).ok


def test_shape_mismatch_is_not_ok():
    outcome = compare_outputs(_dense(3), _dense(4), X)
    assert not outcome.ok
    assert "(6, 4)" in outcome.reason and "(6, 3)" in outcome.reason


def test_dtype_mismatch_is_not_ok():
    model = _dense()
    wide = _dense(dtype="float64")
    wide.set_weights(model.get_weights())
    outcome = compare_outputs(model, wide, X)
    assert not outcome.ok
    assert "float64" in outcome.reason and "float32" in outcome.reason
    assert not compare_signature(model, wide, X).ok


def test_multi_output_models_are_compared_output_by_output():
    model = _two_outputs()
    assert compare_outputs(model, _copy(model), X).ok
    changed = _copy(model)
    changed.get_layer("b").bias.assign(changed.get_layer("b").bias + 0.1)
    outcome = compare_outputs(model, changed, X)
    assert not outcome.ok
    assert "output 1" in outcome.reason
    assert outcome.max_abs_diff == pytest.approx(0.1, rel=1e-4)


def test_output_count_mismatch_is_not_ok():
    outcome = compare_outputs(_two_outputs(), _dense(), X)
    assert not outcome.ok
    assert "1 outputs instead of 2" in outcome.reason
    assert not compare_signature(_two_outputs(), _dense(), X).ok


def test_compare_signature_ignores_values():
    model = _dense()
    assert compare_signature(model, _copy(model, shift=10.0), X).ok
    assert not compare_signature(model, _dense(4), X).ok


def test_concrete_functions_are_compared_like_models():
    model = _dense()
    function = tf.function(lambda x: model(x, training=False)).get_concrete_function(
        tf.TensorSpec([None, 4], tf.float32)
    )
    assert compare_outputs(model, function, X).ok
    (out,) = run_model(function, X)
    np.testing.assert_allclose(out, model(X).numpy(), rtol=1e-6)


def test_random_inputs_are_deterministic_and_match_the_model():
    model = _dense()
    first, again = random_inputs(model), random_inputs(model)
    np.testing.assert_array_equal(first, again)
    assert first.shape == (2, 4) and first.dtype == np.float32
    assert 0.0 <= first.min() and first.max() < 1.0
    assert not np.array_equal(first, random_inputs(model, seed=1))
    assert random_inputs(model, batch_size=5).shape == (5, 4)


def test_random_inputs_for_several_inputs_is_a_list():
    a, b = keras.Input((3,), name="a"), keras.Input((2, 2), name="b", dtype="float64")
    joined = L.Concatenate()([a, L.Flatten()(L.Activation("linear", dtype="float64")(b))])
    model = keras.Model([a, b], joined)
    arrays = random_inputs(model, batch_size=4, seed=3)
    assert isinstance(arrays, list) and len(arrays) == 2
    assert arrays[0].shape == (4, 3) and arrays[0].dtype == np.float32
    assert arrays[1].shape == (4, 2, 2) and arrays[1].dtype == np.float64
    for x, y in zip(arrays, random_inputs(model, batch_size=4, seed=3), strict=True):
        np.testing.assert_array_equal(x, y)


def test_random_inputs_for_token_ids_are_ids_below_the_smallest_vocabulary():
    """Before: integer inputs were all 0, sequences of padding only; behind
    ``Embedding(mask_zero=True)`` their outputs (attention over no key, a mean over no
    step) are so ill-conditioned that rounding failed a compaction's verification."""
    ids, other = keras.Input((12,), dtype="int32"), keras.Input((3,), dtype="int32")
    wide = L.GlobalAveragePooling1D()(L.Embedding(50, 4, mask_zero=True)(ids))
    narrow = L.Flatten()(L.Embedding(7, 4)(other))
    model = keras.Model([ids, other], L.Concatenate()([wide, narrow]))
    tokens, small = random_inputs(model, batch_size=8)
    assert tokens.dtype == np.int32 and tokens.shape == (8, 12)
    assert 0 <= tokens.min() and tokens.max() < 7 and small.max() < 7
    assert (tokens != 0).mean() > 0.5
    float_model = _dense()
    assert random_inputs(float_model).dtype == np.float32

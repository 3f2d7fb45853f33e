"""Tests for tf_balancer.graph.walk: flattening functional models and rebuilding them."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import subclassed_model

from tf_balancer._compat import keras
from tf_balancer.errors import UnsupportedModelError
from tf_balancer.graph.walk import IDENTITY, clone_flat, clone_layer, rebuild, walk_model

L = keras.layers


def _nested_model() -> keras.Model:
    """conv -> nested Functional 'inner' -> nested Sequential 'seq' -> flatten -> dense."""
    keras.utils.set_random_seed(1)
    inner_in = keras.Input((8, 8, 4))
    inner = keras.Model(
        inner_in, L.Conv2D(5, 3, padding="same", name="conv")(inner_in), name="inner"
    )
    seq = keras.Sequential([L.Conv2D(6, 1, name="sc"), L.ReLU(name="r")], name="seq")
    inp = keras.Input((8, 8, 3))
    x = L.Conv2D(4, 3, padding="same", name="c0")(inp)
    x = seq(inner(x))
    return keras.Model(inp, L.Dense(3, name="d")(L.Flatten(name="flatten")(x)), name="outer")


def _residual_concat_model() -> keras.Model:
    keras.utils.set_random_seed(2)
    inp = keras.Input((6, 6, 3))
    a = L.Conv2D(4, 3, padding="same", name="a")(inp)
    b = L.Conv2D(4, 1, name="b")(a)
    s = L.Add(name="add")([a, b])
    c = L.Concatenate(name="cat")([s, L.Conv2D(2, 1, name="c")(inp)])
    x = L.BatchNormalization(name="bn")(c)
    return keras.Model(inp, L.Dense(2, name="head")(L.GlobalAveragePooling2D(name="gap")(x)))


def _shared_dense_model() -> keras.Model:
    keras.utils.set_random_seed(3)
    inp = keras.Input((4,))
    shared = L.Dense(4, name="sh")
    return keras.Model(inp, L.Dense(2, name="out")(shared(shared(inp))))


def _siamese_model() -> keras.Model:
    """One nested model applied to two inputs; output is the difference."""
    keras.utils.set_random_seed(4)
    enc_in = keras.Input((4,))
    encoder = keras.Model(enc_in, L.Dense(3, name="d")(enc_in), name="enc")
    a, b = keras.Input((4,), name="a"), keras.Input((4,), name="b")
    return keras.Model([a, b], L.Subtract(name="sub")([encoder(a), encoder(b)]))


def _x(shape, seed=0):
    return np.random.default_rng(seed).normal(size=(2, *shape)).astype("float32")


def test_walk_flattens_nested_models_into_scoped_names():
    walk = walk_model(_nested_model())
    names = [call.name for call in walk.calls]
    assert names == ["c0", "inner/conv", "seq/sc", "seq/r", "flatten", "d"]
    by_name = {call.name: call for call in walk.calls}
    # The nested model's input is the outer producer's output tensor (aliased, same key).
    assert by_name["inner/conv"].inputs == by_name["c0"].outputs
    assert by_name["seq/sc"].inputs == by_name["inner/conv"].outputs
    assert walk.output_keys == by_name["d"].outputs
    assert by_name["c0"].inputs == walk.input_keys
    assert by_name["inner/conv"].class_name == "Conv2D"


def test_walk_calls_are_in_topological_order_with_shapes():
    walk = walk_model(_residual_concat_model())
    available = set(walk.input_keys)
    for call in walk.calls:
        assert set(call.inputs) <= available, call.name
        available.update(call.outputs)
    by_name = {call.name: call for call in walk.calls}
    assert walk.shapes[by_name["cat"].outputs[0]] == (None, 6, 6, 6)
    assert walk.shapes[by_name["gap"].outputs[0]] == (None, 6)
    assert walk.dtypes[by_name["head"].outputs[0]] == "float32"
    assert len(by_name["add"].inputs) == 2


def test_walk_sequential_model():
    model = keras.Sequential(
        [keras.Input((5,)), L.Dense(3, name="h"), L.Dropout(0.5, name="drop"), L.Dense(1, name="o")]
    )
    walk = walk_model(model)
    assert [c.name for c in walk.calls] == ["h", "drop", "o"]
    assert walk.model_name == model.name
    assert not any(c.shared for c in walk.calls)


def test_walk_marks_shared_layer_calls():
    walk = walk_model(_shared_dense_model())
    assert [(c.name, c.shared) for c in walk.calls] == [
        ("sh", True),
        ("sh#1", True),
        ("out", False),
    ]
    first, second = walk.calls[0], walk.calls[1]
    assert first.layer is second.layer
    assert second.inputs == first.outputs


def test_walk_rejects_subclassed_model():
    model = subclassed_model()
    with pytest.raises(UnsupportedModelError, match="subclassed"):
        walk_model(model)


def test_walk_rejects_unbuilt_sequential_model():
    with pytest.raises(UnsupportedModelError, match="Functional or Sequential"):
        walk_model(keras.Sequential([L.Dense(2)]))


@pytest.mark.parametrize(
    "build, shapes",
    [
        (_nested_model, [(8, 8, 3)]),
        (_residual_concat_model, [(6, 6, 3)]),
        (_shared_dense_model, [(4,)]),
    ],
)
def test_rebuild_with_original_layers_reproduces_outputs(build, shapes):
    model = build()
    xs = [_x(s, i) for i, s in enumerate(shapes)]
    rebuilt = rebuild(walk_model(model), lambda call: call.layer, name="copy")
    assert rebuilt.name == "copy"
    np.testing.assert_allclose(rebuilt(xs), model(xs), rtol=1e-6, atol=1e-6)


def test_rebuild_keeps_two_calls_of_a_nested_model_apart():
    """A nested model applied to two inputs must give two different branches.

    Its inner tensors are the same Python objects for both calls, so keys built
    from ``id(tensor)`` alone collapse the two calls into one.
    """
    model = _siamese_model()
    walk = walk_model(model)
    first, second = (c for c in walk.calls if c.layer.name == "d")
    assert first.outputs != second.outputs
    xs = [_x((4,), 0), _x((4,), 1)]
    rebuilt = rebuild(walk, lambda call: call.layer)
    np.testing.assert_allclose(rebuilt(xs), model(xs), rtol=1e-6, atol=1e-6)


def test_rebuild_identity_drops_a_call():
    keras.utils.set_random_seed(5)
    inp = keras.Input((4,))
    h = L.Dense(3, name="h")(inp)
    model = keras.Model(inp, L.Dense(2, name="o")(L.ReLU(name="relu")(h)))
    rebuilt = rebuild(
        walk_model(model), lambda call: IDENTITY if call.name == "relu" else call.layer
    )
    assert "relu" not in [layer.name for layer in rebuilt.layers]
    x = _x((4,))
    w1, b1, w2, b2 = model.get_weights()
    np.testing.assert_allclose(rebuilt(x), (x @ w1 + b1) @ w2 + b2, rtol=1e-5, atol=1e-5)


def test_rebuild_exposes_intermediate_tensors():
    model = _residual_concat_model()
    walk = walk_model(model)
    add_key = next(c.outputs[0] for c in walk.calls if c.name == "add")
    rebuilt = rebuild(walk, lambda call: call.layer, outputs=[add_key, *walk.output_keys])
    x = _x((6, 6, 3))
    add_out, head_out = rebuilt(x)
    probe = keras.Model(model.input, model.get_layer("add").output)
    np.testing.assert_allclose(add_out, probe(x), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(head_out, model(x), rtol=1e-6, atol=1e-6)


def test_clone_flat_copies_weights_into_independent_layers():
    model = _nested_model()
    x = _x((8, 8, 3))
    before = model(x).numpy()
    copy, layers = clone_flat(walk_model(model))
    np.testing.assert_allclose(copy(x), before, rtol=1e-6, atol=1e-6)
    assert set(layers) == {"c0", "inner/conv", "seq/sc", "seq/r", "flatten", "d"}
    original = model.get_layer("inner").get_layer("conv")
    assert layers["inner/conv"] is not original
    kernel, bias = layers["inner/conv"].get_weights()
    layers["inner/conv"].set_weights([kernel * 0.0, bias])
    np.testing.assert_allclose(model(x), before, rtol=1e-6, atol=1e-6)


def test_clone_flat_keeps_shared_layers_shared():
    _, layers = clone_flat(walk_model(_shared_dense_model()))
    assert layers["sh"] is layers["sh#1"]
    assert layers["sh"] is not layers["out"]


def test_clone_layer_applies_config_overrides():
    conv = L.Conv2D(8, 3, padding="same", activation="relu", name="conv")
    clone = clone_layer(conv, filters=3)
    assert isinstance(clone, L.Conv2D)
    assert clone is not conv
    assert clone.filters == 3
    assert clone.kernel_size == (3, 3)
    assert clone.get_config()["activation"] == "relu"
    assert not clone.built

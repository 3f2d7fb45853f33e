"""Tests of the ``strip_training_ops`` pass on small hand-built models."""

from __future__ import annotations

import numpy as np

from tf_balancer._compat import keras
from tf_balancer.graph.layer_graph import LayerGraph
from tf_balancer.passes.base import PassContext, get_pass
from tf_balancer.passes.strip_training_ops import StripTrainingOps

L = keras.layers


def _run(model):
    return get_pass("strip_training_ops").run(model, LayerGraph.from_model(model), PassContext())


def _image_model():
    inp = keras.Input((8, 8, 3), name="image")
    x = L.Conv2D(4, 3, name="conv")(inp)
    x = L.SpatialDropout2D(0.3, name="sdrop2d")(x)
    x = L.GaussianDropout(0.2, name="gdrop")(x)
    x = L.AlphaDropout(0.2, name="adrop")(x)
    x = L.ActivityRegularization(l1=0.1, name="actreg")(x)
    x = L.GaussianNoise(0.5, name="noise")(x)
    x = L.Flatten(name="flat")(x)
    x = L.Dense(5, name="dense")(x)
    return keras.Model(inp, L.Dropout(0.5, name="drop")(x))


def _sequence_and_volume_model():
    seq = keras.Input((6, 3), name="seq")
    vol = keras.Input((4, 4, 4, 2), name="vol")
    a = L.SpatialDropout1D(0.4, name="sdrop1d")(L.Conv1D(4, 2, name="c1")(seq))
    b = L.SpatialDropout3D(0.4, name="sdrop3d")(L.Conv3D(4, 2, name="c3")(vol))
    a = L.GlobalAveragePooling1D(name="gap1")(a)
    b = L.GlobalAveragePooling3D(name="gap3")(b)
    out = L.Dense(2, name="head")(L.Concatenate(name="cat")([a, b]))
    return keras.Model([seq, vol], [out, a])


def _weights(model):
    return [w.copy() for w in model.get_weights()]


def test_removes_every_training_only_layer_and_preserves_outputs():
    model = _image_model()
    before, n_layers = _weights(model), len(model.layers)
    result = _run(model)
    assert result.changed
    assert result.stats["removed"] == ("sdrop2d", "gdrop", "adrop", "actreg", "noise", "drop")
    assert len(result.model.layers) == n_layers - 6
    x = np.random.default_rng(0).normal(size=(3, 8, 8, 3)).astype("float32")
    np.testing.assert_allclose(model(x), result.model(x), rtol=1e-4, atol=1e-5)
    assert len(model.layers) == n_layers
    for old, new in zip(before, model.get_weights(), strict=True):
        np.testing.assert_array_equal(old, new)


def test_keeps_input_and_output_names_when_the_last_layer_is_removed():
    model = _image_model()
    new = _run(model).model
    assert new.input_names == model.input_names == ["image"]
    assert new.output_names == model.output_names == ["drop"]
    assert new.name == model.name


def test_spatial_dropout_1d_and_3d_in_a_multi_input_model():
    model = _sequence_and_volume_model()
    result = _run(model)
    assert sorted(result.stats["removed"]) == ["sdrop1d", "sdrop3d"]
    rng = np.random.default_rng(1)
    x = [rng.normal(size=(2, 6, 3)), rng.normal(size=(2, 4, 4, 4, 2))]
    x = [a.astype("float32") for a in x]
    for old, new in zip(model(x), result.model(x), strict=True):
        np.testing.assert_allclose(old, new, rtol=1e-4, atol=1e-5)
    assert result.model.input_names == model.input_names
    assert result.model.output_names == model.output_names


def test_nested_model_is_flattened_and_keeps_its_output_name():
    inner = keras.Sequential(
        [keras.Input((6,)), L.Dense(4, name="d"), L.Dropout(0.3, name="drop")], name="inner"
    )
    inp = keras.Input((6,), name="inp")
    model = keras.Model(inp, inner(inp))
    result = _run(model)
    assert result.stats["removed"] == ("inner/drop",)
    assert result.model.output_names == ["inner"]
    x = np.random.default_rng(2).normal(size=(2, 6)).astype("float32")
    np.testing.assert_allclose(model(x), result.model(x), rtol=1e-4, atol=1e-5)


def test_monte_carlo_dropout_called_with_training_true_is_kept():
    inp = keras.Input((4,))
    x = L.Dropout(0.5, name="mc")(L.Dense(3, name="d")(inp), training=True)
    model = keras.Model(inp, L.Dense(2, name="out")(x))
    result = _run(model)
    assert not result.changed
    assert result.model is model


def test_model_without_training_ops_is_returned_unchanged():
    inp = keras.Input((4,))
    model = keras.Model(inp, L.Dense(2)(L.Dense(3)(inp)))
    result = _run(model)
    assert result.changed is False
    assert result.model is model
    assert result.message


def test_subclass_of_dropout_is_left_alone():
    class AlwaysDropout(L.Dropout):
        def call(self, inputs, training=None):
            return super().call(inputs, training=True)

    inp = keras.Input((4,))
    model = keras.Model(inp, AlwaysDropout(0.5)(L.Dense(3)(inp)))
    assert _run(model).changed is False


def test_registered_under_its_name():
    assert isinstance(get_pass("strip_training_ops"), StripTrainingOps)

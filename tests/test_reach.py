"""Models users bring that the first version refused, crashed on or got wrong.

Keras 3 operations in the graph (``x + 3.0``, ``keras.ops.relu``; MobileNetV3's
hard-swish), a ``Lambda`` layer, an adapted ``Normalization``, augmentation layers,
and models where little or nothing can be pruned.
"""

from __future__ import annotations

import os
import warnings

import keras as keras3
import numpy as np
import pytest
import tensorflow as tf
from conftest import profiler_flops

import tf_balancer as tfb
from tf_balancer._compat import keras
from tf_balancer.analysis import analyze
from tf_balancer.attention.balance import allocate, lowest_reachable
from tf_balancer.attention.importance import group_scores
from tf_balancer.attention.masks import masked_copy
from tf_balancer.graph.walk import walk_model
from tf_balancer.passes.base import PassContext
from tf_balancer.passes.prune_channels import PruneChannels

KERASES = {"tf_keras": keras, "keras3": keras3}


@pytest.fixture(params=sorted(KERASES))
def kx(request):
    return KERASES[request.param]


def _x(shape, batch=4, seed=0):
    return np.random.default_rng(seed).normal(size=(batch, *shape)).astype("float32")


def _assert_compaction_exact(model, target=0.5):
    """Prune to ``target`` FLOPs: the compacted model computes what the masked one does."""
    analysis = analyze(model)
    plan = allocate(analysis, group_scores(analysis.graph, None, "magnitude"), target)
    result = PruneChannels().run(model, analysis.graph, PassContext(plan=plan))
    assert result.changed
    x = _x(tuple(model.inputs[0].shape[1:]))
    expected = np.asarray(masked_copy(analysis.graph, plan)(x, training=False))
    assert np.abs(expected).max() > 1e-3
    np.testing.assert_allclose(np.asarray(result.model(x, training=False)), expected, 1e-4, 1e-4)
    return analysis, result.model


def _hard_swish_net(kx):
    """Conv -> hard-swish written with operators, as MobileNetV3 writes it -> Conv -> mean:
    Keras 3 records operations, tf_keras ``TFOpLambda`` layers."""
    kx.utils.set_random_seed(0)
    if kx is keras3:
        relu6, relu, mean = keras3.ops.relu6, keras3.ops.relu, keras3.ops.mean
    else:
        relu6, relu = tf.nn.relu6, tf.nn.relu
        mean = lambda t, axis: tf.reduce_mean(t, axis=list(axis))  # noqa: E731
    inp = kx.Input((10, 10, 3))
    y = kx.layers.Conv2D(16, 3, name="conv_a")(inp)
    y = y * (relu6(y + 3.0) * (1.0 / 6.0))
    y = kx.layers.Conv2D(24, 3, name="conv_b")(y)
    y = mean(relu(y), axis=(1, 2))
    return kx.Model(inp, kx.layers.Dense(5, name="head")(y))


def test_elementwise_operations_pass_channels_through_on_both_kerases(kx):
    model = _hard_swish_net(kx)
    analysis = analyze(model)
    assert analysis.cost.flops == profiler_flops(analysis.traced.graph)
    assert analysis.cost.params == model.count_params()
    prunable = {p for g in analysis.graph.prunable_groups for p in g.nodes("producer")}
    assert prunable == {"conv_a", "conv_b"}
    rows = tfb.inspect(model).rows
    names = [row.name for row in rows]
    between = rows[names.index("conv_a") + 1 : names.index("conv_b")]
    after = rows[names.index("conv_b") + 1 : names.index("head")]
    assert len(between) == 4 and len(after) == 2  # add, relu6, two multiplies; relu, mean
    assert {row.group for row in between} == {rows[names.index("conv_a")].group}
    assert {row.group for row in after} == {rows[names.index("conv_b")].group}
    if kx is keras3:
        assert between[0].type == "ops.Add"
    _, small = _assert_compaction_exact(model)
    assert small.get_layer("conv_a").filters < 16 and small.get_layer("conv_b").filters < 24


@pytest.mark.parametrize(
    "tail",
    [
        lambda y: 1.0 / (y + 2.0),  # a channel masked to 0 would give 1 / 2, then 1 / 0
        lambda y: keras3.ops.softmax(y),  # mixes the channels
        lambda y: keras3.ops.mean(y, axis=-1, keepdims=True) * y,  # reduces the channels
    ],
    ids=["divide_by_tensor", "softmax", "mean_over_channels"],
)
def test_operations_that_mix_or_blow_up_channels_block_their_group(tail):
    inp = keras3.Input((6, 6, 2))
    y = keras3.layers.Conv2D(8, 3, name="conv")(inp)
    y = keras3.layers.Conv2D(4, 1, name="next")(tail(y))
    model = keras3.Model(inp, keras3.layers.Dense(2)(keras3.layers.Flatten()(y)))
    graph = analyze(model).graph
    conv = next(g for g in graph.groups.values() if "conv" in g.nodes("producer"))
    assert not conv.prunable
    assert any("ops." in reason for reason in conv.reasons), conv.reasons


@pytest.mark.slow
def test_mobilenet_v3_small_trains_pruned_with_the_default_callback():
    keras3.utils.set_random_seed(0)
    model = keras3.applications.MobileNetV3Small(
        input_shape=(32, 32, 3), weights=None, classes=10, include_preprocessing=True
    )
    model.compile("adam", "sparse_categorical_crossentropy")
    rng = np.random.default_rng(0)
    x, y = rng.random((96, 32, 32, 3), np.float32) * 255, rng.integers(0, 10, 96)
    callback = tfb.BalanceCallback(verbose=0)
    model.fit(x, y, epochs=2, batch_size=32, callbacks=[callback], verbose=0)
    assert callback.report["final"]["flops"] <= 0.5 * callback.report["dense"]["flops"] * 1.01
    analysis = callback.analysis  # the hard-swish expansions are prunable through the ops
    hard_swish_inputs = [
        g for g in analysis.graph.prunable_groups if any("expand" in p for p in g.nodes("producer"))
    ]
    assert len(hard_swish_inputs) >= 8
    np.testing.assert_allclose(
        callback.optimized_model.predict(x[:8], verbose=0),
        model.predict(x[:8], verbose=0),
        1e-4,
        1e-5,
    )


def test_an_unbuilt_subclassed_model_written_with_keras_ops_is_pruned():
    class Net(keras3.Model):
        def __init__(self):
            super().__init__()
            self.conv1 = keras3.layers.Conv2D(16, 3)
            self.conv2 = keras3.layers.Conv2D(32, 3)
            self.head = keras3.layers.Dense(10)

        def call(self, x):
            h = keras3.ops.relu(self.conv1(x))
            h = keras3.ops.relu(self.conv2(h)) * 2.0
            return self.head(keras3.ops.mean(h, axis=(1, 2)))

    keras3.utils.set_random_seed(0)
    model = Net()
    model.compile("adam", keras3.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(0)
    x, y = rng.random((128, 8, 8, 1), np.float32), rng.integers(0, 10, 128)
    callback = tfb.BalanceCallback(verbose=0)
    model.fit(x, y, epochs=3, batch_size=32, callbacks=[callback], verbose=0)
    optimized = callback.optimized_model
    assert callback.report["final"]["flops"] <= 0.5 * callback.report["dense"]["flops"] * 1.01
    widths = sorted(layer.filters for layer in optimized.layers if hasattr(layer, "filters"))
    assert widths[0] < 16 and widths[1] < 32  # both convs thinned, through relu, * and mean
    np.testing.assert_allclose(
        optimized.predict(x[:8], verbose=0), model.predict(x[:8], verbose=0), 1e-4, 1e-5
    )


def test_a_lambda_layer_is_recorded_as_its_operations_and_pruned_through(kx):
    """Its function runs on symbolic inputs: ``t * 2.0`` passes channels through, so the
    conv before it is pruned too (before: the Lambda was copied, opaque)."""
    kx.utils.set_random_seed(0)
    inp = kx.Input((8, 8, 1))
    y = kx.layers.Conv2D(16, 3, activation="relu", name="before")(inp)
    y = kx.layers.Lambda(lambda t: t * 2.0, name="double")(y)
    y = kx.layers.Conv2D(16, 3, activation="relu", name="after")(y)
    model = kx.Model(inp, kx.layers.Dense(4)(kx.layers.GlobalAveragePooling2D()(y)))
    _, small = _assert_compaction_exact(model)
    assert small.get_layer("after").filters < 16 and small.get_layer("before").filters < 16
    assert "Lambda" not in {type(layer).__name__ for layer in small.layers}


def test_a_lambda_keras_cannot_record_is_copied_and_its_neighbours_pruned():
    """Keras 3 refuses TensorFlow functions on symbolic tensors: the Lambda stays a copy."""
    keras3.utils.set_random_seed(0)
    inp = keras3.Input((8, 8, 1))
    y = keras3.layers.Conv2D(16, 3, activation="relu")(inp)
    y = keras3.layers.Lambda(lambda t: tf.nn.relu6(t), name="clip")(y)
    y = keras3.layers.Conv2D(16, 3, activation="relu", name="after")(y)
    model = keras3.Model(inp, keras3.layers.Dense(4)(keras3.layers.GlobalAveragePooling2D()(y)))
    _, small = _assert_compaction_exact(model)
    assert small.get_layer("after").filters < 16
    assert type(small.get_layer("clip")).__name__ == "Lambda"


def test_an_adapted_normalization_keeps_its_statistics_in_the_compacted_model(kx):
    kx.utils.set_random_seed(0)
    data = _x((6, 6, 2), batch=64) * 5.0 + 3.0
    norm = kx.layers.Normalization(name="norm")
    norm.adapt(data)
    inp = kx.Input((6, 6, 2))
    y = kx.layers.Conv2D(16, 3, activation="relu", name="conv")(norm(inp))
    model = kx.Model(inp, kx.layers.Dense(3)(kx.layers.Flatten()(y)))
    analysis = analyze(model)
    plan = allocate(analysis, group_scores(analysis.graph, None, "magnitude"), 0.5)
    small = PruneChannels().run(model, analysis.graph, PassContext(plan=plan)).model
    expected = np.asarray(masked_copy(analysis.graph, plan)(data[:4], training=False))
    np.testing.assert_allclose(np.asarray(small(data[:4], training=False)), expected, 1e-4, 1e-4)
    np.testing.assert_allclose(
        np.asarray(small.get_layer("norm")(data[:4])), np.asarray(norm(data[:4])), 1e-5, 1e-5
    )


def test_augmentation_layers_are_stripped_for_inference(kx):
    inp = kx.Input((12, 12, 3))
    y = kx.layers.RandomFlip("horizontal")(kx.layers.Rescaling(1 / 255.0)(inp))
    y = kx.layers.RandomContrast(0.2)(kx.layers.RandomRotation(0.1)(y))
    y = kx.layers.Conv2D(8, 3, activation="relu")(y)
    model = kx.Model(inp, kx.layers.Dense(2)(kx.layers.GlobalAveragePooling2D()(y)))
    optimized, report = tfb.MetaOptimizer(["strip_training_ops"]).run(model)
    assert report.records[0].status == "applied"
    names = {type(layer).__name__ for layer in optimized.layers}
    assert not names & {"RandomFlip", "RandomRotation", "RandomContrast"}
    x = _x((12, 12, 3)) * 255
    np.testing.assert_allclose(
        np.asarray(optimized(x, training=False)), np.asarray(model(x, training=False)), 1e-5, 1e-5
    )


def _normalised_cnn(with_dense: bool):
    """Conv -> LayerNorm -> Conv -> GroupNorm: normalisation across channels blocks both."""
    keras3.utils.set_random_seed(0)
    inp = keras3.Input((8, 8, 1))
    y = keras3.layers.LayerNormalization()(keras3.layers.Conv2D(16, 3)(inp))
    y = keras3.layers.GroupNormalization(4)(keras3.layers.Conv2D(16, 3)(y))
    y = keras3.layers.GlobalAveragePooling2D()(y)
    if with_dense:
        y = keras3.layers.Dense(32, activation="relu", name="hidden")(y)
    model = keras3.Model(inp, keras3.layers.Dense(10)(y))
    model.compile("adam", keras3.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def _fit_catching(model, callback, epochs=3):
    rng = np.random.default_rng(0)
    x, y = rng.random((128, 8, 8, 1), np.float32), rng.integers(0, 10, 128)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = model.fit(x, y, epochs=epochs, batch_size=32, callbacks=[callback], verbose=0)
    messages = [str(w.message) for w in caught if "BalanceCallback" in str(w.message)]
    return history, messages


def test_a_model_with_nothing_to_prune_trains_with_one_warning_naming_why():
    model = _normalised_cnn(with_dense=False)
    callback = tfb.BalanceCallback(verbose=0)
    history, messages = _fit_catching(model, callback)
    assert len(messages) == 1 and "no prunable channel group" in messages[0]
    assert "normalises across channels" in messages[0]
    assert len(history.history["loss"]) == 3
    assert history.history["balancer/flops_ratio"] == [1.0, 1.0, 1.0]
    assert callback.report["final"]["flops"] <= callback.report["dense"]["flops"]


def test_an_unreachable_target_prunes_as_far_as_it_can_and_says_so():
    model = _normalised_cnn(with_dense=True)
    callback = tfb.BalanceCallback(verbose=0)
    history, messages = _fit_catching(model, callback, epochs=4)
    floor = lowest_reachable(callback.analysis, "flops", callback.bounds)
    assert 0.5 < floor < 1.0
    assert len(messages) == 1 and f"keeps {floor:.3f}" in messages[0]
    # the costlier conv (16 -> 16) is the one GroupNormalization blocks: named with its share
    assert "(GroupNormalization), which normalises across channels" in messages[0]
    assert "the most FLOPs (" in messages[0]
    assert history.history["balancer/flops_ratio"][-1] == pytest.approx(floor, abs=1e-6)
    assert model.get_layer("hidden").kernel.shape[-1] == 32  # masked, then compacted:
    assert callback.optimized_model.get_layer("hidden").units < 32
    assert tf.reduce_all(tf.math.is_finite(callback.optimized_model(np.zeros((1, 8, 8, 1)))))


def _siamese(kx, nested: bool):
    """Two inputs through one tower (shared layers, or a shared nested Sequential)."""
    kx.utils.set_random_seed(0)
    layers = [
        kx.layers.Conv2D(8, 3, activation="relu", name="conv_a"),
        kx.layers.BatchNormalization(name="bn"),
        kx.layers.Conv2D(16, 3, activation="relu", name="conv_b"),
        kx.layers.GlobalAveragePooling2D(),
        kx.layers.Dense(12, activation="relu", name="embed"),
    ]
    if nested:
        tower = kx.Sequential([kx.Input((8, 8, 2)), *layers], name="tower")
    else:

        def tower(t):
            for layer in layers:
                t = layer(t)
            return t

    left, right = kx.Input((8, 8, 2)), kx.Input((8, 8, 2))
    y = kx.layers.Concatenate()([tower(left), tower(right)])
    y = kx.layers.Dense(10, activation="relu", name="hidden")(y)
    return kx.Model([left, right], kx.layers.Dense(2)(y))


@pytest.mark.parametrize("nested", [False, True], ids=["shared_layers", "shared_model"])
def test_a_shared_tower_is_pruned_as_one_layer_on_both_kerases(kx, nested):
    """Siamese nets: every call of a shared layer keeps the same channels, so the
    tower is pruned once and stays shared in the compacted model."""
    model = _siamese(kx, nested)
    analysis = analyze(model)
    assert analysis.cost.params == model.count_params()  # shared weights counted once
    producers = [g.nodes("producer") for g in analysis.graph.prunable_groups]
    assert sum(len(p) == 2 for p in producers) == 3  # conv_a, conv_b, embed: both calls each
    plan = allocate(analysis, group_scores(analysis.graph, None, "magnitude"), 0.5)
    small = PruneChannels().run(model, analysis.graph, PassContext(plan=plan)).model
    conv = next(layer for layer in small.layers if layer.name.endswith("conv_b"))
    assert conv.filters < 16
    xs = [_x((8, 8, 2), seed=1), _x((8, 8, 2), seed=2)]
    expected = np.asarray(masked_copy(analysis.graph, plan)(xs, training=False))
    np.testing.assert_allclose(np.asarray(small(xs, training=False)), expected, 1e-4, 1e-4)
    assert analyze(small).cost.flops / analysis.cost.flops == pytest.approx(plan.achieved)
    assert small.count_params() == pytest.approx(plan_params(analysis, plan))


def plan_params(analysis, plan):
    return analysis.cost_under({g: len(k) for g, k in plan.keep.items()}).params


def test_a_layer_shared_with_differently_shaped_calls_stays_whole():
    """One Dense called on 6 and on 6 channels of different groups is joined; called on
    a tensor whose channels are laid out differently (a concatenation) it is opaque."""
    dense = keras3.layers.Dense(4, name="shared")
    a, b = keras3.Input((6,)), keras3.Input((3,))
    wide = keras3.layers.Concatenate()([keras3.layers.Dense(3, name="p")(a), b])
    y = keras3.layers.Concatenate()([dense(keras3.layers.Dense(6, name="q")(a)), dense(wide)])
    model = keras3.Model([a, b], keras3.layers.Dense(2)(y))
    graph = analyze(model).graph
    shared_groups = [g for g in graph.groups.values() if "shared" in g.nodes("producer")]
    assert shared_groups == [] or not any(g.prunable for g in shared_groups)
    q = next(g for g in graph.groups.values() if "q" in g.nodes("producer"))
    assert not q.prunable and any("shares its weights" in r or "shared" in r for r in q.reasons)
    reasons = {r for g in graph.groups.values() for r in g.reasons}
    assert any("shared by calls whose channels differ" in r for r in reasons)


def test_a_shared_layer_opaque_by_its_type_is_named_for_its_type_not_for_sharing():
    norm = keras3.layers.LayerNormalization(name="norm")
    a, b = keras3.Input((6,)), keras3.Input((6,))
    y = keras3.layers.Add()([norm(keras3.layers.Dense(6)(a)), norm(keras3.layers.Dense(6)(b))])
    graph = analyze(keras3.Model([a, b], keras3.layers.Dense(2)(y))).graph
    reasons = [r for g in graph.groups.values() for r in g.reasons if "'norm'" in r]
    assert reasons and not any("channels differ" in r for r in reasons)


def test_a_masked_lstm_after_embedding_mask_zero_is_pruned_on_both_kerases(kx):
    """Keras 3 passes the padding mask as an argument of the LSTM call: it gates time
    steps, it is not a channel input, so the LSTM's units stay prunable."""
    kx.utils.set_random_seed(0)
    inp = kx.Input((12,), dtype="int32")
    y = kx.layers.Embedding(50, 16, mask_zero=True, name="embed")(inp)
    y = kx.layers.LSTM(24, name="lstm")(y)
    model = kx.Model(inp, kx.layers.Dense(3)(kx.layers.Dense(12, activation="relu")(y)))
    analysis = analyze(model)
    prunable = {p for g in analysis.graph.prunable_groups for p in g.nodes("producer")}
    assert {"embed", "lstm"} <= prunable
    plan = allocate(analysis, group_scores(analysis.graph, None, "magnitude"), 0.5)
    small = PruneChannels().run(model, analysis.graph, PassContext(plan=plan)).model
    assert small.get_layer("lstm").units < 24
    tokens = np.random.default_rng(0).integers(1, 50, (4, 12)).astype("int32")
    tokens[:, 8:] = 0  # padded: the mask must still cut these steps in the compacted model
    expected = np.asarray(masked_copy(analysis.graph, plan)(tokens, training=False))
    np.testing.assert_allclose(np.asarray(small(tokens, training=False)), expected, 1e-4, 1e-4)
    unpadded = tokens.copy()
    unpadded[:, 8:] = 7
    assert not np.allclose(np.asarray(small(unpadded, training=False)), expected, atol=1e-4)


@pytest.mark.parametrize("return_sequences", [False, True])
def test_conv_lstm_flops_are_counted_by_hand_on_both_kerases(kx, return_sequences):
    """TF's profiler sees a ConvLSTM's steps once, and differently in a frozen and an
    unfrozen trace (the report compared one with the other: 2.4x the dense FLOPs)."""
    inp = kx.Input((4, 8, 8, 3))
    y = kx.layers.ConvLSTM2D(8, 3, padding="same", return_sequences=return_sequences)(inp)
    model = kx.Model(inp, kx.layers.Dense(2)(kx.layers.Flatten()(y)))
    name = model.layers[1].name
    frozen, unfrozen = analyze(model, frozen=True), analyze(model, frozen=False)
    positions = 4 * 8 * 8  # steps x output positions
    per_position = 2 * 9 * (3 + 8) * 4 * 8 + (4 + 8) * 8  # two convs to 4 gates, bias, gates
    assert frozen.cost.layers[name].flops == positions * per_position
    assert unfrozen.cost.layers[name].flops == frozen.cost.layers[name].flops
    assert frozen.cost.flops == unfrozen.cost.flops


def test_an_early_stop_before_the_ramp_ends_says_what_target_was_reached():
    class StopAfterTwo(keras3.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            self.model.stop_training = epoch == 1

    model = _small_cnn()
    callback = tfb.BalanceCallback(verbose=0)  # 8 epochs: rebalances at epochs 1..5
    rng = np.random.default_rng(0)
    x, y = rng.random((128, 8, 8, 1), np.float32), rng.integers(0, 10, 128)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(x, y, epochs=8, batch_size=32, callbacks=[StopAfterTwo(), callback], verbose=0)
    messages = [str(w.message) for w in caught if "ended after epoch 2" in str(w.message)]
    reached = float(callback.state.target.numpy())
    assert 0.5 < reached < 1.0
    assert len(messages) == 1 and f"reached target {reached:.3f}, not 0.5" in messages[0]
    ratio = callback.report["final"]["flops"] / callback.report["dense"]["flops"]
    assert ratio <= reached * 1.01


@pytest.mark.parametrize("early_stopping_first", [False, True])
def test_weights_restored_after_the_callback_finished_are_pointed_out(early_stopping_first):
    """``EarlyStopping(restore_best_weights=True)`` after the callback puts an earlier
    epoch's weights back into the model once the optimized model is made from the last
    epoch's: reading ``optimized_model`` warns once. Listed first, it restores before the
    callback finishes, and the optimized model is the model's masked weights."""
    model = _small_cnn()
    rng = np.random.default_rng(0)
    x, y = rng.random((128, 8, 8, 1), np.float32), rng.integers(0, 10, 128)
    callback = tfb.BalanceCallback(verbose=0)
    # val_loss rises from the first prune on: the best epoch is one before the last
    stopper = keras3.callbacks.EarlyStopping(
        "loss", mode="min", patience=20, restore_best_weights=True, start_from_epoch=-1
    )
    stopper.on_epoch_end = _worsening(stopper.on_epoch_end)
    order = [stopper, callback] if early_stopping_first else [callback, stopper]
    model.fit(x, y, epochs=6, batch_size=32, callbacks=order, verbose=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        optimized = callback.optimized_model
        again = callback.optimized_model
    changed = [w for w in caught if "weights changed after the optimized model" in str(w.message)]
    assert optimized is again is not None
    assert len(changed) == (0 if early_stopping_first else 1)
    gap = np.abs(np.asarray(optimized(x[:16])) - np.asarray(model(x[:16]))).max()
    assert (gap < 1e-4) == early_stopping_first


def test_training_the_model_further_after_fit_is_not_blamed_on_early_stopping():
    """Training the user's model on after ``fit`` (no callback) changes its weights too,
    and reading ``optimized_model`` then warned that EarlyStopping had restored earlier
    weights: the optimizer stepped, so it was more training, which is the user's own."""
    model = _small_cnn()
    rng = np.random.default_rng(0)
    x, y = rng.random((128, 8, 8, 1), np.float32), rng.integers(0, 10, 128)
    callback = tfb.BalanceCallback(verbose=0)
    model.fit(x, y, epochs=4, batch_size=32, callbacks=[callback], verbose=0)
    model.fit(x, y, epochs=1, batch_size=32, verbose=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert callback.optimized_model is not None
    assert not [w for w in caught if "weights changed after" in str(w.message)]


def _worsening(on_epoch_end):
    """``EarlyStopping.on_epoch_end`` seeing a loss that is best at epoch 1, then rises."""

    def wrapped(epoch, logs=None):
        return on_epoch_end(epoch, {**(logs or {}), "loss": abs(epoch - 1) + 1.0})

    return wrapped


def test_identity_resizing_cropping_and_repeat_vector_pass_channels_through(kx):
    """Layers that move values but keep each channel to itself (were opaque, blocking
    the groups around them)."""
    kx.utils.set_random_seed(0)
    inp = kx.Input((10, 10, 3))
    x = kx.layers.Conv2D(16, 3, padding="same", activation="relu", name="conv_a")(inp)
    x = kx.layers.Identity()(x)
    x = kx.layers.Resizing(8, 8)(x)
    x = kx.layers.CenterCrop(6, 6)(x)
    x = kx.layers.Conv2D(16, 3, activation="relu", name="conv_b")(x)
    x = kx.layers.Dense(12, activation="relu", name="hidden")(kx.layers.GlobalAveragePooling2D()(x))
    x = kx.layers.LSTM(8, name="lstm")(kx.layers.RepeatVector(3)(x))
    model = kx.Model(inp, kx.layers.Dense(2)(x))
    analysis, _ = _assert_compaction_exact(model)
    prunable = {p for g in analysis.graph.prunable_groups for p in g.nodes("producer")}
    assert prunable == {"conv_a", "conv_b", "hidden", "lstm"}


def _small_cnn():
    keras3.utils.set_random_seed(0)
    inp = keras3.Input((8, 8, 1))
    y = keras3.layers.Conv2D(16, 3, activation="relu")(inp)
    y = keras3.layers.Conv2D(16, 3, activation="relu")(y)
    model = keras3.Model(inp, keras3.layers.Dense(10)(keras3.layers.GlobalAveragePooling2D()(y)))
    model.compile("adam", keras3.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


@pytest.mark.parametrize("shared_axes", [None, [1, 2], [1, 2, 3]])
def test_prelu_slopes_are_sliced_with_their_channels_on_both_kerases(kx, shared_axes):
    kx.utils.set_random_seed(0)
    inp = kx.Input((6, 6, 2))
    y = kx.layers.Conv2D(8, 3, name="conv")(inp)
    prelu = kx.layers.PReLU(shared_axes=shared_axes, name="prelu")
    y = kx.layers.Conv2D(4, 1, name="next")(prelu(y))
    model = kx.Model(inp, kx.layers.Dense(2)(kx.layers.Flatten()(y)))
    prelu.set_weights([np.random.default_rng(1).uniform(0.1, 0.9, w.shape) for w in prelu.weights])
    analysis, small = _assert_compaction_exact(model, target=0.75)
    assert "conv" in {p for g in analysis.graph.prunable_groups for p in g.nodes("producer")}
    kept = small.get_layer("conv").filters
    assert kept < 8
    expected = 1 if shared_axes == [1, 2, 3] else kept
    assert small.get_layer("prelu").weights[0].shape[-1] == expected


def test_an_activation_written_as_an_operation_is_fused_on_both_kerases(kx):
    relu6 = keras3.ops.relu6 if kx is keras3 else tf.nn.relu6
    sigmoid = keras3.ops.sigmoid if kx is keras3 else tf.math.sigmoid
    inp = kx.Input((6, 6, 2))
    y = relu6(kx.layers.Conv2D(8, 3, name="conv")(inp))
    y = sigmoid(kx.layers.Dense(4, name="dense")(y))
    model = kx.Model(inp, kx.layers.Flatten()(y))
    optimized, report = tfb.MetaOptimizer(["fuse_activation"]).run(model)
    assert report.records[0].status == "applied"
    assert [conv for conv, _ in report.records[0].stats["fused"]] == ["conv", "dense"]
    assert optimized.get_layer("conv").get_config()["activation"] == "relu6"
    assert optimized.get_layer("dense").get_config()["activation"] == "sigmoid"
    x = _x((6, 6, 2))
    np.testing.assert_allclose(np.asarray(optimized(x)), np.asarray(model(x)), 1e-5, 1e-6)
    assert len(walk_model(optimized).calls) == len(walk_model(model).calls) - 2


def test_one_shot_pruning_of_a_siamese_net_reports_its_validation_scores():
    """Several inputs: the report's latency feeds each input (it fed a mixed list)."""
    model = _siamese(keras3, nested=False)
    model.compile("adam", keras3.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(0)
    xs = [rng.random((64, 8, 8, 2), np.float32) for _ in range(2)]
    y = rng.integers(0, 2, 64)
    small, report = tfb.prune(model, 0.5, (xs, y), validation_data=(xs, y), finetune_epochs=0)
    assert report["final"]["flops"] <= 0.5 * report["dense"]["flops"] * 1.01
    assert report["final"]["latency_ms_b1"] > 0 and "accuracy" in report["final"]


def test_a_sequential_built_by_fit_is_costed_per_sample_and_keeps_an_open_batch():
    """Keras builds it with its first batch's size (32): costs are still per sample,
    and the compacted model takes any batch."""
    keras3.utils.set_random_seed(0)
    model = keras3.Sequential(
        [
            keras3.layers.Conv2D(8, 3, activation="relu"),
            keras3.layers.Flatten(),
            keras3.layers.Dense(4),
        ]
    )
    model.compile("adam", keras3.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(0)
    x, y = rng.random((64, 6, 6, 1), np.float32), rng.integers(0, 4, 64)
    callback = tfb.BalanceCallback(verbose=0)
    model.fit(x, y, epochs=3, batch_size=32, callbacks=[callback], verbose=0)
    assert model.inputs[0].shape[0] == 32  # as Keras built it
    assert callback.report["dense"]["flops"] == _per_sample_flops(model)
    assert np.asarray(callback.optimized_model(x[:5])).shape == (5, 4)


def _per_sample_flops(model):
    """FLOPs of one sample, by hand: conv 2*16*9*8 + bias 16*8, flatten, dense 2*128*4 + 4."""
    return 2 * 16 * 9 * 8 + 16 * 8 + 2 * 128 * 4 + 4


@pytest.mark.parametrize(
    ("kx", "score_mode"),
    [(keras, "dot"), (keras3, "dot"), (keras3, "concat")],  # score_mode is Keras 3's
    ids=["tf_keras", "keras3", "keras3_concat"],
)
def test_dot_product_attention_prunes_query_key_and_value_together(kx, score_mode):
    kx.utils.set_random_seed(0)
    inp = kx.Input((6, 5))
    query = kx.layers.Dense(8, name="q")(inp)
    value = kx.layers.Dense(8, name="v")(inp)
    kwargs = {"score_mode": score_mode} if kx is keras3 else {}
    y = kx.layers.Attention(use_scale=True, name="attention", **kwargs)([query, value])
    y = kx.layers.Dense(3, name="head")(kx.layers.GlobalAveragePooling1D()(y))
    model = kx.Model(inp, y)
    analysis, small = _assert_compaction_exact(model, target=0.75)
    group = next(g for g in analysis.graph.prunable_groups if "q" in g.nodes("producer"))
    assert "v" in group.nodes("producer")  # one group: query, key (= value) and output
    assert small.get_layer("q").units == small.get_layer("v").units < 8
    assert analysis.cost.flops == profiler_flops(analysis.traced.graph)


def _two_heads(kx, as_dict):
    """A classifier head and a regression head on one trunk, outputs as a dict (keyed
    ``label``/``value``, not by the layers' names) or a list (named ``cls``/``reg``)."""
    kx.utils.set_random_seed(0)
    inp = kx.Input((16,), name="x")
    h = kx.layers.Dense(32, activation="relu")(kx.layers.Dense(32, activation="relu")(inp))
    cls, reg = kx.layers.Dense(3, name="cls")(h), kx.layers.Dense(1, name="reg")(h)
    model = kx.Model(inp, {"label": cls, "value": reg} if as_dict else [cls, reg])
    losses = {"label": kx.losses.SparseCategoricalCrossentropy(from_logits=True), "value": "mse"}
    model.compile("adam", losses if as_dict else list(losses.values()))
    return model


@pytest.mark.parametrize("as_dict", [True, False])
def test_a_model_with_two_heads_is_scored_per_head_during_and_after_training(kx, as_dict):
    """Before: the first epoch end raised (a dict of predictions scored as regression)."""
    rng = np.random.default_rng(0)
    x, xv = rng.random((128, 16)).astype("float32"), rng.random((64, 16)).astype("float32")
    labels = [rng.integers(0, 3, 128), x.sum(1, keepdims=True)]
    val = [rng.integers(0, 3, 64), xv.sum(1, keepdims=True)]
    names = ("label", "value") if as_dict else ("cls", "reg")
    y, yv = (dict(zip(names, v, strict=True)) if as_dict else v for v in (labels, val))
    model = _two_heads(kx, as_dict)
    callback = tfb.BalanceCallback(verbose=0, validation_data=(xv, yv))
    history = model.fit(x, y, epochs=3, batch_size=32, verbose=0, callbacks=[callback])
    assert len(history.history[f"balancer/val_{names[0]}_f1"]) == 3
    assert len(history.history[f"{names[0]}_macro_f1"]) == 3  # the in-step metrics too
    final = callback.report["final"]
    predicted = callback.optimized_model.predict(xv, verbose=0)
    cls, reg = (predicted["label"], predicted["value"]) if as_dict else predicted
    accuracy = float((cls.argmax(1) == val[0]).mean())
    assert final[f"{names[0]}_accuracy"] == pytest.approx(accuracy)
    assert final[f"{names[1]}_mae"] == pytest.approx(float(np.abs(reg - val[1]).mean()), rel=1e-5)
    assert "latency_ms_b1" in final and callback.report["final_flops_ratio"] <= 0.505


def _token_classifier(kx):
    kx.utils.set_random_seed(0)
    inp = kx.Input((12,), dtype="int32")
    y = kx.layers.Embedding(40, 16, name="embed")(inp)
    y = kx.layers.GlobalAveragePooling1D()(kx.layers.Conv1D(24, 3, activation="relu")(y))
    model = kx.Model(inp, kx.layers.Dense(3)(kx.layers.Dense(16, activation="relu")(y)))
    model.compile("adam", kx.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def test_token_models_are_pruned_one_shot_and_timed_on_token_ids(kx):
    """Before: probe-batch Taylor failed on the Embedding's sparse gradient, and the
    report timed the int32 serving function on float inputs."""
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 40, (96, 12)).astype("int32"), rng.integers(0, 3, 96)
    model = _token_classifier(kx)
    model.fit(x, y, epochs=1, verbose=0)
    small, report = tfb.prune(model, 0.5, data=(x, y), validation_data=(x[:32], y[:32]))
    assert report["final_flops_ratio"] <= 0.505
    assert report["final"]["latency_ms_b1"] > 0 and "accuracy" in report["final"]
    assert small.get_layer("embed").output_dim < 16


def test_taylor_of_an_embedding_from_its_sparse_gradient_equals_the_dense_product():
    """The streamed and probe paths multiply only the rows a batch touched."""
    from tf_balancer.attention.streaming import weight_times_gradient

    rng = np.random.default_rng(0)
    table = tf.constant(rng.normal(size=(10, 4)).astype("float32"))
    values = tf.constant(rng.normal(size=(5, 4)).astype("float32"))
    sparse = tf.IndexedSlices(values, tf.constant([1, 3, 3, 7, 0]), tf.constant([10, 4]))
    dense = table * tf.convert_to_tensor(sparse)
    np.testing.assert_allclose(
        tf.reduce_sum(weight_times_gradient(table, sparse, [1]), 0), tf.reduce_sum(dense, 0), 1e-5
    )
    np.testing.assert_allclose(weight_times_gradient(table, sparse, [0]), dense, 1e-6)


def test_a_frozen_backbone_is_kept_whole_and_untouched_while_the_head_is_pruned(kx):
    """Transfer learning: ``base.trainable = False``. Before: the base was pruned with
    all-zero Taylor scores (no gradients), by channel index, and zeroed in place."""
    kx.utils.set_random_seed(0)
    base_in = kx.Input((16, 16, 3))
    y = kx.layers.Conv2D(16, 3, padding="same", activation="relu", name="b1")(base_in)
    y = kx.layers.Conv2D(32, 3, padding="same", activation="relu", name="b2")(y)
    base = kx.Model(base_in, y, name="pretrained")
    base.trainable = False
    inp = kx.Input((16, 16, 3))
    y = kx.layers.GlobalAveragePooling2D()(base(inp, training=False))
    model = kx.Model(inp, kx.layers.Dense(10)(kx.layers.Dense(64, activation="relu", name="h")(y)))
    model.compile("adam", kx.losses.SparseCategoricalCrossentropy(from_logits=True))
    groups = analyze(model).graph.groups.values()
    frozen = [g for g in groups if {"pretrained/b1", "pretrained/b2"} & set(g.nodes("producer"))]
    assert len(frozen) == 2 and not any(g.prunable for g in frozen)
    assert all(any("frozen (trainable=False)" in r for r in g.reasons) for g in frozen)
    before = [w.copy() for w in base.get_weights()]
    x, labels = _x((16, 16, 3), batch=96), np.arange(96) % 10
    callback = tfb.BalanceCallback(verbose=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(x, labels, epochs=3, batch_size=32, callbacks=[callback], verbose=0)
    assert any("out of reach" in str(w.message) for w in caught)
    assert all(np.array_equal(a, b) for a, b in zip(before, base.get_weights(), strict=True))
    assert callback.optimized_model.get_layer("h").units < 64


def test_a_model_that_starts_with_text_vectorization_is_pruned_and_exported(kx, tmp_path):
    """String inputs, an adapted vocabulary in a lookup table. Before: Keras 3 rolled the
    compaction back (float verification inputs; the copy's table empty) and then failed
    saving the report's SavedModel (an untracked table); tf_keras failed on the
    vocabulary handler in the layer's weights."""
    kx.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(60)]
    texts = [" ".join(rng.choice(words, 8)) for _ in range(96)]
    x, y = tf.constant([[t] for t in texts]), rng.integers(0, 2, 96)
    vectorize = kx.layers.TextVectorization(max_tokens=100, output_sequence_length=12)
    vectorize.adapt(texts)
    inp = kx.Input((1,), dtype="string")
    h = kx.layers.GlobalAveragePooling1D()(kx.layers.Embedding(100, 16)(vectorize(inp)))
    model = kx.Model(inp, kx.layers.Dense(2)(kx.layers.Dense(32, activation="relu")(h)))
    model.compile("adam", kx.losses.SparseCategoricalCrossentropy(from_logits=True))
    callback = tfb.BalanceCallback(verbose=0, validation_data=(x[:32], y[:32]))
    model.fit(x, y, epochs=3, batch_size=32, callbacks=[callback], verbose=0)
    assert callback.report["final_flops_ratio"] <= 0.505
    assert "accuracy" in callback.report["final"]
    np.testing.assert_allclose(
        callback.optimized_model.predict(x[:8], verbose=0),
        model.predict(x[:8], verbose=0),
        1e-4,
        1e-5,
    )
    assert os.path.isdir(os.path.join(callback.export(str(tmp_path / "out")), "saved_model"))


def test_a_custom_layer_whose_init_refuses_its_config_is_used_as_it_is_or_named():
    """keras.io's ViT writes ``Patches.__init__(self, patch_size)`` without ``**kwargs``:
    re-creating it from its config raised at the end of training, after every epoch
    (``unexpected keyword argument 'name'``). A weightless one is shared like an
    operation; one with weights gets an error naming the fix."""
    import keras as keras3

    class Patches(keras3.layers.Layer):
        def __init__(self, size):
            super().__init__()
            self.size = size

        def call(self, images):
            patches = keras3.ops.image.extract_patches(images, size=self.size)
            return keras3.ops.reshape(patches, (-1, 16, self.size * self.size * 3))

        def get_config(self):
            return {**super().get_config(), "size": self.size}

    class Scale(Patches):
        def build(self, shape):
            self.scale = self.add_weight(shape=(shape[-1],), initializer="ones")

        def call(self, x):
            return x * self.scale

    rng = np.random.default_rng(0)
    x, y = rng.random((32, 16, 16, 3), np.float32), np.arange(32) % 3
    inp = keras3.Input((16, 16, 3))
    hidden = keras3.layers.Dense(64, activation="relu")(Patches(4)(inp))
    hidden = keras3.layers.Dense(64, activation="relu")(hidden)
    out = keras3.layers.Dense(3)(keras3.layers.GlobalAveragePooling1D()(hidden))
    model = keras3.Model(inp, out)
    model.compile("adam", keras3.losses.SparseCategoricalCrossentropy(from_logits=True))
    small, report = tfb.prune(model, target=0.5, data=(x, y))
    assert report["final_flops_ratio"] <= 0.51
    np.testing.assert_equal(small(x[:2]).shape, model(x[:2]).shape)
    pooled = keras3.layers.GlobalAveragePooling1D()(Scale(4)(hidden))
    weighted = keras3.Model(inp, keras3.layers.Dense(3)(pooled))
    weighted.compile("adam", keras3.losses.SparseCategoricalCrossentropy(from_logits=True))
    with pytest.raises(tfb.UnsupportedModelError, match=r"\*\*kwargs"):
        tfb.prune(weighted, target=0.5, data=(x, y))


def _subclassed(kx, own_scale: bool, training_default: bool | None):
    """A subclassed MLP: with ``own_scale``, a weight the model creates itself (else the
    same weight in a layer of its own); with ``training_default=True``, a Python
    branch on ``training`` that its default takes."""

    class Scale(kx.layers.Layer):
        def build(self, input_shape):
            self.scale = self.add_weight(name="scale", shape=(), initializer="ones")

        def call(self, x):
            return x * self.scale

    class Net(kx.Model):
        def __init__(self):
            super().__init__()
            self.hidden = kx.layers.Dense(32, activation="relu")
            self.head = kx.layers.Dense(4)
            if own_scale:
                self.scale = self.add_weight(name="scale", shape=(), initializer="ones")
            else:
                self.scaled = Scale()

        def call(self, x, training=training_default):
            h = self.hidden(x)
            if training:
                h = h * 0.5
            out = self.head(h)
            return out * self.scale if own_scale else self.scaled(out)

    kx.utils.set_random_seed(0)
    model = Net()
    model(np.zeros((1, 8), np.float32))
    model.compile("adam", kx.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def _data(n=64):
    rng = np.random.default_rng(0)
    return rng.random((n, 8), np.float32), rng.integers(0, 4, n)


def test_a_subclassed_model_with_a_weight_of_its_own_is_refused_before_training(kx):
    """The optimized model is built from layers and cannot hold a weight the model
    creates itself: refused up front, naming the fix (before: ``tfb.prune`` and the
    end of training failed in TensorFlow's SavedModel writer, an AssertionError
    about an untracked resource, after the whole fit)."""
    x, y = _data()
    model = _subclassed(kx, own_scale=True, training_default=None)
    with pytest.raises(tfb.errors.UnsupportedModelError, match="outside its layers.*add_weight"):
        tfb.prune(model, data=(x, y), target=0.5)
    before = [w.copy() for w in model.get_weights()]
    with pytest.raises(tfb.errors.UnsupportedModelError, match="outside its layers"):
        model.fit(x, y, epochs=2, callbacks=[tfb.BalanceCallback(verbose=0)], verbose=0)
    for old, new in zip(before, model.get_weights(), strict=True):  # refused before training
        np.testing.assert_array_equal(old, new)


def test_a_subclassed_model_with_its_weight_in_a_layer_is_pruned(kx):
    """The fix the refusal names: the same weight in a layer of its own."""
    x, y = _data()
    model = _subclassed(kx, own_scale=False, training_default=None)
    model.scaled.scale.assign(3.0)
    pruned, _ = tfb.prune(model, data=(x, y), target=0.5, finetune_epochs=0)
    assert analyze(pruned).cost.flops <= 0.5 * analyze(model).cost.flops * 1.01
    assert any(np.array_equal(w, np.float32(3.0)) for w in pruned.get_weights())


def test_a_subclassed_model_that_branches_on_a_training_true_default_is_refused(kx):
    """``call(x, training=True)`` with ``if training:`` records the training branch on
    symbolic inputs, which the model does not take in inference: refused (before:
    ``tfb.prune`` returned a model built from the training branch, and its
    verification, against a masked copy of the same record, passed)."""
    x, y = _data()
    model = _subclassed(kx, own_scale=False, training_default=True)
    with pytest.raises(tfb.errors.UnsupportedModelError, match="training=None"):
        tfb.prune(model, data=(x, y), target=0.5)
    fixed = _subclassed(kx, own_scale=False, training_default=None)
    pruned, _ = tfb.prune(fixed, data=(x, y), target=0.5, finetune_epochs=0)
    assert analyze(pruned).cost.flops <= 0.5 * analyze(fixed).cost.flops * 1.01


def test_a_model_whose_operation_reads_a_variable_no_layer_owns_is_pruned_and_exported(
    kx, tmp_path
):
    """``outputs * v`` with a bare ``tf.Variable`` (not a weight of the model: fit does not
    train it). Before: the report's SavedModel (and so ``tfb.prune`` and the end of
    training, after the whole fit) failed with TensorFlow's AssertionError about an
    untracked resource; tf_keras' ``model.save`` refuses it too, so the export writes a
    serving SavedModel with the variable."""
    scale = tf.Variable(3.0)
    kx.utils.set_random_seed(0)
    inp = kx.Input((8,))
    hidden = kx.layers.Dense(32, activation="relu")(inp)
    model = kx.Model(inp, kx.layers.Dense(4)(hidden) * scale)
    model.compile("adam", kx.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = _data()
    pruned, report = tfb.prune(model, data=(x, y), target=0.5, finetune_epochs=0)
    assert report["final_flops_ratio"] <= 0.5 * 1.01 and report["final"]["saved_model_bytes"] > 0
    callback = tfb.BalanceCallback(verbose=0)
    model.fit(x, y, epochs=2, callbacks=[callback], verbose=0)
    assert callback.report["final_flops_ratio"] <= 0.5 * 1.01
    path = callback.export(str(tmp_path / "out"))
    served = tf.saved_model.load(os.path.join(path, "saved_model")).signatures["serving_default"]
    (output,) = served(tf.constant(x[:8])).values()
    np.testing.assert_allclose(
        output.numpy(), callback.optimized_model.predict(x[:8], verbose=0), 1e-5, 1e-5
    )


def test_a_one_input_model_fed_dicts_by_input_name_gets_its_scores_and_tflite(kx, tmp_path):
    """``fit({"image": x}, y)``, as Keras takes a named input, with validation data the
    same way. Before: the report's validation scores and latency failed on the dict
    (slicing it for the serving function) and ``export(tflite=True)`` refused it as
    samples of shape ()."""
    kx.utils.set_random_seed(0)
    inp = kx.Input((8, 8, 1), name="image")
    h = kx.layers.Conv2D(16, 3, padding="same", activation="relu")(inp)
    h = kx.layers.Conv2D(16, 3, padding="same", activation="relu")(h)
    model = kx.Model(inp, kx.layers.Dense(10)(kx.layers.GlobalAveragePooling2D()(h)))
    model.compile("adam", kx.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(0)
    x, y = {"image": rng.random((64, 8, 8, 1), np.float32)}, rng.integers(0, 10, 64)
    validation = ({"image": x["image"][:32]}, y[:32])
    callback = tfb.BalanceCallback(validation_data=validation, verbose=0)
    model.fit(x, y, epochs=2, batch_size=32, callbacks=[callback], verbose=0)
    final = callback.report["final"]
    predicted = callback.optimized_model.predict(validation[0], verbose=0).argmax(-1)
    assert final["accuracy"] == pytest.approx(np.mean(predicted == validation[1]))
    assert final["latency_ms_b1"] > 0 and "unmeasured" not in final
    path = callback.export(str(tmp_path / "out"), tflite=True)
    assert os.path.getsize(os.path.join(path, "model.tflite")) > 0

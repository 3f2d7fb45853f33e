"""Tests of the tfmot weight-pruning helpers in ``tf_balancer.sparse.wrapping``."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_model_optimization as tfmot

from tf_balancer._compat import keras
from tf_balancer.errors import ConfigError, UnsupportedModelError
from tf_balancer.sparse import wrapping as sparsity

L = keras.layers
_WRAPPER = tfmot.sparsity.keras.prune_low_magnitude(L.Dense(1)).__class__


def _small_cnn(seed=0):
    keras.utils.set_random_seed(seed)
    inp = keras.Input((6, 6, 8), name="image")
    x = L.Conv2D(8, 3, name="conv")(inp)
    x = L.BatchNormalization(name="bn")(x)
    x = L.Flatten(name="flat")(x)
    x = L.Dense(32, activation="relu", name="fc1")(x)
    return keras.Model(inp, L.Dense(4, name="fc2")(x))


def _data(n=64, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 6, 6, 8)).astype("float32"), rng.integers(0, 4, n)


def _keras3_model():
    import keras as keras3

    return keras3.Sequential([keras3.Input((4,)), keras3.layers.Dense(2)])


def test_schedule_reads_the_variable_inside_a_tf_function():
    schedule = sparsity.VariablePolynomialDecay(0.0, 0.5, begin_step=0, end_step=10, frequency=1)
    sparsity_at = tf.function(lambda step: schedule(step)[1])
    step = tf.constant(10, tf.int64)
    assert float(sparsity_at(step)) == pytest.approx(0.5)
    schedule.final_sparsity.assign(0.8)
    assert float(sparsity_at(step)) == pytest.approx(0.8)
    assert sparsity_at.experimental_get_tracing_count() == 1


def test_schedule_matches_tfmot_polynomial_decay():
    ours = sparsity.VariablePolynomialDecay(
        0.1, 0.7, begin_step=4, end_step=20, power=3, frequency=4
    )
    theirs = tfmot.sparsity.keras.PolynomialDecay(0.1, 0.7, 4, 20, power=3, frequency=4)
    for step in range(0, 26):
        step = tf.constant(step, tf.int64)
        (ours_prune, ours_sparsity), (their_prune, their_sparsity) = ours(step), theirs(step)
        assert bool(ours_prune) == bool(their_prune)
        assert float(ours_sparsity) == pytest.approx(float(their_sparsity), abs=1e-6)


def test_schedule_with_equal_begin_and_end_jumps_to_final():
    schedule = sparsity.VariablePolynomialDecay(0.0, 0.6, begin_step=3, end_step=3, frequency=1)
    assert float(schedule(tf.constant(3, tf.int64))[1]) == pytest.approx(0.6)
    assert bool(schedule(tf.constant(3, tf.int64))[0])
    assert not bool(schedule(tf.constant(4, tf.int64))[0])


def test_schedule_keeps_pruning_after_end_only_when_asked():
    step = tf.constant(30, tf.int64)  # after end_step, on a pruning turn
    tfmot_rule = sparsity.VariablePolynomialDecay(0.0, 0.5, begin_step=0, end_step=10, frequency=5)
    assert not bool(tfmot_rule(step)[0])
    keep = sparsity.VariablePolynomialDecay(
        0.0, 0.5, begin_step=0, end_step=10, frequency=5, prune_after_end=True
    )
    keep.final_sparsity.assign(0.9)
    should_prune, value = keep(step)
    assert bool(should_prune) and float(value) == pytest.approx(0.9)
    assert not bool(keep(tf.constant(31, tf.int64))[0])


@pytest.mark.parametrize(
    "kwargs",
    [{"final_sparsity": 1.0}, {"initial_sparsity": -0.1}, {"begin_step": 5, "end_step": 2}],
)
def test_schedule_rejects_invalid_arguments(kwargs):
    with pytest.raises(ConfigError):
        sparsity.VariablePolynomialDecay(**kwargs)


def test_wrapped_model_clones_with_the_current_target():
    model, _ = sparsity.wrap_for_pruning(_small_cnn(), {"fc1": 0.5})
    wrapper = model.get_layer("prune_low_magnitude_fc1")
    wrapper.pruning_schedule.final_sparsity.assign(0.7)
    config = wrapper.pruning_schedule.get_config()
    assert config["config"]["final_sparsity"] == pytest.approx(0.7)
    clone = keras.models.clone_model(model).get_layer("prune_low_magnitude_fc1")
    assert isinstance(clone.pruning_schedule, sparsity.VariablePolynomialDecay)
    assert float(clone.pruning_schedule.final_sparsity.numpy()) == pytest.approx(0.7)


def test_wrap_copies_weights_and_leaves_the_input_untouched():
    model = _small_cnn()
    before = [w.copy() for w in model.get_weights()]
    wrapped, variables = sparsity.wrap_for_pruning(model, {"conv": 0.5, "fc2": 0.3})
    assert sorted(variables) == ["conv", "fc2"]
    assert sparsity.target_variables(wrapped) == variables
    assert isinstance(wrapped.get_layer("prune_low_magnitude_conv"), _WRAPPER)
    assert not isinstance(wrapped.get_layer("fc1"), _WRAPPER)
    assert not any(isinstance(layer, _WRAPPER) for layer in model.layers)
    for old, new in zip(before, model.get_weights(), strict=True):
        np.testing.assert_array_equal(old, new)
    x, _ = _data(8)
    np.testing.assert_allclose(model(x), wrapped(x), rtol=1e-5, atol=1e-6)


def test_fit_reaches_targets_and_retargets_without_recompiling():
    wrapped, variables = sparsity.wrap_for_pruning(
        _small_cnn(), {"conv": 0.5, "fc1": 0.8, "fc2": 0.3}, end_step=16, frequency=2
    )
    wrapped.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = _data()
    fit = dict(batch_size=8, verbose=0, callbacks=[tfmot.sparsity.keras.UpdatePruningStep()])
    wrapped.fit(x, y, epochs=1, **fit)  # steps 1..8 of 16: sparsity 0.8 * (1 - 0.5**3) = 0.7
    assert sparsity.weight_sparsity(wrapped)["fc1"] == pytest.approx(0.7, abs=0.01)
    train_function = wrapped.train_function
    traces = train_function.experimental_get_tracing_count()
    sparsity.set_targets(variables, {"fc2": 0.6})
    wrapped.fit(x, y, epochs=1, **fit)  # steps 9..16: the final masks at step 16
    assert wrapped.train_function is train_function
    assert train_function.experimental_get_tracing_count() == traces
    achieved = sparsity.weight_sparsity(wrapped)
    for name, target in {"conv": 0.5, "fc1": 0.8, "fc2": 0.6}.items():
        assert achieved[name] == pytest.approx(target, abs=0.02), name
    assert achieved == sparsity.weight_sparsity(sparsity.strip(wrapped))


def test_m_by_n_two_of_four_zeroes_two_in_every_four_input_channels():
    keras.utils.set_random_seed(1)
    inp = keras.Input((6, 6, 8))
    x = L.Conv2D(8, 3, name="conv")(inp)
    x = L.Conv1D(4, 2, name="c1d")(L.Reshape((16, 8))(x))
    model = keras.Model(inp, L.Dense(8, name="fc")(L.Flatten()(x)))
    wrapped, variables = sparsity.wrap_for_pruning(
        model, {"conv": 0.1, "c1d": 0.1, "fc": 0.1}, m_by_n=(2, 4)
    )
    assert sorted(variables) == ["conv", "fc"]  # Conv1D's rank-3 kernel is left alone
    assert float(variables["fc"].numpy()) == pytest.approx(0.5)
    wrapped.compile("sgd", "mse")
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(4, 6, 6, 8)), rng.normal(size=(4, 8))
    cb = [tfmot.sparsity.keras.UpdatePruningStep()]
    wrapped.fit(x.astype("float32"), y.astype("float32"), batch_size=2, verbose=0, callbacks=cb)
    stripped = sparsity.strip(wrapped)
    fc = stripped.get_layer("fc").kernel.numpy()  # (in, out): groups along axis 0
    assert (fc.reshape(-1, 4, fc.shape[1]) != 0).sum(axis=1).max() <= 2
    conv = stripped.get_layer("conv").kernel.numpy()  # (h, w, in, out): groups along axis 2
    assert (conv.reshape(3, 3, 2, 4, 8) != 0).sum(axis=3).max() <= 2
    achieved = sparsity.weight_sparsity(stripped)
    assert achieved["fc"] == pytest.approx(0.5) and achieved["conv"] == pytest.approx(0.5)
    assert achieved["c1d"] == 0.0


def test_strip_removes_every_wrapper_and_keeps_names_and_outputs():
    model = _small_cnn()
    wrapped, _ = sparsity.wrap_for_pruning(model, {"conv": 0.5, "fc1": 0.5, "fc2": 0.5})
    stripped = sparsity.strip(wrapped)
    assert not any(isinstance(layer, _WRAPPER) for layer in stripped.layers)
    assert [layer.name for layer in stripped.layers] == [layer.name for layer in model.layers]
    x, _ = _data(8)
    np.testing.assert_allclose(stripped(x), wrapped(x), rtol=1e-5, atol=1e-6)


def test_set_targets_validates_everything_before_assigning():
    _, variables = sparsity.wrap_for_pruning(_small_cnn(), {"fc1": 0.5, "fc2": 0.5})
    for bad in ({"fc1": 0.6, "fc2": 1.0}, {"fc1": 0.6, "nope": 0.1}, {"fc2": -0.1}):
        with pytest.raises(ConfigError):
            sparsity.set_targets(variables, bad)
    assert float(variables["fc1"].numpy()) == pytest.approx(0.5)
    sparsity.set_targets(variables, {"fc1": 0.9})
    assert float(variables["fc1"].numpy()) == pytest.approx(0.9)


@pytest.mark.parametrize("targets", [{"bn": 0.5}, {"missing": 0.5}, {"fc1": 1.5}])
def test_wrap_rejects_unprunable_unknown_or_invalid_targets(targets):
    with pytest.raises(ConfigError, match="prunable|0, 1"):
        sparsity.wrap_for_pruning(_small_cnn(), targets)


def test_wrap_rejects_a_model_that_is_already_wrapped():
    wrapped, _ = sparsity.wrap_for_pruning(_small_cnn(), {"fc1": 0.5})
    with pytest.raises(ConfigError, match="strip"):
        sparsity.wrap_for_pruning(wrapped, {"fc2": 0.5})


def test_weight_sparsity_counts_exact_zeros():
    model = _small_cnn()
    kernel = model.get_layer("fc2").kernel
    values = kernel.numpy()
    values.flat[: values.size // 4] = 0.0
    kernel.assign(values)
    assert sparsity.weight_sparsity(model)["fc2"] == pytest.approx(0.25)
    assert set(sparsity.weight_sparsity(model)) == {"conv", "fc1", "fc2"}
    sizes = {"conv": 3 * 3 * 8 * 8, "fc1": 128 * 32, "fc2": 32 * 4}
    assert sparsity.overall_sparsity(model) == pytest.approx(32 / sum(sizes.values()))


@pytest.mark.parametrize("target", [0.0, 0.3, 0.8, 0.9])
def test_balanced_targets_meet_the_weighted_mean_and_the_cap(target):
    model = _small_cnn()
    sizes = {"conv": 3 * 3 * 8 * 8, "fc1": 128 * 32, "fc2": 32 * 4}
    targets = sparsity.balanced_sparsity_targets(model, target, max_sparsity=0.92)
    mean = sum(targets[n] * sizes[n] for n in sizes) / sum(sizes.values())
    assert mean == pytest.approx(target, abs=1e-3)
    assert all(0.0 <= s <= 0.92 for s in targets.values())


def test_balanced_targets_prune_large_and_unimportant_layers_more():
    model = _small_cnn()
    by_magnitude = sparsity.balanced_sparsity_targets(model, 0.6)
    assert by_magnitude["fc1"] > by_magnitude["fc2"]  # 4096 small weights vs 128 large
    scores = {"conv": 1.0, "fc1": 1.0, "fc2": 1.0}
    equal = sparsity.balanced_sparsity_targets(model, 0.85, scores)
    # same importance: the kept fraction is proportional to 1 / size (until clipped at 0)
    assert equal["fc1"] > equal["conv"] > equal["fc2"] == 0.0
    keep_ratio = (1 - equal["conv"]) / (1 - equal["fc1"])
    assert keep_ratio == pytest.approx((128 * 32) / (3 * 3 * 8 * 8), rel=1e-6)
    favoured = sparsity.balanced_sparsity_targets(model, 0.6, {**scores, "fc1": 20.0})
    assert favoured["fc1"] < sparsity.balanced_sparsity_targets(model, 0.6, scores)["fc1"]
    assert favoured["conv"] > 0.0


def test_balanced_targets_reject_bad_arguments():
    model = _small_cnn()
    with pytest.raises(ConfigError, match="max_sparsity"):
        sparsity.balanced_sparsity_targets(model, 0.9, max_sparsity=0.8)
    with pytest.raises(ConfigError, match="fc2"):
        sparsity.balanced_sparsity_targets(model, 0.5, {"conv": 1.0, "fc1": 1.0})


def test_uniform_targets_are_equal_for_every_prunable_layer():
    targets = sparsity.uniform_sparsity_targets(_small_cnn(), 0.7)
    assert targets == {"conv": 0.7, "fc1": 0.7, "fc2": 0.7}


def test_compressed_size_shrinks_with_sparsity():
    model = _small_cnn()
    before = sparsity.compressed_weight_bytes(model)
    kernel = model.get_layer("fc1").kernel
    kernel.assign(np.where(np.abs(kernel.numpy()) < 0.1, 0.0, kernel.numpy()))
    assert sparsity.compressed_weight_bytes(model) < before


@pytest.mark.parametrize(
    "call",
    [
        lambda m: sparsity.wrap_for_pruning(m, {}),
        sparsity.strip,
        sparsity.weight_sparsity,
        sparsity.overall_sparsity,
        lambda m: sparsity.balanced_sparsity_targets(m, 0.5),
        lambda m: sparsity.uniform_sparsity_targets(m, 0.5),
    ],
)
def test_keras3_model_is_rejected_with_the_fix(call):
    with pytest.raises(UnsupportedModelError, match="tf_keras"):
        call(_keras3_model())


def test_subclassed_model_is_rejected():
    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.fc = L.Dense(2)

        def call(self, x):
            return self.fc(x)

    net = Net()
    net(np.zeros((1, 3), "float32"))
    with pytest.raises(UnsupportedModelError, match="functional"):
        sparsity.wrap_for_pruning(net, {})

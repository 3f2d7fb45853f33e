"""Unit tests of ``BalanceCallback`` (structured mode), driven by hand without ``fit``.

Like Keras' own callback tests: a small model, hand-made ``params`` and ``logs``,
and the hooks called in the order ``fit`` calls them.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import tensorflow as tf
from conftest import subclassed_cnn, subclassed_model

from tf_balancer._compat import keras
from tf_balancer.demo import build_digits_cnn, compile_classifier
from tf_balancer.errors import ConfigError, UnsupportedModelError
from tf_balancer.training.callback import BalanceCallback
from tf_balancer.training.state import STATE_ATTRIBUTE

BALANCER_KEYS = (
    "balancer/attention_balance",
    "balancer/flops_ratio",
    "balancer/params_ratio",
    "balancer/sparsity",
)
VAL_KEYS = ("balancer/val_accuracy", "balancer/val_recall", "balancer/val_f1")


def _model(seed: int = 0):
    return compile_classifier(build_digits_cnn(width=8, seed=seed))


def _start(callback: BalanceCallback, model, epochs: int) -> BalanceCallback:
    callback.set_model(model)
    callback.set_params({"epochs": epochs, "steps": 10, "verbose": 0})
    callback.on_train_begin()
    return callback


def _epoch(callback: BalanceCallback, epoch: int) -> dict:
    callback.on_epoch_begin(epoch)
    logs = {"loss": 0.5, "accuracy": 0.8}
    callback.on_epoch_end(epoch, logs)
    return logs


def _weights(model) -> list[np.ndarray]:
    return [w.numpy().copy() for w in model.weights]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"target": 0},
        {"target": 0.0},
        {"target": 1.2},
        {"target": float("nan")},
        {"target": -0.5},
        {"target": "0.5"},
        {"target_metric": "macs"},
        {"mode": "dense"},
        {"strategy": "random"},
        {"begin_epoch": 3, "end_epoch": 2},
        {"begin_epoch": -1},
        {"every_n_epochs": 0},
        {"finetune_epochs": -1, "finetune_data": ([0], [0])},
        {"min_keep": 0},
        {"max_prune_fraction": 1.0},
        # importance was checked only at the first rebalance, after an epoch of training
        {"importance": "bogus"},
        {"importance": {"taylor": -1.0}},
        {"importance": {"magnitude": 0.5, "nope": 0.5}},
        {"importance": 3},
    ],
)
def test_constructor_rejects_invalid_arguments(kwargs):
    with pytest.raises(ConfigError):
        BalanceCallback(**kwargs)


def test_constructor_accepts_boundary_target_and_finetune_with_data():
    callback = BalanceCallback(target=1, finetune_epochs=1, finetune_data=([0], [0]))
    assert callback.target == 1.0


def test_logs_have_balancer_keys_with_sane_values(digits):
    probe = (digits.x_train[:128], digits.y_train[:128])
    callback = BalanceCallback(
        target=0.5,
        probe_data=probe,
        validation_data=(digits.x_val, digits.y_val),
        begin_epoch=0,
        end_epoch=4,
        verbose=0,
    )
    model = _model()
    _start(callback, model, epochs=5)
    assert callback.schedule == [0, 1, 2, 3, 4]
    history = [_epoch(callback, e) for e in range(5)]
    for logs in history:
        assert logs["loss"] == 0.5  # the callback adds keys, never drops the model's
        for key in BALANCER_KEYS + VAL_KEYS:
            assert key in logs and math.isfinite(logs[key]), key
        assert 0.0 < logs["balancer/params_ratio"] <= 1.0
        assert 0.0 <= logs["balancer/sparsity"] < 1.0
        assert 0.0 < logs["balancer/attention_balance"] <= 1.0
        for key in VAL_KEYS:
            assert 0.0 <= logs[key] <= 1.0
    flops = [logs["balancer/flops_ratio"] for logs in history]
    assert flops[0] < 1.0
    assert all(b <= a + 1e-9 for a, b in zip(flops, flops[1:], strict=False))
    assert flops[-1] < flops[0]
    assert flops[-1] <= 0.5 + 0.02
    sparsity = [logs["balancer/sparsity"] for logs in history]
    assert sparsity[-1] > 0.0
    assert float(callback.state.target.numpy()) == pytest.approx(0.5)
    assert int(callback.state.rebalances.numpy()) == 5


def test_val_keys_appear_only_with_validation_data(digits):
    callback = BalanceCallback(target=0.7, importance="magnitude", verbose=0)
    _start(callback, _model(), epochs=2)
    logs = _epoch(callback, 0)
    for key in BALANCER_KEYS:
        assert key in logs
    assert not any(key.startswith("balancer/val_") for key in logs)


def test_schedule_respects_begin_end_and_period():
    callback = BalanceCallback(
        target=0.5, importance="magnitude", begin_epoch=1, end_epoch=3, every_n_epochs=2, verbose=0
    )
    model = _model()
    _start(callback, model, epochs=6)
    assert callback.schedule == [1, 3]
    seen = []
    for epoch in range(6):
        logs = _epoch(callback, epoch)
        seen.append((int(callback.state.rebalances.numpy()), logs["balancer/flops_ratio"]))
    assert [count for count, _ in seen] == [0, 1, 1, 2, 2, 2]
    assert seen[0][1] == pytest.approx(1.0)
    assert seen[1][1] < 1.0
    assert seen[2][1] == seen[1][1]
    assert seen[3][1] < seen[1][1]
    assert seen[3][1] <= 0.5 + 0.02
    assert seen[5][1] == seen[3][1]
    assert int(callback.state.epoch.numpy()) == 3
    assert float(callback.state.target.numpy()) == pytest.approx(0.5)
    assert callback.target_at(1) > callback.target_at(3) == pytest.approx(0.5)


def test_default_end_epoch_leaves_the_last_quarter_of_fit_to_recover():
    callback = BalanceCallback(importance="magnitude", begin_epoch=2, every_n_epochs=3)
    _start(callback, _model(), epochs=10)
    assert callback.schedule == [2, 5]  # final target by epoch 7: epochs 7..9 recover


def test_default_schedule_trains_the_first_eighth_dense_and_recovers_in_the_last_quarter():
    callback = BalanceCallback(importance="magnitude")
    _start(callback, _model(), epochs=8)
    assert callback.schedule == [1, 2, 3, 4, 5]
    callback = BalanceCallback(importance="magnitude")
    _start(callback, _model(), epochs=24)
    assert callback.schedule == list(range(3, 18))
    callback = BalanceCallback(importance="magnitude")
    _start(callback, _model(), epochs=3)
    assert callback.schedule == [1]  # at least one dense and one recovery epoch


def test_state_is_attached_to_the_model_at_set_model():
    model = _model()
    callback = BalanceCallback(importance="magnitude")
    callback.set_model(model)
    assert getattr(model, STATE_ATTRIBUTE) is callback.state.checkpoint


def test_keras3_model_is_accepted_in_structured_mode_and_refused_in_sparse_mode():
    import keras as keras3

    assert keras3.__version__.startswith("3")
    model = keras3.Sequential([keras3.Input((4,)), keras3.layers.Dense(8), keras3.layers.Dense(2)])
    model.compile(optimizer="adam", loss="mse")
    callback = BalanceCallback(importance="magnitude")
    callback.set_model(model)
    callback.set_params({"epochs": 2})
    callback.on_train_begin()
    assert callback.analysis.graph.prunable_groups
    callback.hooks.remove()
    sparse = BalanceCallback(mode="sparse", importance="magnitude")
    sparse.set_model(model)
    sparse.set_params({"epochs": 2})
    with pytest.raises(UnsupportedModelError, match="tf_keras"):
        sparse.on_train_begin()


def test_uncompiled_model_raises_config_error_naming_compile():
    callback = BalanceCallback(importance="magnitude")
    callback.set_model(build_digits_cnn(width=8))
    callback.set_params({"epochs": 2})
    with pytest.raises(ConfigError, match="compile"):
        callback.on_train_begin()


def test_untraceable_subclassed_model_raises_unsupported_model_error():
    model = subclassed_model()  # a Python branch on a tensor value: no symbolic graph
    model.compile(optimizer="adam", loss="mse")
    callback = BalanceCallback(importance="magnitude")
    callback.set_model(model)
    callback.set_params({"epochs": 2})
    with pytest.raises(UnsupportedModelError):
        callback.on_train_begin()


@pytest.mark.parametrize("importance", ["activation", "apoz", {"taylor": 1, "apoz": 1}])
def test_probe_criteria_without_probe_data_raise_config_error_naming_probe_data(importance):
    callback = BalanceCallback(importance=importance)
    callback.set_model(_model())
    callback.set_params({"epochs": 2})
    with pytest.raises(ConfigError, match="probe_data"):
        callback.on_train_begin()


def test_taylor_without_probe_data_streams_from_training():
    callback = BalanceCallback(importance="taylor")
    _start(callback, _model(), epochs=2)
    assert callback.stream is not None and callback.hooks.installed
    callback.on_train_end()
    assert not callback.hooks.installed


def test_taylor_with_probe_inputs_only_raises_config_error(digits):
    callback = BalanceCallback(importance={"taylor": 1.0}, probe_data=digits.x_train[:64])
    callback.set_model(_model())
    callback.set_params({"epochs": 2})
    with pytest.raises(ConfigError, match="labels"):
        callback.on_train_begin()


def test_activation_with_probe_inputs_only_is_accepted(digits):
    callback = BalanceCallback(
        target=0.8, importance="activation", probe_data=digits.x_train[:64], verbose=0
    )
    _start(callback, _model(), epochs=1)
    logs = _epoch(callback, 0)
    assert logs["balancer/flops_ratio"] <= 0.8 + 0.02


def test_finetune_without_validation_data_raises_config_error(digits):
    callback = BalanceCallback(
        importance="magnitude",
        finetune_epochs=1,
        finetune_data=(digits.x_train[:64], digits.y_train[:64]),
    )
    callback.set_model(_model())
    callback.set_params({"epochs": 2})
    with pytest.raises(ConfigError, match="validation_data"):
        callback.on_train_begin()


def test_nan_loss_warns_and_stops_changing_weights():
    callback = BalanceCallback(target=0.4, importance="magnitude", verbose=0)
    model = _model()
    _start(callback, model, epochs=4)
    _epoch(callback, 0)
    callback.on_train_batch_end(0, logs={"loss": 0.3})  # finite: no warning
    with pytest.warns(RuntimeWarning, match="NaN"):
        callback.on_train_batch_end(1, logs={"loss": float("nan")})
    before = _weights(model)
    rebalances = int(callback.state.rebalances.numpy())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once, not at every batch
        callback.on_train_batch_end(2, logs={"loss": float("nan")})
    callback.on_epoch_begin(1)  # a scheduled rebalance would prune more channels
    callback.on_train_batch_end(0, logs={"loss": 0.2})
    callback.on_epoch_begin(2)
    for weight, value in zip(model.weights, before, strict=True):
        np.testing.assert_array_equal(weight.numpy(), value, err_msg=weight.name)
    assert int(callback.state.rebalances.numpy()) == rebalances
    callback.on_train_end()
    assert callback.optimized_model is None and callback.report is None


def test_inf_loss_also_counts_as_divergence():
    callback = BalanceCallback(importance="magnitude", verbose=0)
    _start(callback, _model(), epochs=2)
    with pytest.warns(RuntimeWarning):
        callback.on_train_batch_end(0, logs={"loss": float("inf")})


def test_callback_instance_can_be_reused_for_a_second_fit():
    callback = BalanceCallback(target=0.5, importance="magnitude", begin_epoch=0, verbose=0)
    first = _model(seed=0)
    _start(callback, first, epochs=3)
    for epoch in range(3):
        _epoch(callback, epoch)
    with pytest.warns(RuntimeWarning):
        callback.on_train_batch_end(0, logs={"loss": float("nan")})
    callback.on_train_end()
    first_state = callback.state
    first_weights = _weights(first)

    second = _model(seed=1)
    _start(callback, second, epochs=3)
    assert callback.state is not first_state
    assert int(callback.state.rebalances.numpy()) == 0
    assert int(callback.state.epoch.numpy()) == -1
    assert callback.optimized_model is None and callback.report is None
    assert callback.dense_weights is None
    before = _weights(second)
    logs = _epoch(callback, 0)  # rebalances again: not stuck in "diverged" nor at epoch 2
    assert int(callback.state.rebalances.numpy()) == 1
    assert logs["balancer/flops_ratio"] < 1.0
    assert any(
        not np.array_equal(w.numpy(), v) for w, v in zip(second.weights, before, strict=True)
    )
    for weight, value in zip(first.weights, first_weights, strict=True):
        np.testing.assert_array_equal(weight.numpy(), value)


def test_evaluate_with_the_callback_keeps_the_training_state(digits):
    # model.evaluate/predict(callbacks=[callback]) call set_model too; they must not wipe
    # the rebalancing state (nor the attached checkpoint) of the model being trained.
    callback = BalanceCallback(target=0.5, importance="magnitude", begin_epoch=0, verbose=0)
    model = _model()
    _start(callback, model, epochs=3)
    _epoch(callback, 0)
    _epoch(callback, 1)
    state = callback.state
    model.evaluate(digits.x_val[:32], digits.y_val[:32], callbacks=[callback], verbose=0)
    assert callback.state is state
    assert int(callback.state.rebalances.numpy()) == 2
    assert getattr(model, STATE_ATTRIBUTE) is state.checkpoint


def test_restored_state_reapplies_masks_at_next_epoch(tmp_path):
    trained = BalanceCallback(
        target=0.5, importance="magnitude", begin_epoch=0, end_epoch=1, verbose=0
    )
    _start(trained, _model(), epochs=4)
    _epoch(trained, 0)
    _epoch(trained, 1)
    path = tf.train.Checkpoint(state=trained.state.checkpoint).save(str(tmp_path / "state"))

    model = _model()  # same seed, unmasked weights
    resumed = BalanceCallback(
        target=0.5, importance="magnitude", begin_epoch=0, end_epoch=1, verbose=0
    )
    _start(resumed, model, epochs=4)
    tf.train.Checkpoint(state=resumed.state.checkpoint).restore(path)
    logs = _epoch(resumed, 2)  # not scheduled: only re-syncs the masks
    assert int(resumed.state.rebalances.numpy()) == 2
    keep = resumed.state.keep_indices()
    for gid, idx in trained.state.keep_indices().items():
        np.testing.assert_array_equal(keep[gid], idx)
    group = resumed.analysis.graph.group_of("conv1")
    pruned = np.setdiff1d(np.arange(8), keep[group])
    assert len(pruned)
    assert np.all(model.get_layer("conv1").kernel.numpy()[..., pruned] == 0)
    assert logs["balancer/flops_ratio"] <= 0.5 + 0.02


def test_streamed_taylor_sums_are_saved_and_restored_with_the_model(tmp_path):
    """A restart mid-window (BackupAndRestore) rebalances on the same gradient sums."""
    trained = _start(BalanceCallback(verbose=0), _model(), epochs=4)
    sums = {
        name: np.arange(len(v), dtype=np.float32) + 1 for name, v in trained.stream.scores().items()
    }
    trained.stream.load(sums, batches=7)
    path = tf.train.Checkpoint(model=trained.model).save(str(tmp_path / "ckpt"))

    resumed = _start(BalanceCallback(verbose=0), _model(), epochs=4)
    assert resumed.stream.batches == 0
    tf.train.Checkpoint(model=resumed.model).restore(path).expect_partial()
    assert resumed.stream.batches == 7
    restored = resumed.stream.scores()
    assert restored.keys() == sums.keys()
    for name, value in sums.items():
        np.testing.assert_array_equal(restored[name], value)


def test_export_before_training_raises_config_error(tmp_path):
    callback = BalanceCallback()
    with pytest.raises(ConfigError, match="fit"):
        callback.export(str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_tf_data_datasets_are_rejected_with_the_fix():
    dataset = tf.data.Dataset.from_tensor_slices((np.zeros((4, 16, 16, 1)), np.zeros(4)))
    for name in ("probe_data", "validation_data"):
        with pytest.raises(ConfigError, match="as_numpy_iterator"):
            BalanceCallback(**{name: dataset})


def test_one_hot_validation_labels_give_the_same_scores_as_class_ids(digits):
    x, y = digits.x_val[:128], digits.y_val[:128]
    model = _model()
    sparse = _epoch(
        _start(BalanceCallback(importance="magnitude", validation_data=(x, y)), model, 3), 0
    )
    one_hot = _epoch(
        _start(
            BalanceCallback(importance="magnitude", validation_data=(x, np.eye(10)[y])),
            _model(),
            3,
        ),
        0,
    )
    for key in VAL_KEYS:
        assert one_hot[key] == pytest.approx(sparse[key])


def test_subclassed_classifier_is_scored_as_a_classifier_on_validation_data(digits):
    # A subclassed model has no `outputs`: the task must be read from its functional
    # twin's, or a classifier is scored as a regression model and the epoch end raises.
    x, y = digits.x_val[:128], digits.y_val[:128]
    model = subclassed_cnn(keras)
    model(x[:1])
    model.compile(
        "adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True), ["accuracy"]
    )
    callback = BalanceCallback(importance="magnitude", validation_data=(x, y), verbose=0)
    logs = _epoch(_start(callback, model, 3), 0)
    accuracy = float(np.mean(model.predict(x, verbose=0).argmax(-1) == y))
    assert logs["balancer/val_accuracy"] == pytest.approx(accuracy)
    for key in VAL_KEYS:
        assert key in logs


def test_binary_sigmoid_model_with_flat_labels_works_with_taylor():
    rng = np.random.default_rng(0)
    x = rng.random((64, 8, 8, 1), dtype=np.float32)
    y = (x.mean(axis=(1, 2, 3)) > 0.5).astype("float32")  # shape (n,), model output (n, 1)
    inp = keras.Input((8, 8, 1))
    h = keras.layers.Conv2D(8, 3, activation="relu")(inp)
    out = keras.layers.Dense(1, activation="sigmoid")(keras.layers.GlobalAveragePooling2D()(h))
    model = keras.Model(inp, out)
    model.compile(optimizer="adam", loss="binary_crossentropy")
    callback = BalanceCallback(target=0.6, probe_data=(x, y), validation_data=(x, y), min_keep=2)
    logs = _epoch(_start(callback, model, 1), 0)
    assert logs["balancer/flops_ratio"] <= 0.6 + 1e-9
    assert 0.0 <= logs["balancer/val_f1"] <= 1.0


def test_a_channel_once_cut_stays_cut_at_every_later_rebalance(digits):
    """Masked channels have zero weights and no gradient: a later rebalance that kept one
    again would spend budget on a dead channel. Each plan lies within the one before
    (channels of a Dense group came back before this was enforced)."""
    kept_after: list[dict[int, set[int]]] = []

    class Record(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            plan = balancer.state.keep_indices()
            kept_after.append({g: set(k.tolist()) for g, k in plan.items()})

    keras.utils.set_random_seed(1)
    model = keras.Sequential(
        [
            keras.Input((16, 16, 1)),
            keras.layers.Conv2D(16, 3, padding="same", activation="relu"),
            keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Flatten(),
            keras.layers.Dense(32, activation="relu"),
            keras.layers.Dense(10),
        ]
    )
    compile_classifier(model)
    balancer = BalanceCallback(verbose=0)
    model.fit(
        digits.x_train,
        digits.y_train,
        epochs=6,
        batch_size=64,
        verbose=0,
        callbacks=[balancer, Record()],
    )
    assert int(balancer.state.rebalances.numpy()) >= 3
    for before, after in zip(kept_after[:-1], kept_after[1:], strict=True):
        for gid in before:
            assert after[gid] <= before[gid], (gid, sorted(after[gid] - before[gid]))

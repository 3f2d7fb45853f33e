"""BalanceCallback in ``mode="sparse"``: tfmot pruning driven by variable targets."""

from __future__ import annotations

import numpy as np
import pytest

from tf_balancer import BalanceCallback, ConfigError
from tf_balancer._compat import keras
from tf_balancer.demo import build_digits_cnn, compile_classifier, load_digits_data
from tf_balancer.sparse import wrapping

TARGET = 0.3  # keep 30% of the prunable weights: 70% sparsity


def _wrapped(**kwargs):
    base = build_digits_cnn(width=8, seed=0)
    names = list(wrapping.prunable_kernels(base))
    model, variables = wrapping.wrap_for_pruning(base, {n: 0.0 for n in names}, **kwargs)
    return compile_classifier(model), variables


class _TrainFunctionSpy(keras.callbacks.Callback):
    def on_train_begin(self, logs=None):
        self.functions = []

    def on_epoch_end(self, epoch, logs=None):
        self.functions.append(self.model.train_function)


def _sparse_callback(data, **extra):
    return BalanceCallback(
        target=TARGET,
        mode="sparse",
        importance="magnitude",
        validation_data=(data.x_val, data.y_val),
        verbose=0,
        **extra,
    )


@pytest.fixture(scope="module")
def sparse_run():
    data = load_digits_data(0)
    model, variables = _wrapped(end_step=0, frequency=5, prune_after_end=True)
    callback = _sparse_callback(data)
    spy = _TrainFunctionSpy()
    history = model.fit(
        data.x_train, data.y_train, epochs=3, batch_size=32, callbacks=[callback, spy], verbose=0
    )
    return model, variables, callback, spy, history


@pytest.mark.slow
def test_sparse_mode_reaches_the_target_sparsity(sparse_run):
    model, _, callback, _, history = sparse_run
    logged = history.history["balancer/sparsity"]
    assert logged == sorted(logged), "sparsity ramps up"
    assert logged[-1] == pytest.approx(1 - TARGET, abs=0.02)
    assert wrapping.overall_sparsity(model) == pytest.approx(1 - TARGET, abs=0.02)
    assert history.history["balancer/flops_ratio"][-1] == 1.0  # unstructured: dense FLOPs


@pytest.mark.slow
def test_sparse_mode_balances_per_layer_targets_without_recompiling(sparse_run):
    _, variables, _, spy, _ = sparse_run
    targets = {name: float(v.numpy()) for name, v in variables.items()}
    assert len(set(round(t, 3) for t in targets.values())) > 1, targets  # not uniform
    assert len({id(f) for f in spy.functions}) == 1  # one compiled train function


@pytest.mark.slow
def test_sparse_mode_exports_a_stripped_model_that_keeps_the_zeros(sparse_run):
    model, _, callback, _, _ = sparse_run
    optimized = callback.optimized_model
    assert not wrapping.wrappers(optimized)
    assert all(type(layer).__name__ != "PruneLowMagnitude" for layer in optimized.layers), (
        "wrappers stripped"
    )
    zeros = sum(int(np.count_nonzero(w == 0)) for w in optimized.get_weights())
    assert zeros > 0.5 * sum(w.size for w in optimized.get_weights())
    assert (
        callback.report["final"]["saved_model_gzip_bytes"]
        < callback.report["dense"]["saved_model_gzip_bytes"]
    )


def test_sparse_mode_needs_a_wrapped_model():
    model = compile_classifier(build_digits_cnn(width=8, seed=0))
    callback = BalanceCallback(mode="sparse", importance="magnitude")
    callback.set_model(model)
    with pytest.raises(ConfigError, match="wrap_for_pruning"):
        callback.on_train_begin()


def test_sparse_mode_rejects_a_lagging_wrapper_schedule():
    model, _ = _wrapped()  # tfmot-style schedule ending at step 1000
    callback = BalanceCallback(mode="sparse", importance="magnitude")
    callback.set_model(model)
    with pytest.raises(ConfigError, match="end_step=0, prune_after_end=True"):
        callback.on_train_begin()


@pytest.mark.slow
def test_sparse_mode_never_trains_the_users_model_after_fit(caplog):
    """Fine-tuning the unwrapped model trained the user's own weights after ``fit``
    returned (they share layers) and regrew the pruned ones: it is skipped, with a
    warning that says why."""
    data = load_digits_data(0)
    model, _ = _wrapped(end_step=0, frequency=5, prune_after_end=True)
    callback = _sparse_callback(data, finetune_epochs=2, finetune_data=(data.x_train, data.y_train))
    with caplog.at_level("WARNING", logger="tf_balancer"):
        model.fit(
            data.x_train, data.y_train, epochs=3, batch_size=32, callbacks=[callback], verbose=0
        )
        after_fit = [w.copy() for w in model.get_weights()]
        optimized = callback.optimized_model
    for now, then in zip(model.get_weights(), after_fit, strict=True):
        np.testing.assert_array_equal(now, then)
    assert any("fine-tuning skipped in mode='sparse'" in r.getMessage() for r in caplog.records)
    kernels = [w for w in optimized.get_weights() if w.ndim > 1]
    zeros = sum(int((k == 0).sum()) for k in kernels) / sum(k.size for k in kernels)
    assert zeros > 0.8 * (1 - TARGET)


@pytest.mark.slow
def test_sparse_mode_says_when_the_masks_never_updated(caplog):
    """A wrapper whose masks update every 1000 steps, in a fit of about 150: the model
    ended with no zeros and a normal-looking report; now a warning names the fix."""
    data = load_digits_data(0)
    model, _ = _wrapped(end_step=0, frequency=1000, prune_after_end=True)
    with caplog.at_level("WARNING", logger="tf_balancer"):
        model.fit(
            data.x_train,
            data.y_train,
            epochs=3,
            batch_size=32,
            verbose=0,
            callbacks=[_sparse_callback(data)],
        )
    messages = [r.getMessage() for r in caplog.records if "are 0% zeros, not 70%" in r.getMessage()]
    assert len(messages) == 1 and "frequency below the steps per epoch" in messages[0]

"""Tests of the ``prune_weights`` pass (one-shot tfmot magnitude pruning)."""

from __future__ import annotations

import numpy as np
import pytest

from tf_balancer._compat import keras
from tf_balancer.demo import build_digits_cnn
from tf_balancer.errors import ConfigError, UnsupportedModelError
from tf_balancer.passes.base import PassContext, get_pass
from tf_balancer.passes.prune_weights import PruneWeights
from tf_balancer.sparse import wrapping as sparsity

L = keras.layers


def _run(model, **ctx):
    return get_pass("prune_weights").run(model, None, PassContext(**ctx))


@pytest.fixture(scope="module")
def cnn():
    return build_digits_cnn(width=8, seed=0)


def _kernels(model):
    return sparsity.prunable_kernels(model)


def _assert_magnitude_pruned(original, pruned):
    """Kept weights are unchanged and no zeroed weight was larger than a kept one."""
    for name, kernels in _kernels(pruned).items():
        for old, new in zip(_kernels(original)[name], kernels, strict=True):
            kept = new != 0
            np.testing.assert_array_equal(new[kept], old[kept])
            if kept.any() and (~kept).any():
                assert np.abs(old[~kept]).max() <= np.abs(old[kept]).min(), name


def test_pass_is_registered_and_does_not_preserve_the_function():
    assert isinstance(get_pass("prune_weights"), PruneWeights)
    assert PruneWeights.preserves_function is False


def test_default_options_prune_to_eighty_percent_balanced(cnn):
    before = [w.copy() for w in cnn.get_weights()]
    result = _run(cnn)
    assert result.changed and result.model is not cnn
    for old, new in zip(before, cnn.get_weights(), strict=True):
        np.testing.assert_array_equal(old, new)  # the input is untouched
    assert sparsity.overall_sparsity(result.model) == pytest.approx(0.8, abs=0.01)
    stats = result.stats
    assert stats["overall_sparsity"] == pytest.approx(0.8, abs=0.01)
    assert set(stats["sparsity"]) == {"conv1", "conv2", "conv3", "conv4", "fc", "logits"}
    assert len(set(round(s, 3) for s in stats["targets"].values())) > 1  # balanced, not uniform
    for name, target in stats["targets"].items():
        assert stats["sparsity"][name] == pytest.approx(target, abs=0.01), name
    assert stats["compressed_bytes_after"] < 0.6 * stats["compressed_bytes_before"]
    assert [layer.name for layer in result.model.layers] == [layer.name for layer in cnn.layers]
    x = np.random.default_rng(0).random((4, 16, 16, 1), dtype="float32")
    assert result.model(x).shape == cnn(x).shape
    _assert_magnitude_pruned(cnn, result.model)


def test_uniform_strategy_prunes_every_layer_alike(cnn):
    options = {"prune_weights": {"target_sparsity": 0.5, "strategy": "uniform"}}
    result = _run(cnn, options=options)
    assert set(result.stats["targets"].values()) == {0.5}
    for name, achieved in result.stats["sparsity"].items():
        assert achieved == pytest.approx(0.5, abs=0.01), name


def test_context_sparsity_overrides_the_options(cnn):
    options = {"prune_weights": {"target_sparsity": 0.9}}
    result = _run(cnn, sparsity={"fc": 0.6, "conv2": 0.3}, options=options)
    achieved = sparsity.weight_sparsity(result.model)
    assert achieved["fc"] == pytest.approx(0.6, abs=0.01)
    assert achieved["conv2"] == pytest.approx(0.3, abs=0.01)
    assert achieved["conv1"] == 0.0 and achieved["logits"] == 0.0
    _assert_magnitude_pruned(cnn, result.model)


def test_m_by_n_option_gives_two_of_four_sparsity(cnn):
    options = {"prune_weights": {"target_sparsity": 0.5, "m_by_n": [2, 4]}}
    result = _run(cnn, options=options)
    assert result.stats["m_by_n"] == (2, 4)
    fc = result.model.get_layer("fc").kernel.numpy()  # (in, out): groups along axis 0
    assert (fc.reshape(-1, 4, fc.shape[1]) != 0).sum(axis=1).max() <= 2
    conv = result.model.get_layer("conv4").kernel.numpy()  # (h, w, in, out)
    assert (conv.reshape(3, 3, -1, 4, conv.shape[3]) != 0).sum(axis=3).max() <= 2
    assert sparsity.overall_sparsity(result.model) == pytest.approx(0.5, abs=0.01)


def test_model_without_prunable_layers_is_unchanged():
    inp = keras.Input((8, 8, 3))
    x = L.DepthwiseConv2D(3, name="dw")(inp)  # tfmot does not prune depthwise kernels
    model = keras.Model(inp, L.GlobalAveragePooling2D()(L.BatchNormalization()(x)))
    result = _run(model)
    assert not result.changed and result.model is model


def test_zero_targets_leave_the_model_unchanged(cnn):
    result = _run(cnn, sparsity={"fc": 0.0})
    assert not result.changed and result.model is cnn


@pytest.mark.parametrize(
    "options",
    [{"target": 0.5}, {"strategy": "global"}, {"target_sparsity": 1.0}, {"m_by_n": [4, 2]}],
)
def test_invalid_options_raise_config_error(cnn, options):
    with pytest.raises(ConfigError):
        _run(cnn, options={"prune_weights": options})


def test_keras3_model_raises_unsupported_model_error():
    import keras as keras3

    model = keras3.Sequential([keras3.Input((4,)), keras3.layers.Dense(2)])
    with pytest.raises(UnsupportedModelError, match="tf_keras"):
        _run(model)

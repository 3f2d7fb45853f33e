"""Tests of ``MetaOptimizer``: composition, rollback, records and configuration errors.

The composition test follows optax's ``chain`` test: running ``[a, b]`` must
equal applying ``a`` and then ``b`` by hand.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import (
    assert_model_unchanged,
    passes_registered,
    randomize_batchnorm,
    snapshot_model,
)

from tf_balancer._compat import keras
from tf_balancer.errors import ConfigError, PassError, VerificationError
from tf_balancer.graph.layer_graph import LayerGraph
from tf_balancer.optimizer import MetaOptimizer, OptimizationReport, PassRecord, model_stats
from tf_balancer.passes.base import (
    GraphPass,
    PassContext,
    PassResult,
    get_pass,
    registered_passes,
)

L = keras.layers
STAT_KEYS = {"layers", "params", "flops"}


def _model():
    keras.utils.set_random_seed(0)
    inp = keras.Input((8, 8, 3), name="image")
    x = L.Conv2D(4, 3, name="conv")(inp)
    x = L.BatchNormalization(name="bn")(x)
    x = L.ReLU(name="relu")(x)
    x = L.Dropout(0.5, name="drop")(x)
    x = L.Flatten(name="flat")(x)
    return randomize_batchnorm(keras.Model(inp, L.Dense(3, name="logits")(x)), seed=1)


def _x(batch=3):
    return np.random.default_rng(0).normal(size=(batch, 8, 8, 3)).astype("float32")


def _by_hand(model, names):
    for name in names:
        model = get_pass(name).run(model, LayerGraph.from_model(model), PassContext()).model
    return model


def _structure(model):
    return [
        (type(layer).__name__, layer.name, [tuple(w.shape) for w in layer.weights])
        for layer in model.layers
    ]


def _assert_same_model(a, b):
    assert _structure(a) == _structure(b)
    for wa, wb in zip(a.get_weights(), b.get_weights(), strict=True):
        np.testing.assert_array_equal(wa, wb)
    np.testing.assert_array_equal(a(_x(), training=False), b(_x(), training=False))


class _Raises(GraphPass):
    def run(self, model, graph, ctx):
        raise RuntimeError("deliberately broken")


class _WrongOutputs(GraphPass):
    """Claims to preserve the function but perturbs the last layer's bias."""

    def run(self, model, graph, ctx):
        new = keras.models.clone_model(model)
        new.set_weights(model.get_weights())
        new.layers[-1].bias.assign(new.layers[-1].bias + 1.0)
        return PassResult(new, changed=True, message="perturbed")


class _Noop(GraphPass):
    def run(self, model, graph, ctx):
        return PassResult(model, changed=False, message="nothing to do")


@pytest.fixture
def broken_passes():
    passes = {"test_raises": _Raises, "test_wrong_outputs": _WrongOutputs, "test_noop": _Noop}
    with passes_registered(passes):
        yield passes


def test_chain_equals_applying_the_passes_by_hand():
    model = _model()
    names = ["strip_training_ops", "fold_batchnorm"]
    chained, report = MetaOptimizer(names).run(model)
    _assert_same_model(chained, _by_hand(model, names))
    assert [r.name for r in report.records] == names
    assert [r.status for r in report.records] == ["applied", "applied"]
    kinds = [type(layer).__name__ for layer in chained.layers]
    assert kinds == ["InputLayer", "Conv2D", "ReLU", "Flatten", "Dense"]


def test_a_pass_that_raises_is_rolled_back_and_later_passes_run(broken_passes):
    model = _model()
    chained, report = MetaOptimizer(["strip_training_ops", "test_raises", "fold_batchnorm"]).run(
        model
    )
    assert [r.status for r in report.records] == ["applied", "rolled_back", "applied"]
    assert report.rolled_back == ["test_raises"]
    assert "deliberately broken" in report.records[1].message
    assert report.records[1].before == report.records[1].after == report.records[0].after
    _assert_same_model(chained, _by_hand(model, ["strip_training_ops", "fold_batchnorm"]))


def test_a_pass_with_wrong_outputs_is_rolled_back_and_later_passes_run(broken_passes):
    model = _model()
    chained, report = MetaOptimizer(
        ["strip_training_ops", "test_wrong_outputs", "fold_batchnorm"]
    ).run(model)
    assert [r.status for r in report.records] == ["applied", "rolled_back", "applied"]
    bad = report.records[1]
    assert bad.message.startswith("verification failed")
    assert bad.max_abs_diff == pytest.approx(1.0, rel=1e-3)
    _assert_same_model(chained, _by_hand(model, ["strip_training_ops", "fold_batchnorm"]))


@pytest.mark.parametrize("name", ["test_raises", "test_wrong_outputs"])
def test_a_rolled_back_pass_returns_the_previous_model(broken_passes, name):
    model = _model()
    result, report = MetaOptimizer([name]).run(model)
    assert result is model
    assert report.records[0].status == "rolled_back"


def test_fail_on_error_raises_pass_error(broken_passes):
    with pytest.raises(PassError, match="test_raises.*deliberately broken"):
        MetaOptimizer(["test_raises"], fail_on_error=True).run(_model())


def test_fail_on_error_raises_verification_error(broken_passes):
    with pytest.raises(VerificationError, match="test_wrong_outputs"):
        MetaOptimizer(["test_wrong_outputs"], fail_on_error=True).run(_model())


def test_unchanged_passes_are_recorded_unchanged(broken_passes):
    model = _model()
    result, report = MetaOptimizer(["test_noop", "strip_training_ops", "strip_training_ops"]).run(
        model
    )
    assert [r.status for r in report.records] == ["unchanged", "applied", "unchanged"]
    assert report.records[0].message == "nothing to do"
    assert report.records[2].before == report.records[2].after
    assert report.rolled_back == []


def test_unknown_pass_name_lists_registered_passes():
    with pytest.raises(ConfigError, match="no_such_pass") as info:
        MetaOptimizer(["fold_batchnorm", "no_such_pass"])
    for name in registered_passes():
        assert name in str(info.value)


def test_grappler_must_be_last():
    with pytest.raises(ConfigError, match="grappler.*last"):
        MetaOptimizer(["grappler", "fold_batchnorm"])
    assert MetaOptimizer(["fold_batchnorm", "grappler"]).passes[-1].name == "grappler"


def test_pass_instances_are_accepted():
    optimizer = MetaOptimizer([get_pass("strip_training_ops")])
    _, report = optimizer.run(_model())
    assert report.records[0].name == "strip_training_ops"


def test_records_hold_before_and_after_stats_and_time():
    model = _model()
    dense_stats = model_stats(model)
    _, report = MetaOptimizer(["strip_training_ops", "fold_batchnorm"]).run(model)
    strip, fold = report.records
    for record in report.records:
        assert isinstance(record, PassRecord)
        assert set(record.before) == set(record.after) == STAT_KEYS
        assert all(isinstance(v, int) and v > 0 for v in record.before.values())
        assert record.seconds > 0
    assert strip.before == dense_stats
    assert strip.after["layers"] == strip.before["layers"] - 1
    assert strip.after["params"] == strip.before["params"]
    assert fold.before == strip.after
    assert fold.after["layers"] == fold.before["layers"] - 1
    assert fold.after["params"] == fold.before["params"] - 4 * 4
    assert fold.stats["folded"] == (("conv", "bn"),)


def test_report_table_and_dict_mention_each_pass(broken_passes):
    _, report = MetaOptimizer(["strip_training_ops", "test_raises", "test_noop"]).run(_model())
    assert isinstance(report, OptimizationReport)
    table = report.table()
    lines = table.splitlines()
    assert len(lines) == 1 + 3
    for line, (name, status) in zip(
        lines[1:],
        [
            ("strip_training_ops", "applied"),
            ("test_raises", "rolled_back"),
            ("test_noop", "unchanged"),
        ],
        strict=True,
    ):
        assert line.split()[:2] == [name, status]
    passes = report.to_dict()["passes"]
    assert [p["name"] for p in passes] == ["strip_training_ops", "test_raises", "test_noop"]


def test_the_input_model_is_never_mutated(broken_passes):
    model = _model()
    snapshot = snapshot_model(model)
    y = model(_x(), training=False).numpy()
    names = ["strip_training_ops", "test_wrong_outputs", "fold_batchnorm", "fuse_activation"]
    result, _ = MetaOptimizer(names).run(model)
    assert_model_unchanged(model, snapshot)
    np.testing.assert_array_equal(model(_x(), training=False), y)
    np.testing.assert_allclose(result(_x(), training=False), y, rtol=1e-4, atol=1e-5)


def test_probe_inputs_from_the_context_are_used(broken_passes):
    """An all-zero probe cannot see a kernel-only change; the default random probe can."""

    class _ScaleKernel(GraphPass):
        def run(self, model, graph, ctx):
            new = keras.models.clone_model(model)
            new.set_weights(model.get_weights())
            dense = new.get_layer("logits")
            dense.kernel.assign(dense.kernel * 2.0)
            return PassResult(new, changed=True)

    with passes_registered({"test_scale_kernel": _ScaleKernel}):
        model = keras.Sequential([keras.Input((4,)), L.Dense(2, use_bias=False, name="logits")])
        zeros = PassContext(probe_inputs=np.zeros((2, 4), "float32"))
        _, blind = MetaOptimizer(["test_scale_kernel"]).run(model, zeros)
        _, seeing = MetaOptimizer(["test_scale_kernel"]).run(model)
    assert blind.records[0].status == "applied"
    assert seeing.records[0].status == "rolled_back"
    assert seeing.records[0].message.startswith("verification failed")


class _MutatesInput(GraphPass):
    """Breaks the contract: changes its input's bias in place, returns a clone of it."""

    def run(self, model, graph, ctx):
        model.layers[-1].bias.assign(model.layers[-1].bias + 1e-3)
        new = keras.models.clone_model(model)
        new.set_weights(model.get_weights())
        return PassResult(new, changed=True, message="clone of a mutated input")


def test_a_pass_that_mutates_its_input_is_rolled_back_and_the_input_restored():
    with passes_registered({"test_mutates_input": _MutatesInput}):
        model = _model()
        snapshot = snapshot_model(model)
        y = model(_x(), training=False).numpy()
        result, report = MetaOptimizer(["test_mutates_input"]).run(model)
        with pytest.raises(PassError, match="modified its input model in place"):
            MetaOptimizer(["test_mutates_input"], fail_on_error=True).run(model)
    assert report.records[0].status == "rolled_back"
    assert "in place" in report.records[0].message
    assert result is model  # the input, restored, is the result of a rolled-back pass
    assert_model_unchanged(model, snapshot)  # bit-identical
    np.testing.assert_array_equal(model(_x(), training=False).numpy(), y)


def test_one_progress_line_per_pass_at_the_level_asked(caplog):
    """End of training shows a line per pass (status, seconds, FLOPs before -> after)."""
    import logging

    passes = ["strip_training_ops", "fold_batchnorm", "fuse_activation"]
    optimizer = MetaOptimizer(passes, progress_log_level=logging.INFO)
    with caplog.at_level(logging.INFO, logger="tf_balancer.optimizer"):
        _, report = optimizer.run(_model())
    lines = [r.getMessage() for r in caplog.records if r.name == "tf_balancer.optimizer"]
    assert len(lines) == len(passes), lines
    for line, record in zip(lines, report.records, strict=True):
        assert line.startswith(f"pass {record.name}: {record.status} in ")
        assert f"FLOPs {record.before['flops']:,} -> {record.after['flops']:,}" in line
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="tf_balancer.optimizer"):
        MetaOptimizer(passes).run(_model())  # default: DEBUG, not shown at INFO
    assert not [r for r in caplog.records if r.name == "tf_balancer.optimizer"]


def test_a_known_analysis_is_used_instead_of_analysing_again(monkeypatch):
    from tf_balancer import optimizer as optimizer_module

    analysed = []
    real = optimizer_module._analysed
    monkeypatch.setattr(optimizer_module, "_analysed", lambda m: analysed.append(m) or real(m))
    model = _model()
    stripped, report = MetaOptimizer(["strip_training_ops"]).run(model)
    assert analysed == [model, stripped]  # the input, then the applied pass's result
    assert report.analysis.cost.flops == report.records[0].after["flops"]
    folded, more = MetaOptimizer(["fold_batchnorm"]).run(stripped, analysis=report.analysis)
    assert analysed[2:] == [folded]  # only the new result
    assert more.records[0].before == report.records[0].after
    assert more.records[0].after == real(folded)[0]
    _assert_same_model(folded, _by_hand(model, ["strip_training_ops", "fold_batchnorm"]))
    MetaOptimizer(["fold_batchnorm"]).run(model, analysis=report.analysis)  # not model's
    assert analysed[-2] is model  # so model is analysed, then the pass's result

"""Tests of end-of-training finalization: pass split, summary table, export, Finalizer.run."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from tf_balancer.analysis import analyze
from tf_balancer.demo import build_digits_cnn, compile_classifier
from tf_balancer.errors import ExportError
from tf_balancer.export.writers import export_result
from tf_balancer.report import summary_markdown
from tf_balancer.training.callback import BalanceCallback
from tf_balancer.training.finalize import (
    LOSSLESS_PASSES,
    STRUCTURED_PASSES,
    Finalizer,
)


def _drive(callback: BalanceCallback, model, epochs: int) -> BalanceCallback:
    """Run the callback's hooks as ``fit`` would, without training."""
    callback.set_model(model)
    callback.set_params({"epochs": epochs, "steps": 1, "verbose": 0})
    callback.on_train_begin()
    for epoch in range(epochs):
        callback.on_epoch_begin(epoch)
        callback.on_train_batch_end(0, logs={"loss": 1.0})
        callback.on_epoch_end(epoch, {})
    return callback


def test_default_structured_passes_split_after_prune_channels():
    first, second = Finalizer(BalanceCallback().finalize_inputs()).passes()
    assert first == ("prune_channels",)
    assert second == ("strip_training_ops", "fold_batchnorm", "fuse_activation")
    assert first + second == STRUCTURED_PASSES


def test_custom_passes_split_right_after_prune_channels():
    callback = BalanceCallback(passes=["fold_batchnorm", "prune_channels", "fuse_activation"])
    first, second = Finalizer(callback.finalize_inputs()).passes()
    assert first == ("fold_batchnorm", "prune_channels")
    assert second == ("fuse_activation",)


def test_passes_without_prune_channels_all_run_after_finetuning():
    callback = BalanceCallback(passes=("strip_training_ops", "fold_batchnorm"))
    assert Finalizer(callback.finalize_inputs()).passes() == (
        (),
        ("strip_training_ops", "fold_batchnorm"),
    )


def test_sparse_mode_defaults_to_lossless_passes():
    assert Finalizer(BalanceCallback(mode="sparse").finalize_inputs()).passes() == (
        (),
        LOSSLESS_PASSES,
    )


def test_explicit_empty_passes_runs_no_pass():
    # passes=() is an explicit choice ("run nothing"), not "use the defaults".
    assert Finalizer(BalanceCallback(passes=()).finalize_inputs()).passes() == ((), ())


def _report() -> dict:
    return {
        "dense": {
            "accuracy": 0.9,
            "f1": 0.8,
            "flops": 1000,
            "params": 200,
            "latency_ms_b1": 2.0,
            "saved_model_bytes": 0,
        },
        "final": {
            "accuracy": 0.85,
            "f1": 0.75,
            "flops": 400,
            "params": 100,
            "latency_ms_b64": 3.0,
            "saved_model_bytes": 10,
        },
        "layers": [
            {
                "layer": "conv1",
                "attention": 0.5,
                "channels_before": 8,
                "channels_after": 4,
                "keep_ratio": 0.5,
                "flops_before": 100,
                "flops_after": 50,
            }
        ],
    }


def test_summary_markdown_lists_metrics_present_in_dense_and_final():
    table = summary_markdown(_report())
    lines = table.splitlines()
    assert lines[0] == "| metric | dense | optimized | ratio |"
    labels = [line.split("|")[1].strip() for line in lines[2:]]
    assert labels == ["accuracy", "macro F1", "FLOPs", "params", "SavedModel bytes"]
    assert "| FLOPs | 1,000 | 400 | 0.400x |" in lines
    assert "| accuracy | 0.9 | 0.85 | 0.944x |" in lines
    assert "| SavedModel bytes | 0 | 10 |  |" in lines  # no ratio against 0
    assert "latency" not in table and "recall" not in table


def test_export_result_writes_every_file(tmp_path):
    model = build_digits_cnn(width=4)
    out = export_result(str(tmp_path / "out"), model, _report())
    assert sorted(os.listdir(out)) == ["report.json", "report.md", "report.png", "saved_model"]
    with open(os.path.join(out, "report.json"), encoding="utf-8") as handle:
        assert json.load(handle) == _report()
    with open(os.path.join(out, "report.md"), encoding="utf-8") as handle:
        markdown = handle.read()
    assert "| FLOPs | 1,000 | 400 | 0.400x |" in markdown
    assert "| conv1 | 0.5 | 8 | 4 | 100 | 50 |" in markdown
    with pytest.raises(ExportError):
        export_result(out, model, _report())


@pytest.fixture(scope="module")
def finalized(digits):
    callback = BalanceCallback(
        target=0.5,
        importance="magnitude",
        validation_data=(digits.x_val[:200], digits.y_val[:200]),
        begin_epoch=0,
        end_epoch=2,
        verbose=0,
    )
    model = compile_classifier(build_digits_cnn(width=8, seed=0))
    _drive(callback, model, epochs=3)
    optimized, report = Finalizer(callback.finalize_inputs()).run()
    return callback, optimized, report


def test_finalizer_run_compacts_without_changing_the_function(finalized, digits):
    callback, optimized, _ = finalized
    np.testing.assert_allclose(
        optimized.predict(digits.x_val[:100], verbose=0),
        callback.model.predict(digits.x_val[:100], verbose=0),
        rtol=1e-4,
        atol=1e-4,
    )
    dense_flops = analyze(build_digits_cnn(width=8)).cost.flops
    assert analyze(optimized).cost.flops <= 0.5 * dense_flops * 1.01
    assert optimized.count_params() < callback.model.count_params()


def test_finalizer_report_layers_match_the_kept_channels(finalized):
    callback, _, report = finalized
    keep = callback.state.keep_indices()
    assert report["layers"]
    for row in report["layers"]:
        assert row["channels_after"] == len(keep[row["group"]])
        assert row["keep_ratio"] == pytest.approx(row["channels_after"] / row["channels_before"])
        assert row["flops_after"] <= row["flops_before"]
    assert [p["status"] for p in report["passes"]][0] == "applied"
    assert report["dense"]["flops"] > report["final"]["flops"]
    assert len(report["attention_history"]) == 3
    assert set(report["final"]) >= {"accuracy", "recall", "f1", "latency_ms_b1"}


def test_on_train_end_without_probe_or_validation_data(digits):
    # magnitude needs no data, so the callback accepts neither probe nor validation
    # data; the end-of-training passes must still verify (e.g. on random inputs).
    callback = BalanceCallback(target=0.7, importance="magnitude", verbose=0)
    model = compile_classifier(build_digits_cnn(width=8, seed=0))
    _drive(callback, model, epochs=1)
    callback.on_train_end()
    assert callback.optimized_model is not None
    assert callback.report["final"]["flops"] < callback.report["dense"]["flops"]


def test_report_costs_are_those_of_the_dense_and_optimized_models(finalized):
    # The report takes them from the analysis and the last pass record, not new analyses.
    callback, optimized, report = finalized
    fresh = analyze(callback.finalize_inputs().dense_model).cost
    assert (report["dense"]["flops"], report["dense"]["params"]) == (fresh.flops, fresh.params)
    fresh = analyze(optimized).cost
    assert (report["final"]["flops"], report["final"]["params"]) == (fresh.flops, fresh.params)


def test_a_measurement_that_fails_costs_the_report_that_entry_only(digits, monkeypatch, caplog):
    """A SavedModel the report cannot write (here made to fail) leaves the optimized
    model, the other entries and fit's History: the entry is missing, the reason is in
    ``unmeasured``, and a WARNING says so (before: on_train_end raised)."""
    import tf_balancer.training.finalize as finalize

    def cannot_write(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(finalize, "saved_model_size", cannot_write)
    callback = BalanceCallback(
        target=0.7,
        importance="magnitude",
        validation_data=(digits.x_val[:50], digits.y_val[:50]),
        verbose=0,
    )
    model = compile_classifier(build_digits_cnn(width=8, seed=0))
    with caplog.at_level("WARNING", logger="tf_balancer"):
        history = model.fit(
            digits.x_train[:64], digits.y_train[:64], epochs=2, callbacks=[callback], verbose=0
        )
    assert history.history["loss"] and callback.optimized_model is not None
    for column in ("dense", "final"):
        summary = callback.report[column]
        assert "saved_model_bytes" not in summary and "accuracy" in summary
        assert summary["unmeasured"] == {"SavedModel size": "RuntimeError: disk full"}
    assert "SavedModel size not measured (RuntimeError: disk full)" in caplog.text
    assert "| accuracy" in summary_markdown(callback.report)

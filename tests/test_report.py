"""Tests of the report helpers: atomic export directories, tables, latency, size, plots."""

from __future__ import annotations

import glob
import os

import numpy as np
import pytest
import tensorflow as tf

from tf_balancer._compat import keras
from tf_balancer.errors import ExportError
from tf_balancer.export.writers import atomic_directory
from tf_balancer.metrics import macro_scores
from tf_balancer.report import (
    evaluate_model,
    log_layer_summaries,
    markdown_table,
    measure_latency,
    saved_model_size,
    write_report_png,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def classifier():
    keras.utils.set_random_seed(0)
    inp = keras.Input((6,))
    x = keras.layers.Dense(16, activation="relu")(inp)
    return keras.Model(inp, keras.layers.Dense(4)(x))


def test_atomic_directory_creates_the_directory_on_success(tmp_path):
    path = tmp_path / "nested" / "out"
    with atomic_directory(path) as tmp:
        assert not path.exists()  # nothing visible until the block succeeds
        with open(os.path.join(tmp, "a.txt"), "w") as handle:
            handle.write("a")
    assert (path / "a.txt").read_text() == "a"
    assert os.listdir(path.parent) == ["out"]


def test_atomic_directory_leaves_nothing_on_exception(tmp_path):
    path = tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_directory(path) as tmp:
            with open(os.path.join(tmp, "partial.txt"), "w") as handle:
                handle.write("half")
            raise RuntimeError("boom")
    assert not path.exists()
    assert os.listdir(tmp_path) == []


def test_atomic_directory_refuses_an_existing_path(tmp_path):
    path = tmp_path / "out"
    path.mkdir()
    (path / "mine.txt").write_text("keep me")
    with pytest.raises(ExportError, match="overwrite=True"):
        atomic_directory(path)
    with pytest.raises(FileExistsError):
        atomic_directory(str(path))
    assert os.listdir(path) == ["mine.txt"]
    assert (path / "mine.txt").read_text() == "keep me"


def test_atomic_directory_overwrite_replaces_the_directory(tmp_path):
    path = tmp_path / "out"
    path.mkdir()
    (path / "old.txt").write_text("old")
    with atomic_directory(path, overwrite=True) as tmp:
        with open(os.path.join(tmp, "new.txt"), "w") as handle:
            handle.write("new")
    assert os.listdir(path) == ["new.txt"]
    assert os.listdir(tmp_path) == ["out"]


def test_atomic_directory_overwrite_keeps_old_content_on_exception(tmp_path):
    path = tmp_path / "out"
    path.mkdir()
    (path / "old.txt").write_text("old")
    with pytest.raises(ValueError):
        with atomic_directory(path, overwrite=True) as tmp:
            with open(os.path.join(tmp, "new.txt"), "w") as handle:
                handle.write("new")
            raise ValueError("failed half way")
    assert os.listdir(path) == ["old.txt"]
    assert os.listdir(tmp_path) == ["out"]


def test_markdown_table_formats_rows():
    rows = [
        {"layer": "conv1", "flops": 1234567, "ratio": 0.123456},
        {"layer": "fc", "ratio": 1.0},
    ]
    table = markdown_table(rows, ("layer", "flops", "ratio"))
    lines = table.splitlines()
    assert lines[0] == "| layer | flops | ratio |"
    assert lines[1] == "|---|---|---|"
    assert lines[2] == "| conv1 | 1,234,567 | 0.1235 |"
    assert lines[3] == "| fc |  | 1 |"
    assert len(lines) == 4


def test_markdown_table_without_rows_is_only_the_header():
    assert markdown_table([], ("a", "b")).splitlines() == ["| a | b |", "|---|---|"]


def test_measure_latency_is_positive_milliseconds(classifier):
    ms = measure_latency(classifier, classifier.input_shape, batch_size=4, repeats=5)
    assert 0.0 < ms < 5000.0


def test_measure_latency_accepts_a_plain_callable():
    fn = tf.function(lambda x: tf.reduce_sum(x * 2.0, axis=-1))
    assert measure_latency(fn, (None, 8), batch_size=2, repeats=3) > 0.0


def test_saved_model_size_is_positive_and_gzip_is_smaller(classifier):
    sizes = saved_model_size(classifier)
    assert sizes["bytes"] > 0
    assert 0 < sizes["gzip_bytes"] < sizes["bytes"]


def test_saved_model_size_of_a_tf_module():
    module = tf.Module()
    module.w = tf.Variable(tf.zeros([64, 64]))
    module.f = tf.function(lambda x: x @ module.w, input_signature=[tf.TensorSpec([None, 64])])
    sizes = saved_model_size(module)
    assert sizes["bytes"] > 64 * 64 * 4
    assert 0 < sizes["gzip_bytes"] < sizes["bytes"]


@pytest.mark.parametrize("one_hot", [False, True])
def test_evaluate_model_equals_macro_scores_of_its_predictions(classifier, one_hot):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 6)).astype("float32")
    y = rng.integers(0, 4, size=300)
    labels = np.eye(4)[y] if one_hot else y
    summary = evaluate_model(classifier, x, labels, latency_batches=(1, 8))
    expected = macro_scores(y, classifier.predict(x, verbose=0).argmax(-1), 4)
    for key, value in expected.items():
        assert summary[key] == pytest.approx(value), key
    assert summary["latency_ms_b1"] > 0 and summary["latency_ms_b8"] > 0


def test_evaluate_model_thresholds_a_single_logit():
    keras.utils.set_random_seed(1)
    inp = keras.Input((3,))
    model = keras.Model(inp, keras.layers.Dense(1)(inp))
    x = np.random.default_rng(1).normal(size=(200, 3)).astype("float32")
    y = np.random.default_rng(2).integers(0, 2, size=200)
    summary = evaluate_model(model, x, y, latency_batches=())
    predicted = (model.predict(x, verbose=0).reshape(-1) > 0.0).astype(int)
    assert summary == pytest.approx(macro_scores(y, predicted, 2))


def test_write_report_png_writes_a_png(tmp_path):
    layers = [
        {
            "layer": "conv1",
            "attention": 0.4,
            "keep_ratio": 0.5,
            "flops_before": 100,
            "flops_after": 50,
        },
        {"layer": "fc", "attention": 0.6, "keep_ratio": 1.0, "flops_before": 10, "flops_after": 10},
    ]
    path = tmp_path / "report.png"
    write_report_png(str(path), layers, "title")
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > 1000


def _read_events(log_dir: str) -> dict[str, list[tuple[int, object]]]:
    found: dict[str, list[tuple[int, object]]] = {}
    for path in glob.glob(os.path.join(log_dir, "events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                found.setdefault(value.tag, []).append((event.step, value))
    return found


def test_log_layer_summaries_writes_scalars_and_histograms(tmp_path):
    writer = tf.summary.create_file_writer(str(tmp_path))
    values = {
        "balancer_attention": {"conv1": 0.25, "conv2": 0.75},
        "balancer_keep_ratio": {"conv1": 0.5, "conv2": 1.0},
    }
    log_layer_summaries(writer, 3, values)
    log_layer_summaries(writer, 4, {"balancer_attention": {}})
    writer.close()
    events = _read_events(str(tmp_path))
    for tag in (
        "balancer_attention/conv1",
        "balancer_attention/conv2",
        "balancer_keep_ratio/conv1",
        "balancer_attention/all_layers",
        "balancer_keep_ratio/all_layers",
    ):
        assert tag in events, sorted(events)
    (step, value) = events["balancer_attention/conv2"][0]
    assert step == 3
    assert float(tf.make_ndarray(value.tensor)) == pytest.approx(0.75)
    assert len(events["balancer_attention/all_layers"]) == 1  # nothing for an empty kind

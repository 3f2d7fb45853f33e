"""Tests of the report helpers: atomic export directories, tables, latency, size, plots."""

from __future__ import annotations

import glob
import os
import time

import numpy as np
import pytest
import tensorflow as tf

from tf_balancer._compat import keras
from tf_balancer.errors import ExportError
from tf_balancer.export import writers
from tf_balancer.export.writers import atomic_directory, current_umask
from tf_balancer.metrics import macro_scores
from tf_balancer.report import (
    evaluate_model,
    gzip_size,
    log_layer_summaries,
    markdown_table,
    measure_latency,
    regression_scores,
    saved_model_size,
    summary_markdown,
    task_scores,
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


@pytest.mark.parametrize("existing", ["file", "directory"])
def test_atomic_directory_replaces_what_stood_there_and_leaves_nothing_else(tmp_path, existing):
    path = tmp_path / "out"
    if existing == "file":
        path.write_text("old")
    else:
        path.mkdir()
        (path / "old.txt").write_text("old")
    with atomic_directory(path, overwrite=True) as tmp:
        with open(os.path.join(tmp, "new.txt"), "w") as handle:
            handle.write("new")
    assert os.listdir(path) == ["new.txt"]
    assert os.listdir(tmp_path) == ["out"]


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


def test_atomic_directory_names_an_unusable_parent_in_an_export_error(tmp_path):
    """A path under a file (or a read-only directory: the same OSError, which root,
    running CI, does not get) raised the OS error of the temp directory next to it (a
    traceback from the CLI, exit code 1, naming '.out.tmp-xxxx'); it is an ExportError
    naming the path (CLI: one line, exit 2)."""
    (tmp_path / "a_file").write_text("")
    path = tmp_path / "a_file" / "out"
    with pytest.raises(ExportError, match=f"cannot write {path}"):
        with atomic_directory(path):
            pass


@pytest.mark.parametrize("target", [".", ".."])
def test_atomic_directory_refuses_to_overwrite_the_working_directory(tmp_path, target, monkeypatch):
    """cb.export(".", overwrite=True) replaced the working directory with the export,
    deleting every file of the user's project in it."""
    work = tmp_path / "project"
    work.mkdir()
    (work / "data.csv").write_text("mine")
    monkeypatch.chdir(work)
    with pytest.raises(ExportError, match="working directory"):
        atomic_directory(target, overwrite=True)
    assert (work / "data.csv").read_text() == "mine"


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


@pytest.fixture
def umask():
    """Set the process umask for one test; restored afterwards."""
    saved = os.umask(0o022)
    os.umask(saved)
    yield os.umask
    os.umask(saved)


@pytest.mark.parametrize(
    ("mask", "mode"),
    [(0o022, 0o755), (0o027, 0o750), (0o077, 0o700)],
    ids=["umask022", "umask027", "umask077"],
)
def test_atomic_directory_result_has_the_mode_of_a_normal_mkdir(tmp_path, umask, mask, mode):
    umask(mask)
    path = tmp_path / "out"
    with atomic_directory(path) as tmp:
        (tmp_path / "plain").mkdir()  # what os.makedirs gives under this umask
        with open(os.path.join(tmp, "a.txt"), "w") as handle:
            handle.write("a")
    assert oct(path.stat().st_mode & 0o777) == oct(mode)
    assert oct((tmp_path / "plain").stat().st_mode & 0o777) == oct(mode)


def test_atomic_directory_overwrite_result_follows_the_umask(tmp_path, umask):
    umask(0o022)
    path = tmp_path / "out"
    path.mkdir(mode=0o700)
    with atomic_directory(path, overwrite=True):
        pass
    assert oct(path.stat().st_mode & 0o777) == oct(0o755)


@pytest.mark.parametrize("proc", [True, False])
def test_current_umask_reads_the_umask_and_leaves_it_unchanged(umask, monkeypatch, proc):
    if not proc:  # no /proc (macOS): the set-and-restore fallback

        def no_proc(*args, **kwargs):
            raise OSError("no /proc")

        monkeypatch.setattr(writers, "open", no_proc, raising=False)
    umask(0o027)
    assert current_umask() == 0o027
    assert os.umask(0o027) == 0o027


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


def test_gzip_size_in_members_is_the_size_of_one_gzip_stream_within_bytes_per_member(tmp_path):
    """Compressed in 64 KB members on several threads, the size stays that of the
    files gzipped whole within a few hundred bytes per member (each member only
    forgets deflate's 32 KB window; at the default 4 MB members, < 0.01%)."""
    import gzip

    rng = np.random.default_rng(0)
    weights = rng.normal(size=200_000).astype(np.float32)
    weights[rng.random(weights.size) < 0.8] = 0.0  # compressible, like sparse weights
    (tmp_path / "variables").mkdir()
    (tmp_path / "variables" / "data").write_bytes(weights.tobytes())
    (tmp_path / "saved_model.pb").write_bytes(b"graph " * 5000)
    whole = sum(
        len(gzip.compress(f.read_bytes(), compresslevel=6, mtime=0))
        for f in tmp_path.rglob("*")
        if f.is_file()
    )
    chunked = gzip_size(str(tmp_path), chunk=64 << 10)
    members = -(-len(weights.tobytes()) // (64 << 10)) + 1
    assert members >= 10
    assert abs(chunked - whole) <= 200 * members
    assert gzip_size(str(tmp_path), chunk=1 << 30) == whole  # one member per file: equal


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


@pytest.fixture(scope="module")
def regressor():
    keras.utils.set_random_seed(2)
    inp = keras.Input((3,))
    model = keras.Model(inp, keras.layers.Dense(1)(inp))
    model.compile(optimizer="adam", loss="mse")
    return model


@pytest.mark.parametrize("target_shape", [(200,), (200, 1)])
def test_regression_scores_are_numpy_mae_and_rmse(regressor, target_shape):
    x = np.random.default_rng(3).normal(size=(200, 3)).astype("float32")
    y = np.random.default_rng(4).normal(size=200) * 5.0
    error = regressor.predict(x, verbose=0).reshape(-1).astype("float64") - y
    scores = regression_scores(regressor, x, y.reshape(target_shape))
    assert scores == pytest.approx(
        {"mae": np.abs(error).mean(), "rmse": np.sqrt((error**2).mean())}, rel=1e-6
    )


def test_evaluate_model_of_a_regression_model_has_mae_and_rmse(regressor):
    x = np.random.default_rng(3).normal(size=(50, 3)).astype("float32")
    y = np.arange(50, dtype="float32")  # outside any class range: no class-id check
    summary = evaluate_model(regressor, x, y, latency_batches=())
    assert summary == pytest.approx(regression_scores(regressor, x, y))


def test_task_scores_follow_the_compiled_loss_or_the_classifier_argument(classifier, regressor):
    x = np.random.default_rng(3).normal(size=(40, 3)).astype("float32")
    assert set(task_scores(regressor, x, np.zeros(40))) == {"mae", "rmse"}
    assert set(task_scores(regressor, x, np.zeros(40), classifier=True)) >= {"accuracy", "f1"}
    x6 = np.random.default_rng(3).normal(size=(40, 6)).astype("float32")
    y = np.arange(40) % 4
    assert set(task_scores(classifier, x6, y)) >= {"accuracy", "f1"}  # not compiled: classifier
    assert set(task_scores(classifier, x6, np.eye(4)[y], classifier=False)) == {"mae", "rmse"}
    with pytest.raises(ValueError, match=r"targets of shape \(40,\) do not match.*\(40, 4\)"):
        task_scores(classifier, x6, y, classifier=False)


def test_summary_markdown_has_mae_and_rmse_rows_for_regression():
    report = {
        "dense": {"mae": 0.5, "rmse": 0.8, "flops": 100},
        "final": {"mae": 0.6, "rmse": 0.9, "flops": 50},
    }
    table = summary_markdown(report)
    assert "| MAE | 0.5 | 0.6 | 1.200x |" in table
    assert "| RMSE | 0.8 | 0.9 | 1.125x |" in table
    assert "accuracy" not in table


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


def test_measure_latency_stops_timing_after_its_budget_but_not_before_three_calls():
    calls = []

    def slow(x):
        calls.append(1)
        time.sleep(0.06)
        return x

    ms = measure_latency(slow, (None, 2), batch_size=1, repeats=20, budget_s=0.1)
    assert len(calls) == 3 + 3  # trace and warm-up, then the minimum of 3 timed calls
    assert ms >= 60.0
    calls.clear()
    measure_latency(slow, (None, 2), batch_size=1, repeats=8, budget_s=None)
    assert len(calls) == 3 + 8

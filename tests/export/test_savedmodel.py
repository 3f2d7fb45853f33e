"""``optimize_saved_model``: Keras and plain SavedModels, every recipe, and bad input."""

from __future__ import annotations

import glob
import hashlib
import json
import os

import numpy as np
import pytest
import tensorflow as tf
from conftest import randomize_batchnorm

from tf_balancer._compat import keras
from tf_balancer.config import OptimizeConfig, VerifyConfig
from tf_balancer.errors import ConfigError, ExportError, ModelLoadError, VerificationError
from tf_balancer.export.graph_path import graph_stats
from tf_balancer.export.savedmodel import REPORT_NAME, optimize_saved_model
from tf_balancer.graph.trace import trace

_BN_OPS = ("FusedBatchNorm", "FusedBatchNormV2", "FusedBatchNormV3")
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_CONFIGS = sorted(glob.glob(os.path.join(_ROOT, "configs", "*.yaml")))


def tree_hash(path: str) -> str:
    """SHA-256 over every file's relative path and content under ``path``."""
    digest = hashlib.sha256()
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(root, name)
            digest.update(os.path.relpath(full, path).encode())
            with open(full, "rb") as handle:
                digest.update(handle.read())
    return digest.hexdigest()


def small_cnn() -> keras.Model:
    """Conv-BN-ReLU x2, pooling, dropout and a 4-class logits head (random BN statistics)."""
    keras.utils.set_random_seed(0)
    inp = keras.Input((12, 12, 3), name="image")
    x = inp
    for i in (1, 2):
        x = keras.layers.Conv2D(16, 3, padding="same", name=f"conv{i}")(x)
        x = keras.layers.BatchNormalization(name=f"bn{i}")(x)
        x = keras.layers.ReLU(name=f"relu{i}")(x)
    x = keras.layers.Dropout(0.2, name="drop")(keras.layers.GlobalAveragePooling2D(name="gap")(x))
    return randomize_batchnorm(keras.Model(inp, keras.layers.Dense(4, name="logits")(x)))


class ConvBN(tf.Module):
    """A plain module: Conv2D + BiasAdd + FusedBatchNormV3 (random statistics) + ReLU."""

    def __init__(self, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.kernel = tf.Variable(rng.normal(0, 0.3, (3, 3, 3, 8)).astype("float32"))
        self.bias = tf.Variable(rng.normal(0, 0.2, 8).astype("float32"))
        self.gamma = tf.Variable(rng.uniform(0.5, 1.5, 8).astype("float32"))
        self.beta = tf.Variable(rng.normal(0, 0.2, 8).astype("float32"))
        self.mean = tf.Variable(rng.normal(0, 0.2, 8).astype("float32"))
        self.variance = tf.Variable(rng.uniform(0.5, 2.0, 8).astype("float32"))

    @tf.function(input_signature=[tf.TensorSpec([None, 16, 16, 3], tf.float32, name="images")])
    def __call__(self, images):
        y = tf.nn.bias_add(tf.nn.conv2d(images, self.kernel, 1, "SAME"), self.bias)
        y, *_ = tf.raw_ops.FusedBatchNormV3(
            x=y,
            scale=self.gamma,
            offset=self.beta,
            mean=self.mean,
            variance=self.variance,
            epsilon=1e-3,
            is_training=False,
        )
        y = tf.nn.relu(y)
        return {"features": y, "pooled": tf.reduce_mean(y, [1, 2])}


@pytest.fixture(scope="module")
def mobilenet(tmp_path_factory) -> tuple[str, np.ndarray, np.ndarray]:
    """MobileNetV2 (logits, random BN) saved by tf_keras; a batch and the model's outputs on it."""
    keras.utils.set_random_seed(0)
    model = keras.applications.MobileNetV2(
        alpha=0.35, input_shape=(96, 96, 3), weights=None, classifier_activation=None
    )
    path = str(tmp_path_factory.mktemp("mobilenet") / "src")
    randomize_batchnorm(model).save(path)
    x = np.random.default_rng(1).random((3, 96, 96, 3), dtype=np.float32)
    return path, x, model(x, training=False).numpy()


@pytest.fixture(scope="module")
def plain_dir(tmp_path_factory) -> str:
    module = ConvBN()
    path = str(tmp_path_factory.mktemp("plain") / "src")
    signature = module.__call__.get_concrete_function()
    tf.saved_model.save(module, path, signatures={"serving_default": signature, "other": signature})
    return path


@pytest.fixture(scope="module")
def cnn_dir(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("cnn") / "src")
    small_cnn().save(path)
    return path


@pytest.fixture(scope="module")
def calibration() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.random((32, 12, 12, 3), dtype=np.float32), rng.integers(0, 4, 32)


def structure(signature) -> tuple:
    specs = lambda d: {k: (s.dtype, tuple(s.shape)) for k, s in d.items()}  # noqa: E731
    return specs(signature.structured_input_signature[1]), specs(signature.structured_outputs)


def assert_same_signatures_and_outputs(src: str, dst: str, feed: dict, atol: float) -> None:
    source, output = tf.saved_model.load(src), tf.saved_model.load(dst)
    assert sorted(output.signatures) == sorted(source.signatures)
    for name, signature in source.signatures.items():
        assert structure(output.signatures[name]) == structure(signature)
        expected, actual = signature(**feed), output.signatures[name](**feed)
        for key, value in expected.items():
            np.testing.assert_allclose(actual[key].numpy(), value.numpy(), rtol=1e-4, atol=atol)


def test_keras_mobilenet_lossless_keeps_signatures_and_removes_batch_norms(mobilenet, tmp_path):
    src, x, expected = mobilenet
    before = tree_hash(src)
    dst = str(tmp_path / "out")
    report = optimize_saved_model(src, dst, os.path.join(_ROOT, "configs/lossless.yaml"))
    serving = tf.saved_model.load(dst).signatures["serving_default"]
    # Keras numbers auto-named inputs per process (input_1, input_49, ...): read the source's.
    source = tf.saved_model.load(src).signatures["serving_default"]
    (input_key,) = list(source.structured_input_signature[1])
    assert list(serving.structured_input_signature[1]) == [input_key]
    assert list(serving.structured_outputs) == ["predictions"]
    assert report["signatures"]["serving_default"] == [
        {input_key: ["float32", [None, 96, 96, 3]]},
        {"predictions": ["float32", [None, 1000]]},
    ]
    actual = serving(**{input_key: tf.constant(x)})["predictions"].numpy()
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-4)
    ops = trace(dst).op_types()
    assert not any(op in ops for op in _BN_OPS), ops
    assert report["kind"] == "keras"
    assert [r["name"] for r in report["passes"]][-1] == "grappler"
    assert report["before"]["ops"]["FusedBatchNormV3"] == 52
    assert "FusedBatchNormV3" not in report["after"]["ops"]
    assert report["after"]["bytes"] < report["before"]["bytes"]
    assert report["verification"]["signatures"]["serving_default"]["max_abs_diff"] < 1e-4
    with open(os.path.join(dst, REPORT_NAME), encoding="utf-8") as handle:
        assert json.load(handle) == report
    assert tree_hash(src) == before


def test_plain_module_folds_batch_norm_in_every_signature(plain_dir, tmp_path):
    before = tree_hash(plain_dir)
    dst = str(tmp_path / "out")
    report = optimize_saved_model(plain_dir, dst)
    feed = {"images": tf.random.stateless_uniform([2, 16, 16, 3], seed=(3, 4))}
    assert_same_signatures_and_outputs(plain_dir, dst, feed, atol=1e-5)
    loaded = tf.saved_model.load(dst)
    for name in ("serving_default", "other"):
        ops = trace(loaded.signatures[name]).op_types()
        assert not any(op in ops for op in _BN_OPS), ops
    assert report["kind"] == "plain"
    assert {(r["name"], r["signature"], r["status"]) for r in report["passes"]} == {
        (p, s, "applied")
        for p in ("fold_batchnorm", "grappler")
        for s in ("serving_default", "other")
    }
    assert any("fuse_activation" in note for note in report["notes"])
    assert report["after"]["params"] < report["before"]["params"]
    assert tree_hash(plain_dir) == before


@pytest.mark.parametrize("config", _CONFIGS, ids=os.path.basename)
def test_every_recipe_runs_on_a_keras_saved_model(config, cnn_dir, calibration, tmp_path):
    dst = str(tmp_path / "out")
    report = optimize_saved_model(cnn_dir, dst, config, calibration_data=calibration)
    loaded = tf.saved_model.load(dst)
    source = tf.saved_model.load(cnn_dir)
    assert structure(loaded.signatures["serving_default"]) == structure(
        source.signatures["serving_default"]
    )
    out = loaded.signatures["serving_default"](image=tf.constant(calibration[0][:3]))
    assert out["logits"].shape == (3, 4)
    statuses = {r["name"]: r["status"] for r in report["passes"]}
    assert "rolled_back" not in statuses.values(), report["passes"]
    if "prune_channels" in statuses:
        assert report["after"]["flops"] < 0.6 * report["before"]["flops"]
        assert report["verification"]["reference"] == "model after prune_channels"
    assert os.path.isfile(os.path.join(dst, REPORT_NAME))


def test_calibration_npz_without_labels_falls_back_to_magnitude(cnn_dir, calibration, tmp_path):
    npz = str(tmp_path / "calib.npz")
    np.savez(npz, x=calibration[0].astype(np.float64))
    config = os.path.join(_ROOT, "configs/structured_50_flops.yaml")
    report = optimize_saved_model(cnn_dir, str(tmp_path / "out"), config, calibration_data=npz)
    assert report["verification"]["signatures"]["serving_default"]["inputs"] == "calibration"
    assert any("used magnitude instead" in note for note in report["notes"]), report["notes"]
    assert report["after"]["flops"] < report["before"]["flops"]


def _write(path, text: str) -> str:
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(
    "case",
    [
        "missing_src",
        "corrupt_src",
        "dst_is_src",
        "dst_in_src",
        "src_in_dst",
        "dst_exists",
        "unknown_pass",
        "pruning_without_calibration",
        "pruning_a_plain_savedmodel",
        "verification_fails",
    ],
)
def test_bad_input_raises_typed_error_and_writes_nothing(case, cnn_dir, plain_dir, tmp_path):
    src, dst, kwargs = cnn_dir, str(tmp_path / "out"), {}
    error = {"missing_src": ModelLoadError, "corrupt_src": ModelLoadError}.get(case, ExportError)
    if case == "missing_src":
        src = str(tmp_path / "nothing")
    elif case == "corrupt_src":
        src = str(tmp_path / "corrupt")
        os.makedirs(src)
        (tmp_path / "corrupt" / "saved_model.pb").write_bytes(b"\x07garbage, not a protobuf")
    elif case == "dst_is_src":
        dst = src
    elif case == "dst_in_src":
        dst = os.path.join(src, "variables", "out")
    elif case == "src_in_dst":
        dst = os.path.dirname(src)
        kwargs["overwrite"] = True
    elif case == "dst_exists":
        os.makedirs(dst)
        (tmp_path / "out" / "keep.txt").write_text("mine")
    elif case == "unknown_pass":
        error = ConfigError
        kwargs["config"] = _write(tmp_path / "bad.yaml", "passes: [fold_batchnorm, no_such_pass]\n")
    elif case == "pruning_without_calibration":
        error = ConfigError
        kwargs["config"] = os.path.join(_ROOT, "configs/sparse_80.yaml")
    elif case == "pruning_a_plain_savedmodel":  # no Keras layers: it would prune nothing
        src, error = plain_dir, ConfigError
        kwargs["config"] = os.path.join(_ROOT, "configs/structured_50_flops.yaml")
        kwargs["calibration_data"] = np.zeros((4, 16, 16, 3), np.float32)
    elif case == "verification_fails":
        src, error = plain_dir, VerificationError
        kwargs["config"] = OptimizeConfig(verify=VerifyConfig(rtol=0.0, atol=0.0))
    before = tree_hash(src) if os.path.isdir(src) else None
    listing = sorted(os.listdir(tmp_path))
    dst_before = tree_hash(dst) if os.path.isdir(dst) else None
    with pytest.raises(error) as info:
        optimize_saved_model(src, dst, **kwargs)
    assert "\n" not in str(info.value)
    if case == "pruning_without_calibration":
        assert "calibration" in str(info.value)
    assert sorted(os.listdir(tmp_path)) == listing  # no output, no temporary directory
    assert (tree_hash(dst) if os.path.isdir(dst) else None) == dst_before
    if before is not None:
        assert tree_hash(src) == before


def test_cli_result_of_a_keras_savedmodel_loads_with_keras_like_its_source(tmp_path):
    """`tf_keras.models.save_model` source -> `tf-balancer optimize` -> `load_model` works."""
    import subprocess
    import sys

    from tf_balancer.demo import build_digits_cnn

    src, dst = str(tmp_path / "src"), str(tmp_path / "dst")
    model = randomize_batchnorm(build_digits_cnn(width=8, seed=0))
    keras.models.save_model(model, src)
    cli = os.path.join(os.path.dirname(sys.executable), "tf-balancer")
    done = subprocess.run([cli, "optimize", src, "--output", dst], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    x = np.random.default_rng(0).random((4, 16, 16, 1), dtype=np.float32)
    expected = model.predict(x, verbose=0)
    reloaded = keras.models.load_model(dst)
    assert not any(type(layer).__name__ == "BatchNormalization" for layer in reloaded.layers)
    np.testing.assert_allclose(reloaded.predict(x, verbose=0), expected, rtol=1e-4, atol=1e-5)
    serve = tf.saved_model.load(dst).signatures["serving_default"]
    (served,) = serve(tf.constant(x)).values()
    np.testing.assert_allclose(served.numpy(), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("heads", [1, 2])
def test_a_keras3_export_keeps_its_serve_endpoint(tmp_path, heads):
    """``model.export`` writes a ``serve`` endpoint (positional tensor in, the model's
    outputs out) besides the signatures; the optimized SavedModel keeps it."""
    import keras as keras3

    keras3.utils.set_random_seed(0)
    inp = keras3.Input((8, 8, 3))
    x = keras3.layers.Conv2D(8, 3)(inp)
    x = keras3.layers.GlobalAveragePooling2D()(keras3.layers.ReLU()(x))
    outputs = [keras3.layers.Dense(4)(x), keras3.layers.Dense(1)(x)][:heads]
    model = keras3.Model(inp, outputs if heads > 1 else outputs[0])
    src, dst = str(tmp_path / "src"), str(tmp_path / "dst")
    model.export(src)
    report = optimize_saved_model(src, dst)
    assert any("endpoint serve" in note for note in report["notes"])
    source, result = tf.saved_model.load(src), tf.saved_model.load(dst)
    x = np.random.default_rng(0).random((3, 8, 8, 3), dtype=np.float32)
    expected, got = source.serve(x), result.serve(x)
    assert tf.nest.map_structure(lambda t: t.shape, got) == tf.nest.map_structure(
        lambda t: t.shape, expected
    )
    for a, b in zip(tf.nest.flatten(expected), tf.nest.flatten(got), strict=True):
        np.testing.assert_allclose(b.numpy(), a.numpy(), atol=1e-5)


def test_a_mixed_float16_savedmodel_is_verified_at_float16_tolerances(tmp_path):
    """Folding BatchNorm in float16 moves outputs by ~1e-3: beyond float32's rtol 1e-4,
    within float16's rounding; ``optimize`` reads the compute dtype from the graph."""
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        keras.utils.set_random_seed(0)
        inp = keras.Input((16, 16, 3))
        x = inp
        for width in (16, 32):
            x = keras.layers.Conv2D(width, 3, padding="same")(x)
            x = keras.layers.ReLU()(keras.layers.BatchNormalization()(x))
        x = keras.layers.GlobalAveragePooling2D()(x)
        model = randomize_batchnorm(keras.Model(inp, keras.layers.Dense(10, dtype="float32")(x)))
    finally:
        keras.mixed_precision.set_global_policy("float32")
    src, dst = str(tmp_path / "src"), str(tmp_path / "dst")
    model.save(src, save_format="tf")
    report = optimize_saved_model(src, dst)
    checked = report["verification"]["signatures"]["serving_default"]
    assert checked["compute_dtype"] == "float16"
    assert 1e-4 < checked["max_rel_diff"] and checked["max_abs_diff"] < 1e-2
    assert {p["name"]: p["status"] for p in report["passes"]}["fold_batchnorm"] == "applied"


def test_a_recurrent_graph_says_its_flops_are_not_all_counted(tmp_path):
    """TF's profiler counts 0 inside a while loop and for outputs of unknown shape, so a
    plain SavedModel of an LSTM over tokens of any length read "FLOPs: 0 -> 0". The
    summary now says what it could not count; inspect takes the length of the tokens."""
    import keras as keras3

    from tf_balancer.analysis import inspect
    from tf_balancer.export.savedmodel import format_summary

    inp = keras3.Input((None,), dtype="int32")
    x = keras3.layers.LSTM(8)(keras3.layers.Embedding(20, 4)(inp))
    model = keras3.Model(inp, keras3.layers.Dense(3)(x))
    path = str(tmp_path / "lstm")
    model.export(path, verbose=False)
    assert inspect(path, input_shape=(12,)).total_params == model.count_params()
    report = optimize_saved_model(path, str(tmp_path / "out"), input_shape=(12,))
    assert (
        "loop" in report["before"]["flops_hidden"]
        or "unknown shape" in report["before"]["flops_hidden"]
    )
    assert "; not all counted: " in format_summary(report)


def test_a_plain_conv_graph_counts_all_its_flops(plain_dir):
    loaded = tf.saved_model.load(plain_dir)  # kept: its signatures read its variables
    stats = graph_stats(loaded.signatures["serving_default"])
    assert stats["flops"] > 0 and stats["flops_hidden"] == ""

"""``tf-balancer optimize``: the installed console script, run in subprocesses.

Every invocation is started once, concurrently, by the module-scoped ``runs``
fixture (each process spends seconds importing TensorFlow); the tests then
check one invocation each.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tensorflow as tf
from test_savedmodel import ConvBN, small_cnn, tree_hash

_SCRIPT = os.path.join(os.path.dirname(sys.executable), "tf-balancer")
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# TensorFlow's C++ runtime logs a few lines before absl logging starts; not the CLI's output.
_NATIVE_LOG = re.compile(r"^(WARNING: All log messages before absl::InitializeLog|[IWEF]\d{4} )")
_BAD_INPUT = (
    "missing_src",
    "corrupt_src",
    "dst_is_src",
    "dst_in_src",
    "dst_exists",
    "unknown_pass",
    "config_not_utf8",
    "pruning_without_calibration",
    "no_output_flag",
    "quantize_without_tflite",
    "int8_without_calibration",
    "calibration_label_count",
)


def _workspace(root: str) -> dict[str, str]:
    paths = {name: os.path.join(root, name) for name in ("cnn", "plain", "corrupt", "existing")}
    small_cnn().save(paths["cnn"])
    module = ConvBN()
    tf.saved_model.save(module, paths["plain"], signatures=module.__call__.get_concrete_function())
    os.makedirs(paths["corrupt"])
    with open(os.path.join(paths["corrupt"], "saved_model.pb"), "wb") as handle:
        handle.write(b"\x07garbage, not a protobuf")
    os.makedirs(paths["existing"])
    with open(os.path.join(paths["existing"], "keep.txt"), "w") as handle:
        handle.write("mine")
    rng = np.random.default_rng(0)
    paths["calib"] = os.path.join(root, "calib.npz")
    np.savez(paths["calib"], x=rng.random((32, 12, 12, 3)), y=rng.integers(0, 4, 32))
    paths["calib_badlen"] = os.path.join(root, "calib_badlen.npz")  # 5 labels for 32 samples
    np.savez(paths["calib_badlen"], x=rng.random((32, 12, 12, 3)), y=rng.integers(0, 4, 5))
    paths["tflite"] = os.path.join(root, "tflite")  # outputs of the --tflite runs
    os.makedirs(paths["tflite"])
    paths["inputs"] = os.path.join(root, "inputs.npz")  # no labels: int8 checked by difference
    np.savez(paths["inputs"], x=rng.random((64, 12, 12, 3)).astype("float32"))
    paths["bad_yaml"] = os.path.join(root, "bad.yaml")
    with open(paths["bad_yaml"], "w") as handle:
        handle.write("passes: [fold_batchnorm, no_such_pass]\n")
    paths["latin1_yaml"] = os.path.join(root, "latin1.yaml")
    with open(paths["latin1_yaml"], "wb") as handle:
        handle.write("# réglage\npasses: [fold_batchnorm]\n".encode("latin-1"))
    paths["strict_yaml"] = os.path.join(root, "strict.yaml")
    with open(paths["strict_yaml"], "w") as handle:
        handle.write("passes: [fold_batchnorm]\nverify: {rtol: 0.0, atol: 0.0}\n")
    return paths


def _commands(p: dict[str, str], root: str) -> dict[str, tuple[str, ...]]:
    structured = os.path.join(_ROOT, "configs", "structured_50_flops.yaml")
    out = os.path.join(root, "out")
    return {
        "help": ("optimize", "--help"),
        "success": (
            *("optimize", p["cnn"], f"--output={p['existing']}", f"--config={structured}"),
            *(f"--calibration={p['calib']}", "--overwrite"),
        ),
        "verification_fails": (
            "optimize",
            p["plain"],
            f"--output={out}_strict",
            "--config",
            p["strict_yaml"],
        ),
        "missing_src": ("optimize", os.path.join(root, "nothing"), f"--output={out}_1"),
        "corrupt_src": ("optimize", p["corrupt"], f"--output={out}_2"),
        "dst_is_src": ("optimize", p["cnn"], f"--output={p['cnn']}"),
        "dst_in_src": ("optimize", p["cnn"], f"--output={p['cnn']}/variables/out"),
        "dst_exists": ("optimize", p["plain"], f"--output={p['corrupt']}"),
        "unknown_pass": ("optimize", p["cnn"], f"--output={out}_3", f"--config={p['bad_yaml']}"),
        "config_not_utf8": (
            *("optimize", p["cnn"], f"--output={out}_5", "--config", p["latin1_yaml"]),
        ),
        "pruning_without_calibration": (
            *("optimize", p["cnn"], f"--output={out}_4", f"--config={structured}"),
        ),
        "no_output_flag": ("optimize", p["cnn"]),
        "calibration_label_count": (
            *("optimize", p["cnn"], f"--output={out}_8", f"--config={structured}"),
            f"--calibration={p['calib_badlen']}",
        ),
        "tflite_int8": (
            *("optimize", p["cnn"], f"--output={p['tflite']}/int8", "--tflite", "--quantize=int8"),
            f"--calibration={p['inputs']}",
        ),
        "tflite_plain": ("optimize", p["plain"], f"--output={p['tflite']}/plain", "--tflite"),
        "quantize_without_tflite": (
            *("optimize", p["cnn"], f"--output={out}_6", "--quantize=dynamic"),
        ),
        "int8_without_calibration": (
            *("optimize", p["cnn"], f"--output={out}_7", "--tflite", "--quantize=int8"),
        ),
    }


def _run(args: tuple[str, ...]) -> subprocess.CompletedProcess:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    return subprocess.run(
        [_SCRIPT, *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
        umask=0o022,  # the usual login umask, whatever pytest's is
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Workspace paths, hashes of the inputs before, and every command's finished process."""
    root = str(tmp_path_factory.mktemp("cli_optimize"))
    paths = _workspace(root)
    hashes = {name: tree_hash(paths[name]) for name in ("cnn", "plain", "corrupt")}
    listing = set(os.listdir(root))
    commands = _commands(paths, root)
    with ThreadPoolExecutor(max_workers=3) as pool:
        procs = dict(zip(commands, pool.map(_run, commands.values()), strict=True))
    return {"root": root, "paths": paths, "hashes": hashes, "listing": listing, "procs": procs}


def _messages(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip() and not _NATIVE_LOG.match(line)]


def test_optimize_help_mentions_its_flags(runs):
    proc = runs["procs"]["help"]
    assert proc.returncode == 0, proc.stderr
    for flag in ("--config", "--output", "--calibration", "--overwrite"):
        assert flag in proc.stdout


def test_optimize_writes_a_loadable_saved_model_and_prints_a_summary(runs):
    proc, paths = runs["procs"]["success"], runs["paths"]
    assert proc.returncode == 0, proc.stderr
    for word in ("size:", "FLOPs:", "ops:", "prune_channels", "verified serving_default"):
        assert word in proc.stdout
    out = paths["existing"]  # replaced thanks to --overwrite
    assert not os.path.exists(os.path.join(out, "keep.txt"))
    assert os.path.isfile(os.path.join(out, "tf_balancer_report.json"))
    serving = tf.saved_model.load(out).signatures["serving_default"]
    logits = serving(image=tf.zeros([2, 12, 12, 3]))["logits"]
    assert logits.shape == (2, 4)


def test_optimize_output_gets_normal_permissions_under_umask_022(runs):
    proc, out = runs["procs"]["success"], runs["paths"]["existing"]
    assert proc.returncode == 0, proc.stderr
    assert oct(os.stat(out).st_mode & 0o777) == oct(0o755)  # readable by TF Serving's user
    for name in ("saved_model.pb", "tf_balancer_report.json"):
        assert oct(os.stat(os.path.join(out, name)).st_mode & 0o777) == oct(0o644), name


def test_failed_verification_exits_1_and_writes_nothing(runs):
    proc = runs["procs"]["verification_fails"]
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = _messages(proc.stderr)  # TensorFlow logs while the optimization runs
    failures = [line for line in lines if line.startswith("tf-balancer: failed: ")]
    assert failures == lines[-1:] and "differs by up to" in lines[-1], lines
    assert not os.path.exists(os.path.join(runs["root"], "out_strict"))


@pytest.mark.parametrize("case", ["tflite_int8", "tflite_plain"])
def test_tflite_lands_next_to_the_savedmodel_verified(runs, case):
    proc = runs["procs"][case]
    assert proc.returncode == 0, proc.stderr
    out = os.path.join(runs["paths"]["tflite"], "int8" if case == "tflite_int8" else "plain")
    lite = os.path.join(out, "model.tflite")
    with open(os.path.join(out, "tf_balancer_report.json"), encoding="utf-8") as handle:
        report = json.load(handle)["tflite"]
    assert report["bytes"] == os.path.getsize(lite)
    assert report["quantize"] == ("int8" if case == "tflite_int8" else None)
    assert report["samples"] == (64 if case == "tflite_int8" else 8)
    if case == "tflite_plain":
        assert report["max_abs_diff"] <= 1e-4
    assert f"tflite model.tflite ({report['quantize'] or 'float32'})" in proc.stdout
    interpreter = tf.lite.Interpreter(model_path=lite)
    interpreter.allocate_tensors()
    assert interpreter.get_input_details()[0]["dtype"] == np.float32


@pytest.mark.parametrize("case", _BAD_INPUT)
def test_bad_input_exits_2_with_one_line_and_writes_nothing(runs, case):
    proc = runs["procs"][case]
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = _messages(proc.stderr)
    assert len(lines) == 1 and lines[0].startswith("tf-balancer: error: "), lines
    if case in ("pruning_without_calibration", "int8_without_calibration"):
        assert "--calibration" in lines[0]
    if case == "quantize_without_tflite":
        assert "--tflite" in lines[0]
    if case == "calibration_label_count":
        assert "one label per sample" in lines[0]
    if case == "config_not_utf8":
        assert runs["paths"]["latin1_yaml"] in lines[0] and "save the file as UTF-8" in lines[0]
    assert set(os.listdir(runs["root"])) == runs["listing"]  # no output, no temporary directory
    assert not os.path.exists(os.path.join(runs["paths"]["cnn"], "variables", "out"))
    for name, digest in runs["hashes"].items():
        assert tree_hash(runs["paths"][name]) == digest, name

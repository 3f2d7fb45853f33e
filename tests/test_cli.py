"""End-to-end tests of the installed ``tf-balancer`` console script (run in a subprocess)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tf_balancer._compat import keras
from tf_balancer.analysis import inspect

_SCRIPT = Path(sys.executable).parent / "tf-balancer"
_LAYERS = ("conv", "bn", "relu", "flatten", "head")
# TensorFlow's C++ runtime logs a few lines before absl logging is initialised,
# whatever TF_CPP_MIN_LOG_LEVEL says; they are not the CLI's output.
_NATIVE_LOG = re.compile(r"^(WARNING: All log messages before absl::InitializeLog|[IWEF]\d{4} )")


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    return subprocess.run(
        [str(_SCRIPT), *args], capture_output=True, text=True, env=env, timeout=300, check=False
    )


def _messages(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip() and not _NATIVE_LOG.match(line)]


def _assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = _messages(proc.stderr)
    assert len(lines) == 1, lines
    assert lines[0].startswith("tf-balancer: error: ")
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.fixture(scope="module")
def saved_model_dir(tmp_path_factory) -> str:
    """A tiny tf_keras model saved once as a SavedModel directory."""
    keras.utils.set_random_seed(0)
    inp = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, name="conv")(inp)
    x = keras.layers.ReLU(name="relu")(keras.layers.BatchNormalization(name="bn")(x))
    out = keras.layers.Dense(2, name="head")(keras.layers.Flatten(name="flatten")(x))
    path = str(tmp_path_factory.mktemp("cli") / "tiny")
    keras.Model(inp, out).save(path)
    return path


def test_console_script_is_installed():
    assert _SCRIPT.is_file() and os.access(_SCRIPT, os.X_OK)


def test_inspect_prints_a_table(saved_model_dir):
    proc = _run("inspect", saved_model_dir)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split()[:2] == ["layer", "type"]
    for name in _LAYERS:
        assert any(line.split()[0] == name for line in lines if line.strip()), name
    total = next(line for line in lines if line.startswith("TOTAL"))
    expected = inspect(saved_model_dir)
    assert f"{expected.total_flops:,}" in total
    assert f"{expected.total_params:,}" in total


def test_inspect_json_matches_the_library(saved_model_dir):
    proc = _run("inspect", saved_model_dir, "--json", "--batch_size=2")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    expected = inspect(saved_model_dir, batch_size=2)
    assert data["batch_size"] == 2
    assert data["total_flops"] == expected.total_flops
    assert data["total_params"] == expected.total_params
    assert data["total_activation_bytes"] == expected.total_activation_bytes
    assert [row["name"] for row in data["rows"]] == list(_LAYERS)


def test_missing_path_exits_2_with_one_line(tmp_path):
    missing = str(tmp_path / "does_not_exist")
    _assert_one_line_error(_run("inspect", missing), missing, "no such file or directory")


def test_directory_that_is_not_a_savedmodel_exits_2(tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    _assert_one_line_error(_run("inspect", str(tmp_path)), "not a SavedModel")


def test_unknown_command_exits_2():
    _assert_one_line_error(_run("frobnicate"), "frobnicate", "inspect")


@pytest.mark.parametrize("flag, fragment", [("--batch_size=0", "batch_size"), ("--nope", "nope")])
def test_bad_flag_exits_2(flag, fragment, tmp_path):
    _assert_one_line_error(_run("inspect", str(tmp_path), flag), fragment)


def test_inspect_help_exits_0_and_documents_flags():
    proc = _run("inspect", "--help")
    assert proc.returncode == 0, proc.stderr
    assert "--json" in proc.stdout and "--batch_size" in proc.stdout
    assert "usage: tf-balancer inspect" in proc.stdout


def test_no_command_prints_usage_and_exits_2():
    proc = _run()
    assert proc.returncode == 2
    assert "usage: tf-balancer COMMAND" in proc.stderr  # a usage error goes to stderr
    assert "inspect" in proc.stderr


def test_flags_without_a_command_exit_2_in_one_line():
    proc = _run("--json")
    assert proc.returncode == 2
    assert _messages(proc.stderr) == [
        "tf-balancer: error: missing COMMAND; choose one of ['demo', 'inspect', 'optimize']"
    ]


def test_input_errors_do_not_wait_for_tensorflow():
    """The package imports lazily: a missing path is reported without importing TF."""
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; sys.argv = ['tf-balancer', 'inspect', '/no/such/path']\n"
            "from tf_balancer import cli\n"
            "try:\n    cli.run()\nexcept SystemExit as e:\n"
            "    print('tensorflow' in sys.modules, e.code)",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.stdout.split() == ["False", "2"], proc.stderr[-2000:]

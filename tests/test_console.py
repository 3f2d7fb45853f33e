"""What a user sees: tf_balancer's own work prints its lines and a summary, not TensorFlow's.

Both runs use the real console (subprocesses, stdout and stderr captured) with
``TF_CPP_MIN_LOG_LEVEL`` unset, as a user has it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.slow

TF_INTERNAL = re.compile(
    r"^[IWE]\d{4} "  # C++ (and absl-formatted Python) log lines
    r"|Instructions for updating"
    r"|WARNING:tensorflow"
    r"|Found untraced functions"
    r"|Sharding callback"
    r"|INFO: Created TensorFlow Lite"  # the TFLite runtime, whatever TF_CPP_MIN_LOG_LEVEL says
    r"|is deprecated",
    re.MULTILINE,
)
MARKER = "=== tf_balancer starts here ==="

_FIT_SCRIPT = textwrap.dedent(
    f"""
    import sys
    import tf_balancer as tfb
    from tf_balancer.demo import build_digits_cnn, compile_classifier, load_digits_data

    data = load_digits_data()
    model = compile_classifier(build_digits_cnn(width=8, seed=0))
    model.fit(data.x_train[:64], data.y_train[:64], epochs=1, verbose=0)  # TF's own start-up
    print("{MARKER}", flush=True)
    print("{MARKER}", file=sys.stderr, flush=True)
    callback = tfb.BalanceCallback(validation_data=(data.x_val[:128], data.y_val[:128]))
    model.fit(data.x_train[:512], data.y_train[:512], epochs=3, batch_size=64, verbose=0,
              callbacks=[callback])
    callback.export(sys.argv[1], tflite=True)
    """
)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    return env


def _internal_lines(text: str) -> list[str]:
    return [m.group(0) for m in TF_INTERNAL.finditer(text)]


def test_tf_internal_pattern_matches_the_lines_it_must_catch():
    sample = (
        "I0000 00:00:1795 port.cc:153] oneDNN custom operations are on.\n"
        "WARNING:tensorflow:From nn_ops.py: tensor_shape_from_node_def_name is deprecated\n"
        "Instructions for updating:\n"
        "INFO: Created TensorFlow Lite XNNPACK delegate for CPU.\n"
        "tf_balancer: epoch 2: rebalanced to target 0.815 flops\n"
    )
    assert len(_internal_lines(sample)) == 5
    assert not _internal_lines("tf_balancer: end of training\n| FLOPs | 1 | 1 | 1x |\n")


def test_fit_with_the_callback_prints_no_tensorflow_internal_lines(tmp_path):
    done = subprocess.run(
        [sys.executable, "-c", _FIT_SCRIPT, str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=600,
        env=_env(),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout.split(MARKER, 1)[1]
    err = done.stderr.split(MARKER, 1)[1]
    assert not _internal_lines(out + err), (out + err)[-3000:]
    rebalances = [line for line in out.splitlines() if "rebalanced to target" in line]
    assert len(rebalances) == 1  # default schedule of a 3-epoch fit: one rebalance
    assert "| FLOPs |" in out  # the final summary table


def test_demo_console_has_no_tensorflow_internal_lines(tmp_path):
    done = subprocess.run(
        [
            os.path.join(os.path.dirname(sys.executable), "tf-balancer"),
            "demo",
            "--epochs",
            "3",
            "--output",
            str(tmp_path / "demo"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=_env(),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert not _internal_lines(done.stdout + done.stderr), (done.stdout + done.stderr)[-3000:]
    assert "[3/3] Wrote" in done.stdout


def test_quiet_calls_drop_tensorflow_info_lines_and_pass_errors():
    """What the C++ side writes to stderr inside a quiet call: INFO/WARNING lines, the
    TFLite runtime's and quantizer's lines go; anything else (errors) is passed on."""
    script = textwrap.dedent(
        """
        import os
        from tf_balancer._quiet import quiet_tensorflow

        with quiet_tensorflow():
            os.write(
                2,
                b"I0000 00:00:1795 port.cc:153] oneDNN custom operations are on.\\n"
                b"INFO: Created TensorFlow Lite XNNPACK delegate for CPU.\\n"
                b"fully_quantize: 0, inference_type: 6, input_inference_type: FLOAT32\\n"
                b"E0000 something really failed\\n",
            )
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=_env()
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stderr.splitlines()[-1:] == ["E0000 something really failed"]
    assert "fully_quantize" not in done.stderr and "XNNPACK" not in done.stderr

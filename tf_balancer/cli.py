"""The ``tf-balancer`` command line (absl).

Usage::

    tf-balancer inspect PATH [--json] [--batch_size N]
    tf-balancer optimize SAVEDMODEL --output DIR [--config FILE.yaml] [--calibration DATA.npz]
                         [--tflite [--quantize dynamic|int8]]
                         [--overwrite]
    tf-balancer demo [--output DIR]

Exit codes: 0 success, 1 verification or optimization failed, 2 usage or input error.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402

_JSON = flags.DEFINE_boolean("json", False, "inspect: print JSON instead of a table.")
_BATCH_SIZE = flags.DEFINE_integer(
    "batch_size", 1, "inspect: batch size for FLOPs/activations.", lower_bound=1
)
_OUTPUT = flags.DEFINE_string("output", None, "optimize/demo: output directory.")
_CONFIG = flags.DEFINE_string(
    "config",
    None,
    "optimize: YAML recipe (e.g. configs/lossless.yaml, configs/structured_50_flops.yaml); "
    "without it the lossless passes run.",
)
_OVERWRITE = flags.DEFINE_boolean(
    "overwrite", False, "optimize: replace --output if it exists (only after verification)."
)
_CALIBRATION = flags.DEFINE_string(
    "calibration",
    None,
    "optimize: .npz file with inputs `x` and optional labels `y` (np.savez(path, x=..., y=...)); "
    "pruning recipes need it; it also feeds the output check.",
)
_TFLITE = flags.DEFINE_boolean(
    "tflite",
    False,
    "optimize: also write OUTPUT/model.tflite, verified against the optimized SavedModel.",
)
_QUANTIZE = flags.DEFINE_enum(
    "quantize",
    None,
    ["dynamic", "int8"],
    "optimize --tflite: quantize the TFLite model (int8 needs --calibration).",
)
_INPUT_SHAPE = flags.DEFINE_string(
    "input_shape",
    None,
    "inspect/optimize: sizes of the input axes the model leaves open besides the batch, "
    "e.g. 128 (text of any length) or 224,224,3 (images of any size); ';' between inputs. "
    "FLOPs are counted at them; the output keeps the open axes. Defaults to the "
    "calibration data's shape.",
)
_EPOCHS = flags.DEFINE_integer("epochs", 10, "demo: training epochs.", lower_bound=3)

USAGE_ERROR = 2
FAILED = 1

_COMMANDS = {
    "inspect": (
        "PATH",
        "Print a per-layer table (params, FLOPs, activation bytes, channel group, prunable) of a SavedModel or Keras file.",
        ["json", "batch_size", "input_shape"],
    ),
    "optimize": (
        "SAVEDMODEL --output DIR",
        "Optimize a SavedModel with a recipe's passes and write a SavedModel with the same "
        "signatures, verified against the source, plus tf_balancer_report.json.",
        ["output", "config", "calibration", "overwrite", "tflite", "quantize", "input_shape"],
    ),
    "demo": (
        "",
        "Train a small CNN on scikit-learn's digits with BalanceCallback (50% FLOPs, balanced), "
        "compact and fine-tune it, print before/after and write --output (default demo_out/).",
        ["output", "epochs"],
    ),
}


class UsageError(Exception):
    """Bad command line; printed in one line, exit code 2."""


def _usage() -> str:
    lines = ["usage: tf-balancer COMMAND [ARGS] [--flags]", "", "commands:"]
    lines += [f"  {name:<8} {doc}" for name, (_, doc, _) in _COMMANDS.items()]
    lines.append("\n`tf-balancer COMMAND --help` describes one command.")
    return "\n".join(lines)


def _command_help(name: str) -> str:
    args, doc, flag_names = _COMMANDS[name]
    lines = [f"usage: tf-balancer {name} {args}".rstrip(), "", doc, "", "flags:"]
    for flag_name in flag_names:
        flag = flags.FLAGS[flag_name]
        lines.append(f"  --{flag_name}: {flag.help} (default: {flag.default!r})")
    return "\n".join(lines)


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing that reports errors in one line with exit code 2."""
    args = argv[1:]
    if not args or args[0] in ("-h", "--help", "help"):
        print(_usage(), file=sys.stdout if args else sys.stderr)
        sys.exit(0 if args else USAGE_ERROR)
    if args[0] in _COMMANDS and any(a in ("-h", "--help", "--helpfull") for a in args[1:]):
        print(_command_help(args[0]))
        sys.exit(0)
    try:
        return flags.FLAGS(argv)
    except flags.Error as err:
        print(f"tf-balancer: error: {err}", file=sys.stderr)
        sys.exit(USAGE_ERROR)


def _start_tensorflow() -> None:
    """Import TensorFlow once the command's input checks passed, without its banner."""
    from tf_balancer._quiet import quiet_tensorflow_startup

    quiet_tensorflow_startup()


def _cmd_inspect(args: list[str]) -> int:
    if len(args) != 1:
        raise UsageError(
            "inspect takes exactly one PATH (a SavedModel directory or a .keras/.h5 file)"
        )
    if not os.path.exists(args[0]):  # fail fast, before TensorFlow is imported
        raise UsageError(f"{args[0]}: no such file or directory")
    _start_tensorflow()
    from tf_balancer.analysis import inspect

    result = inspect(args[0], batch_size=_BATCH_SIZE.value, input_shape=_input_shape())
    print(result.to_json() if _JSON.value else result.table())
    return 0


def _cmd_optimize(args: list[str]) -> int:
    if len(args) != 1:
        raise UsageError(f"optimize takes exactly one SAVEDMODEL directory, got {len(args)}")
    if not _OUTPUT.value:
        raise UsageError("optimize needs --output DIR (where the optimized SavedModel goes)")
    if _QUANTIZE.value and not _TFLITE.value:
        raise UsageError("--quantize applies to the TFLite model: add --tflite")
    if _QUANTIZE.value == "int8" and not _CALIBRATION.value:
        raise UsageError("--quantize int8 needs --calibration data.npz (inputs x to calibrate on)")
    _start_tensorflow()
    from tf_balancer.export.savedmodel import format_summary, optimize_saved_model

    report = optimize_saved_model(
        args[0],
        _OUTPUT.value,
        config=_CONFIG.value,
        calibration_data=_CALIBRATION.value,
        overwrite=_OVERWRITE.value,
        tflite=_TFLITE.value,
        quantize=_QUANTIZE.value,
        input_shape=_input_shape(),
    )
    print(format_summary(report))
    return 0


def _input_shape() -> list[tuple[int, ...]] | None:
    """``--input_shape`` as a list of shapes (``"20;32,32,3"`` -> ``[(20,), (32, 32, 3)]``)."""
    if not _INPUT_SHAPE.value:
        return None
    try:
        shapes = [tuple(int(d) for d in part.split(",")) for part in _INPUT_SHAPE.value.split(";")]
    except ValueError:
        raise UsageError(
            f"--input_shape {_INPUT_SHAPE.value!r}: give sizes as integers, e.g. 128 or "
            "224,224,3, with ';' between inputs"
        ) from None
    return shapes


def _cmd_demo(args: list[str]) -> int:
    if args:
        raise UsageError(f"demo takes no positional arguments, got {args}")
    _start_tensorflow()
    from tf_balancer.demo import run_demo

    run_demo(_OUTPUT.value or "demo_out", epochs=_EPOCHS.value)
    return 0


_HANDLERS = {"inspect": _cmd_inspect, "optimize": _cmd_optimize, "demo": _cmd_demo}


def _plain_progress_lines() -> None:
    """tf_balancer's progress as ``tf_balancer: ...`` on stdout, not absl's log format."""
    import logging

    logger = logging.getLogger("tf_balancer")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("tf_balancer: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def main(argv: list[str]) -> int:
    from tf_balancer.errors import TFBalancerError, VerificationError

    _plain_progress_lines()

    command, args = (argv[1], argv[2:]) if len(argv) > 1 else (None, [])
    handler = _HANDLERS.get(command)
    try:
        if handler is None:
            what = "missing COMMAND" if command is None else f"unknown command {command!r}"
            raise UsageError(f"{what}; choose one of {sorted(_HANDLERS)}")
        return handler(args)
    except VerificationError as err:
        print(f"tf-balancer: failed: {_one_line(err)}", file=sys.stderr)
        return FAILED
    except (UsageError, TFBalancerError) as err:
        print(f"tf-balancer: error: {_one_line(err)}", file=sys.stderr)
        return USAGE_ERROR


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())


def run() -> None:
    """Console-script entry point."""
    import logging

    logging.getLogger("tensorflow").setLevel(logging.ERROR)  # TF's info/warnings: not for users
    app.run(main, flags_parser=parse_flags)

"""Compare dense, tfmot and tf_balancer recipes on scikit-learn digits (3 seeds).

Every run trains the same CNN for the same number of epochs with the same seeds.
The structured recipes use ``BalanceCallback(target=..., strategy=...)`` with
its defaults (Taylor importance streamed from the training batches, the default
schedule: epochs 2-9 ramp, the last quarter recovers); the sparse recipes ramp
from ``BEGIN`` to ``END``. Columns: validation accuracy, macro recall and F1
(mean +- sd over seeds), ``masked`` (the masked network's validation accuracy at
the last epoch, before compaction), FLOPs and params of the exported model,
latency at batch 1 and 64 (median ms), and the gzip-compressed SavedModel size.
The verdicts at the end check issue 11's targets against the dense reference.

Run: ``.venv/bin/python -m benchmarks.compare`` (about 10-15 minutes on 2 cores).
Writes ``benchmarks/out/compare.md``, ``compare.json`` and ``compare.png``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import time

import numpy as np
import tensorflow_model_optimization as tfmot

from tf_balancer import BalanceCallback, analyze
from tf_balancer.demo import build_digits_cnn, compile_classifier, load_digits_data
from tf_balancer.report import evaluate_model, markdown_table, saved_model_size
from tf_balancer.sparse import wrapping

EPOCHS, BEGIN, END, BATCH = 12, 3, 8, 32
SPARSITY = 0.8

TARGETS = (0.5, 0.25, 0.125, 0.0625)
ALLOWED_DROP = {0.5: 0.3, 0.25: 0.5, 0.125: 1.0, 0.0625: 2.0}  # points below dense

RECIPES = (
    "dense",
    "tfmot uniform sparse 80%",
    "tf_balancer sparse balanced 80%",
    *(
        f"tf_balancer structured {strategy} {target:g} FLOPs"
        for target in TARGETS
        for strategy in ("uniform", "balanced")
    ),
)


def _steps(data) -> int:
    return int(np.ceil(len(data.x_train) / BATCH))


def _fit(model, data, callbacks) -> dict:
    history = model.fit(
        data.x_train,
        data.y_train,
        epochs=EPOCHS,
        batch_size=BATCH,
        callbacks=callbacks,
        validation_data=(data.x_val, data.y_val),
        verbose=0,
    )
    return history.history


def _structured(data, seed: int, target: float, strategy: str):
    model = compile_classifier(build_digits_cnn(seed=seed))
    callback = BalanceCallback(target=target, strategy=strategy, verbose=0)
    history = _fit(model, data, [callback])
    return callback.optimized_model, history["val_accuracy"][-1]


def _tfmot_uniform(data, seed: int):
    schedule = tfmot.sparsity.keras.PolynomialDecay(
        0.0,
        SPARSITY,
        begin_step=BEGIN * _steps(data),
        end_step=(END + 1) * _steps(data),
        frequency=10,
    )
    base = build_digits_cnn(seed=seed)
    model = compile_classifier(
        tfmot.sparsity.keras.prune_low_magnitude(base, pruning_schedule=schedule)
    )
    _fit(model, data, [tfmot.sparsity.keras.UpdatePruningStep()])
    return tfmot.sparsity.keras.strip_pruning(model)


def _tf_balancer_sparse(data, seed: int):
    base = build_digits_cnn(seed=seed)
    names = list(wrapping.prunable_kernels(base))
    model, _ = wrapping.wrap_for_pruning(
        base, {n: 0.0 for n in names}, end_step=0, frequency=10, prune_after_end=True
    )
    compile_classifier(model)
    callback = BalanceCallback(
        target=1.0 - SPARSITY,
        mode="sparse",
        importance="magnitude",
        begin_epoch=BEGIN,
        end_epoch=END,
        verbose=0,
    )
    _fit(model, data, [callback])
    return callback.optimized_model


def run_recipe(name: str, data, seed: int):
    """``(exported model, masked last-epoch validation accuracy or None)``."""
    if name == "dense":
        model = compile_classifier(build_digits_cnn(seed=seed))
        _fit(model, data, [])
        return model, None
    if name.startswith("tfmot"):
        return _tfmot_uniform(data, seed), None
    if "sparse" in name:
        return _tf_balancer_sparse(data, seed), None
    target = float(name.split()[-2])
    return _structured(data, seed, target, "uniform" if "uniform" in name else "balanced")


def measure(model, data) -> dict[str, float]:
    result = evaluate_model(model, data.x_val, data.y_val)
    cost = analyze(model).cost
    result.update(flops=cost.flops, params=cost.params, nonzero_params=_nonzero(model))
    result["gzip_bytes"] = saved_model_size(model)["gzip_bytes"]
    return result


def _nonzero(model) -> int:
    return int(sum(np.count_nonzero(w) for w in model.get_weights()))


def summarize(runs: dict[str, list[dict]]) -> list[dict]:
    rows = []
    for name, results in runs.items():
        row = {"recipe": name}
        for key in ("accuracy", "recall", "f1", "masked"):
            if results[0].get(key) is None:
                row[key] = ""
                continue
            values = np.array([r[key] for r in results]) * 100
            row[key] = f"{values.mean():.2f} ± {values.std(ddof=1) if len(values) > 1 else 0:.2f}"
        for key in ("flops", "params", "nonzero_params", "gzip_bytes"):
            row[key] = int(np.median([r[key] for r in results]))
        for key in ("latency_ms_b1", "latency_ms_b64"):
            row[key] = float(np.median([r[key] for r in results]))
        rows.append(row)
    return rows


def write_png(path: str, runs: dict[str, list[dict]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, results in runs.items():
        flops = np.median([r["flops"] for r in results]) / 1e6
        acc = np.array([r["accuracy"] for r in results]) * 100
        ax.errorbar(
            flops,
            acc.mean(),
            yerr=acc.std(ddof=1) if len(acc) > 1 else 0,
            fmt="o",
            capsize=4,
            label=name,
        )
    ax.set_xlabel("MFLOPs per image (exported model)")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title("digits CNN: accuracy vs FLOPs (mean ± sd, 3 seeds)")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


COLUMNS = (
    "recipe",
    "accuracy",
    "recall",
    "f1",
    "masked",
    "flops",
    "params",
    "nonzero_params",
    "latency_ms_b1",
    "latency_ms_b64",
    "gzip_bytes",
)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "out"))
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    runs: dict[str, list[dict]] = {name: [] for name in RECIPES}
    start = time.time()
    for seed in range(args.seeds):
        data = load_digits_data(seed)
        for name in RECIPES:
            model, masked = run_recipe(name, data, seed)
            runs[name].append({**measure(model, data), "masked": masked})
            print(
                f"seed {seed}: {name}: accuracy {runs[name][-1]['accuracy']:.4f} ({time.time() - start:.0f}s)",
                flush=True,
            )
    rows = summarize(runs)
    stamp = datetime.date.today().isoformat()
    table = markdown_table(rows, COLUMNS)
    header = (
        f"Produced by `.venv/bin/python -m benchmarks.compare` on {stamp} "
        f"({args.seeds} seeds, {EPOCHS} epochs; sparse recipes ramp over epochs {BEGIN + 1}-{END + 1}, "
        "structured ones use BalanceCallback's default schedule, epochs 2-9; 2-core CPU).\n\n"
        "accuracy/recall/F1 in %, mean ± sd over seeds; latency in ms (median); "
        "gzip_bytes: gzip-compressed SavedModel.\n\n"
    )
    with open(os.path.join(args.out, "compare.md"), "w", encoding="utf-8") as handle:
        handle.write(header + table + "\n")
    with open(os.path.join(args.out, "compare.json"), "w", encoding="utf-8") as handle:
        json.dump({"rows": rows, "runs": runs, "date": stamp}, handle, indent=2, default=float)
    write_png(os.path.join(args.out, "compare.png"), runs)
    print(header + table)
    for line in verdicts(runs):
        print(line)


def _mean(runs: dict[str, list[dict]], name: str, key: str = "accuracy") -> float:
    return float(np.mean([r[key] for r in runs[name]]) * 100)


def verdicts(runs: dict[str, list[dict]]) -> list[str]:
    """Issue 11's targets, each as a PASS/FAIL line with the numbers."""
    dense = _mean(runs, "dense")
    lines = []
    for target in TARGETS:
        balanced = f"tf_balancer structured balanced {target:g} FLOPs"
        uniform = f"tf_balancer structured uniform {target:g} FLOPs"
        got, floor = _mean(runs, balanced), dense - ALLOWED_DROP[target]
        lines.append(
            f"{'PASS' if got >= floor else 'FAIL'}: balanced {target:g} FLOPs {got:.2f}% "
            f">= dense {dense:.2f}% - {ALLOWED_DROP[target]} point(s)"
        )
        if target < 0.5:
            other = _mean(runs, uniform)
            lines.append(
                f"{'PASS' if got >= other else 'FAIL'}: balanced {got:.2f}% >= uniform "
                f"{other:.2f}% at {target:g} FLOPs"
            )
        for name in (balanced, uniform):
            drops = [100 * (r["masked"] - r["accuracy"]) for r in runs[name]]
            lines.append(
                f"{'PASS' if max(drops) <= 0.3 else 'FAIL'}: {name}: final never below the "
                f"masked model's last epoch by more than 0.3 point (worst {max(drops):.2f})"
            )
    return lines


if __name__ == "__main__":
    main()

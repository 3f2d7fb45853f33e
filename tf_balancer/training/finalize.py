"""End of training: compact, fine-tune, optimize, evaluate and export.

Used by :class:`~tf_balancer.training.callback.BalanceCallback` at the end of
``fit`` and by :func:`~tf_balancer.training.oneshot.prune` for one-shot pruning;
both describe the job as :class:`FinalizeInputs`, so the callback stays about
*when* things happen and this module about *what*.

The report describes the model actually produced: when a pass is rolled back
(e.g. ``prune_channels``), ``final_flops_ratio`` says what is left and one
WARNING line names the pass, its reason and the FLOPs ratio reached.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import numpy as np
import tensorflow as tf

from tf_balancer._compat import adapter_for, is_keras_model
from tf_balancer._quiet import quietly
from tf_balancer.analysis import ModelAnalysis, analyze
from tf_balancer.attention.balance import KeepPlan
from tf_balancer.graph.walk import functional_twin
from tf_balancer.metrics import output_tasks
from tf_balancer.optimizer import MetaOptimizer
from tf_balancer.passes.base import PassContext
from tf_balancer.report import (
    evaluate_model,
    saved_model_size,
    summary_markdown,
    task_of,
)
from tf_balancer.training.calibrate import recalibrate_batchnorm
from tf_balancer.training.finetune import (
    FINETUNE_LR_SCALE,
    FinetuneSettings,
    compile_like,
    current_learning_rate,
    finetune,
)

__all__ = ["FinalizeInputs", "Finalizer", "FINETUNE_LR_SCALE"]

logger = logging.getLogger(__name__)
# end-of-training passes: a line per pass (progress), rollbacks at INFO (a warning follows)
_LOG_LEVELS = {"rollback_log_level": logging.INFO, "progress_log_level": logging.INFO}

STRUCTURED_PASSES = ("prune_channels", "strip_training_ops", "fold_batchnorm", "fuse_activation")
LOSSLESS_PASSES = ("strip_training_ops", "fold_batchnorm", "fuse_activation")


def _first(data: Any, n: int) -> Any:
    """The first ``n`` samples of inputs given as an array, a list or a dict of them."""
    return tf.nest.map_structure(lambda a: a[:n], data)


@dataclasses.dataclass
class FinalizeInputs:
    """Everything the end of a pruning job needs.

    Attributes:
        mode: ``"structured"`` or ``"sparse"``.
        passes: pass names, or None for the mode's default.
        model: the trained model (masked, for the structured mode during ``fit``).
        analysis: its analysis.
        plan: the channels to keep (structured mode).
        finetune: fine-tuning settings.
        validation_data: ``(x, y)`` for the report and fine-tuning, or None.
        probe_x: verification inputs when there is no validation data, or None.
        dense_model: the model the report's dense column describes, or None.
        dense_epoch: epochs ``dense_model`` had trained, or None.
        attention: group id -> attention weight of the last rebalance.
        attention_history: per rebalance, the groups' attention weights.
        head_attention: group id -> each attention head's attention weight.
        settings: target, target_metric, strategy, importance (for the report).
        recalibrate_x: inputs to re-estimate BatchNorm statistics on right after
            compaction (one-shot pruning: the statistics still describe the dense
            network), or None (during ``fit`` the masked model trained with its masks).
    """

    mode: str = "structured"
    passes: tuple[str, ...] | None = None
    model: Any = None
    analysis: ModelAnalysis | None = None
    plan: KeepPlan | None = None
    finetune: FinetuneSettings = dataclasses.field(default_factory=FinetuneSettings)
    validation_data: Any = None
    probe_x: Any = None
    dense_model: Any = None
    dense_epoch: int | None = None
    attention: dict[int, float] = dataclasses.field(default_factory=dict)
    attention_history: list = dataclasses.field(default_factory=list)
    head_attention: dict[int, list[float]] = dataclasses.field(default_factory=dict)
    settings: dict[str, Any] = dataclasses.field(default_factory=dict)
    recalibrate_x: Any = None


def _timed(what: str, measure: Any) -> dict[str, Any]:
    """``measure()``, with a progress line saying how long it took."""
    start = time.perf_counter()
    summary = measure()
    logger.info("measured %s in %.1f s", what, time.perf_counter() - start)
    return summary


def _unless_failing(what: str, measure: Any, summary: dict[str, Any]) -> Any:
    """``measure()``; when it fails, None, a WARNING line, and the reason in
    ``summary["unmeasured"][what]``: a measurement the report cannot make must not
    cost the user the optimized model (nor ``fit`` its History)."""
    try:
        return measure()
    except Exception as err:  # noqa: BLE001 - any failure: the report goes without it
        reason = f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:200]}"
        logger.warning("end of training: %s not measured (%s)", what, reason)
        summary.setdefault("unmeasured", {})[what] = reason
        return None


class Finalizer:
    """Turns a trained (masked) model into the optimized model and its report."""

    def __init__(self, inputs: FinalizeInputs):
        self.inputs = inputs
        self.analysis = inputs.analysis
        self.finetune_log: dict[str, Any] | None = None

    def passes(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(before fine-tuning, after fine-tuning): split right after prune_channels."""
        default = STRUCTURED_PASSES if self.inputs.mode == "structured" else LOSSLESS_PASSES
        names = tuple(self.inputs.passes if self.inputs.passes is not None else default)
        if "prune_channels" in names:
            cut = names.index("prune_channels") + 1
            return names[:cut], names[cut:]
        return (), names

    def probe_inputs(self) -> Any:
        """Verification inputs: validation or probe data, else None (random inputs)."""
        if self.inputs.validation_data is not None:
            return _first(self.inputs.validation_data[0], 16)
        if self.inputs.probe_x is not None:
            return _first(self.inputs.probe_x, 16)
        return None

    @quietly
    def run(self) -> tuple[Any, dict[str, Any]]:
        job = self.inputs
        plan = job.plan
        ctx = PassContext(
            probe_inputs=self.probe_inputs(), plan=plan if job.mode == "structured" else None
        )
        model = job.model
        if job.mode == "sparse":
            from tf_balancer.sparse.wrapping import strip

            model = strip(model)
        first, second = self.passes()
        logger.info(
            "end of training: %s, then measuring dense vs optimized", ", ".join(first + second)
        )
        records = []
        # Analyses already made (of the trained model when the job began, then of each
        # run's result): a run uses the one of the model it is given, if that is it.
        analysis = job.analysis
        if first:
            model, report = MetaOptimizer(first, **_LOG_LEVELS).run(model, ctx, analysis)
            records += report.records
            analysis = report.analysis
        if job.recalibrate_x is not None and model is not job.model:  # never the user's
            layers = recalibrate_batchnorm(model, job.recalibrate_x)
            logger.info("re-estimated %d BatchNorm layers' statistics on the data", layers)
        model = self.finetune(model)
        if second:  # fine-tuning and re-estimation change weights in place, not layers
            optimizer = MetaOptimizer(second, **_LOG_LEVELS)
            model, report = optimizer.run(model, dataclasses.replace(ctx, plan=None), analysis)
            records += report.records
        report = self.build_report(model, plan, records)
        self.warn_shortfall(report)
        if job.mode == "sparse":
            self.warn_sparsity_shortfall(model, report.get("target"))
        self.compile_result(model)
        logger.info("result:\n%s", summary_markdown(report))
        return model, report

    def compile_result(self, model: Any) -> None:
        """Compile the optimized model like the trained one (its loss, loss weights and
        metrics; a fresh optimizer of its type at its current learning rate), so it
        can be evaluated or trained further as it is. Said, not raised, when it
        cannot be (a loss or metric Keras cannot rebuild)."""
        trained = self.inputs.model
        if model is trained or not is_keras_model(model):
            return
        optimizer = getattr(trained, "optimizer", None)
        if optimizer is None or getattr(trained, "loss", None) is None:
            return
        try:
            compile_like(model, trained, current_learning_rate(optimizer))
        except Exception as err:  # noqa: BLE001 - an uncompiled result still serves
            logger.info("the optimized model is not compiled (%s); compile it to train it", err)

    def warn_shortfall(self, report: dict[str, Any]) -> None:
        """One WARNING line when a pass was rolled back or the target was missed by > 1%.

        It names each rolled-back pass with its reason and gives the FLOPs ratio
        of the model produced (the per-epoch ``balancer/flops_ratio`` is the plan's).
        """
        rolled_back = [
            f"{r['name']} ({r['message']})"
            for r in report["passes"]
            if r["status"] == "rolled_back"
        ]
        target, metric = report.get("target"), report.get("target_metric", "flops")
        ratio = report.get(f"final_{metric}_ratio")
        slack = 1.10 if metric == "latency" else 1.01  # measured time is noisy
        missed = (
            self.inputs.mode == "structured"
            and target is not None
            and ratio is not None
            and ratio > target * slack
        )
        if not rolled_back and not missed:
            return
        rolled = f"rolled back {', '.join(rolled_back)}; " if rolled_back else ""
        logger.warning(
            "end of training: %sthe optimized model keeps %.3f of the dense %s (target %s)",
            rolled,
            ratio,
            metric,
            target,
        )

    @staticmethod
    def warn_sparsity_shortfall(model: Any, target: float | None) -> None:
        """One WARNING line when the prunable kernels end well under the sparsity asked
        for (``1 - target``): tfmot's masks update only every ``frequency`` steps of
        the pruning wrapper's schedule, which a short ``fit`` may never reach."""
        from tf_balancer.sparse.wrapping import overall_sparsity

        if target is None:
            return
        wanted, got = 1.0 - float(target), overall_sparsity(model)
        if got >= 0.9 * wanted:
            return
        logger.warning(
            "end of training: the prunable kernels are %.0f%% zeros, not %.0f%%: the pruning "
            "wrapper updates its masks every `frequency` steps of its schedule; give it a "
            "frequency below the steps per epoch (tf_balancer.sparse.wrapping.wrap_for_pruning(..., "
            "frequency=...))",
            100 * got,
            100 * wanted,
        )

    def finetune(self, model: Any) -> Any:
        """Fine-tune when asked and possible; otherwise say why not, once."""
        settings, job = self.inputs.finetune, self.inputs
        if not settings.epochs:
            return model
        if settings.data is None:
            logger.info(
                "finetune_epochs=%d but no finetune_data: skipping fine-tuning "
                "(pass finetune_data=(x, y) to fine-tune the compacted model)",
                settings.epochs,
            )
            return model
        if job.validation_data is None:
            logger.info("fine-tuning needs validation_data to keep the best weights: skipped")
            return model
        if model is job.model:  # nothing was compacted; never recompile the user's model
            logger.info("no channel was removed: fine-tuning skipped")
            return model
        if job.mode == "sparse":  # the unwrapped layers are the trained model's own
            logger.warning(
                "fine-tuning skipped in mode='sparse': it would train the model's own weights "
                "after fit, and without tfmot's masks regrow the pruned ones; train more "
                "epochs with the callback instead"
            )
            return model
        model, self.finetune_log = finetune(model, job.model, settings, job.validation_data)
        return model

    def summarize(self, model: Any, cost: dict[str, int] | None = None) -> dict[str, Any]:
        """FLOPs and params (``cost``, when already known), task scores and latency on
        the validation data, SavedModel sizes."""
        if cost is None:
            analysis = analyze(model, frozen=False)
            cost = {"flops": analysis.cost.flops, "params": analysis.cost.params}
        summary: dict[str, Any] = {"flops": cost["flops"], "params": cost["params"]}
        validation = self.inputs.validation_data
        # One trace serves the scores, the latencies and the SavedModel's signature.
        serve = adapter_for(model).serving_function(model) if is_keras_model(model) else None
        if validation is not None:
            # The task is read from the trained (compiled) model; compacted copies are not compiled.
            trained = self.inputs.model
            outputs = functional_twin(trained).outputs  # a subclassed model's: its twin's
            task = task_of(trained, outputs)
            heads = output_tasks(trained) if len(outputs) > 1 else None
            scores = _unless_failing(
                "validation scores and latency",
                lambda: evaluate_model(
                    model, validation[0], validation[1], **task, serve=serve, heads=heads
                ),
                summary,
            )
            summary.update(scores or {})
        sizes = _unless_failing("SavedModel size", lambda: saved_model_size(model, serve), summary)
        if sizes is not None:
            summary["saved_model_bytes"], summary["saved_model_gzip_bytes"] = (
                sizes["bytes"],
                sizes["gzip_bytes"],
            )
        return summary

    def layer_rows(self, plan: KeepPlan | None, compacted: bool = True) -> list[dict[str, Any]]:
        """Per producer: channels and FLOPs before/after (unchanged when not ``compacted``)."""
        if plan is None:
            return []
        graph = self.analysis.graph
        if not compacted:  # prune_channels did not apply: every channel is still there
            plan = KeepPlan({g.id: np.arange(g.size) for g in graph.prunable_groups}, plan.sizes)
        before = self.analysis.cost.layers
        after = self.analysis.cost_under(plan.keep_counts).layers
        attention = self.inputs.attention
        rows = []
        for group in graph.prunable_groups:
            for name in group.nodes("producer"):
                rows.append(
                    {
                        "layer": name,
                        "group": group.id,
                        "attention": attention.get(group.id, 0.0),
                        "channels_before": group.size,
                        "channels_after": len(plan.keep[group.id]),
                        "keep_ratio": len(plan.keep[group.id]) / group.size,
                        "flops_before": before[name].flops,
                        "flops_after": after[name].flops,
                    }
                )
                if group.id in self.inputs.head_attention:
                    rows[-1]["head_attention"] = self.inputs.head_attention[group.id]
        return rows

    @staticmethod
    def _cost(analysis: ModelAnalysis) -> dict[str, int]:
        return {"flops": analysis.cost.flops, "params": analysis.cost.params}

    def dense_summary(self) -> dict[str, Any]:
        """The dense column: the model named by ``dense_model`` and ``dense_epoch``."""
        job = self.inputs
        if job.dense_model is None:
            # A resumed run: the dense weights were not checkpointed, only the structure.
            return self._cost(self.analysis)
        # The dense model has the trained model's layers: the analysis already has its cost.
        known = self._cost(self.analysis) if self.analysis is not None else None
        summary = self.summarize(job.dense_model, known)
        summary["trained_epochs"] = job.dense_epoch
        return summary

    def build_report(self, model: Any, plan: KeepPlan | None, records: list) -> dict[str, Any]:
        job = self.inputs
        # The last pass record measured the model it returned (fine-tuning keeps the layers).
        final_cost = records[-1].after if records else None
        dense = _timed("the dense model", self.dense_summary)
        final = _timed("the optimized model", lambda: self.summarize(model, final_cost))
        compacted = any(r.name == "prune_channels" and r.status == "applied" for r in records)
        report = {
            "mode": job.mode,
            **job.settings,
            "finetune_epochs": job.finetune.epochs,
            "dense": dense,
            "final": final,
            "final_flops_ratio": final["flops"] / max(dense["flops"], 1),
            "final_params_ratio": final["params"] / max(dense["params"], 1),
            "finetune": self.finetune_log,
            "layers": self.layer_rows(plan, compacted),
            "passes": [dataclasses.asdict(r) for r in records],
            "attention_history": list(job.attention_history),
        }
        if job.settings.get("target_metric") == "latency":
            report["final_latency_ratio"] = self.latency_ratio(model)
        return report

    def latency_ratio(self, model: Any) -> float | None:
        """Optimized / dense latency at the latency table's batch size, the two models
        timed alternately (None without a dense model)."""
        from tf_balancer.graph.latency import BATCH_SIZE
        from tf_balancer.input_shapes import input_shapes
        from tf_balancer.report import inference_fn, measure_latency

        if self.inputs.dense_model is None:
            return None
        shape = input_shapes(model)
        optimized, dense = inference_fn(model), inference_fn(self.inputs.dense_model)  # traced once
        dtypes = [t.dtype for t in model.inputs]
        ratios = [
            measure_latency(optimized, shape, BATCH_SIZE, dtypes=dtypes)
            / measure_latency(dense, shape, BATCH_SIZE, dtypes=dtypes)
            for _ in range(3)
        ]
        return float(np.median(ratios))

"""End of training: compact, fine-tune, optimize, evaluate and export.

Used by :class:`~tf_balancer.training.callback.BalanceCallback`; kept apart so the
callback stays about *when* things happen and this module about *what*.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from tf_balancer.analysis import analyze
from tf_balancer.attention.balance import KeepPlan
from tf_balancer.optimizer import MetaOptimizer
from tf_balancer.passes.base import PassContext
from tf_balancer.report import evaluate_model, saved_model_size, summary_markdown

__all__ = ["Finalizer"]

logger = logging.getLogger(__name__)

STRUCTURED_PASSES = ("prune_channels", "strip_training_ops", "fold_batchnorm", "fuse_activation")
LOSSLESS_PASSES = ("strip_training_ops", "fold_batchnorm", "fuse_activation")
FINETUNE_LR_SCALE = 0.1
"""Fine-tuning uses the training optimizer's config at this fraction of its learning rate."""


def _first(data: Any, n: int) -> Any:
    return [a[:n] for a in data] if isinstance(data, (list, tuple)) else data[:n]


class Finalizer:
    """Turns a trained, masked model into the optimized model and its report."""

    def __init__(self, callback: Any):
        self.cb = callback
        self.analysis = callback.analysis

    def passes(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(before fine-tuning, after fine-tuning): split right after prune_channels."""
        default = STRUCTURED_PASSES if self.cb.mode == "structured" else LOSSLESS_PASSES
        names = self.cb.passes if self.cb.passes is not None else default
        names = tuple(names)
        if "prune_channels" in names:
            cut = names.index("prune_channels") + 1
            return names[:cut], names[cut:]
        return (), names

    def probe_inputs(self) -> Any:
        """Verification inputs: validation or probe data, else None (random inputs)."""
        if self.cb.validation_data is not None:
            return _first(self.cb.validation_data[0], 16)
        if self.cb.probe is not None:
            return _first(self.cb.probe.x, 16)
        return None

    def run(self) -> tuple[Any, dict[str, Any]]:
        cb = self.cb
        plan = KeepPlan(cb.state.keep_indices(), cb._sizes())
        ctx = PassContext(
            probe_inputs=self.probe_inputs(), plan=plan if cb.mode == "structured" else None
        )
        model = cb.model
        if cb.mode == "sparse":
            from tf_balancer.sparse.wrapping import strip

            model = strip(model)
        first, second = self.passes()
        records = []
        if first:
            logger.info("end of training: running %s", ", ".join(first))
            model, report = MetaOptimizer(first).run(model, ctx)
            records += report.records
        if cb.finetune_epochs:
            logger.info("fine-tuning the compacted model for %d epochs", cb.finetune_epochs)
            model = self.finetune(model)
        if second:
            logger.info("running %s", ", ".join(second))
            model, report = MetaOptimizer(second).run(model, dataclasses.replace(ctx, plan=None))
            records += report.records
        logger.info("measuring dense vs optimized (accuracy, latency, SavedModel size)")
        return model, self.build_report(model, plan, records)

    def finetune(self, model: Any) -> Any:
        cb = self.cb
        config = cb.model.optimizer.get_config()
        if isinstance(config.get("learning_rate"), float):
            config["learning_rate"] *= FINETUNE_LR_SCALE  # fresh optimizer state: step gently
        model.compile(optimizer=type(cb.model.optimizer).from_config(config), loss=cb.model.loss)
        data = cb.finetune_data
        kwargs = {"epochs": cb.finetune_epochs, "verbose": 0}
        if isinstance(data, tuple):
            model.fit(data[0], data[1], batch_size=32, **kwargs)
        else:
            model.fit(data, **kwargs)
        return model

    def summarize(self, model: Any) -> dict[str, Any]:
        analysis = analyze(model)
        summary: dict[str, Any] = {"flops": analysis.cost.flops, "params": analysis.cost.params}
        if self.cb.validation_data is not None:
            x, y = self.cb.validation_data[0], self.cb.validation_data[1]
            summary.update(evaluate_model(model, x, y))
        sizes = saved_model_size(model)
        summary["saved_model_bytes"], summary["saved_model_gzip_bytes"] = (
            sizes["bytes"],
            sizes["gzip_bytes"],
        )
        return summary

    def layer_rows(self, plan: KeepPlan) -> list[dict[str, Any]]:
        graph = self.analysis.graph
        before = self.analysis.cost.layers
        after = self.analysis.cost_under(plan.keep_counts).layers
        attention = self.cb._attention
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
        return rows

    def build_report(self, model: Any, plan: KeepPlan, records: list) -> dict[str, Any]:
        cb = self.cb
        dense = cb.dense_snapshot if cb.dense_snapshot is not None else cb.model
        dense_summary = self.summarize(dense)
        if cb.dense_snapshot is None and int(cb.state.rebalances.numpy()) > 0:
            # A resumed run: the dense weights were not checkpointed, only the structure.
            for key in ("accuracy", "recall", "f1"):
                dense_summary.pop(key, None)
            dense_summary.update(flops=self.analysis.cost.flops, params=self.analysis.cost.params)
        report = {
            "mode": cb.mode,
            "target": cb.target,
            "target_metric": cb.target_metric,
            "strategy": cb.strategy,
            "importance": cb.importance,
            "finetune_epochs": cb.finetune_epochs,
            "dense": dense_summary,
            "final": self.summarize(model),
            "layers": self.layer_rows(plan),
            "passes": [dataclasses.asdict(r) for r in records],
            "attention_history": cb.state.attention_history().tolist(),
        }
        logger.debug("\n%s", summary_markdown(report))
        return report

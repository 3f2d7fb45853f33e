"""``MetaOptimizer``: run named passes in order, verify each, roll back failures.

Grappler's meta-optimizer in Python. Each pass is looked up by name in the
registry, run on the current model, then verified (consecutive rebuild passes -
``strip_training_ops``, ``fold_batchnorm``, ``fuse_activation`` - run as one
chain: one model built and verified, see :mod:`tf_balancer.passes.chain`; when
that model fails, the chain's passes run again one by one): a function-preserving pass
must reproduce its reference's outputs on the probe batch (within a tolerance
that follows the model's compute dtype, see :func:`tf_balancer.verify.tolerance_for`),
every pass must keep the output shapes and dtypes. A pass that raises or fails
verification is rolled back (the previous model stays current) and reported;
with ``fail_on_error=True`` the optimizer raises instead. Per pass it records
layers, params and FLOPs before/after, wall time and the verifier's outcome.

Example:
    >>> optimizer = MetaOptimizer(["strip_training_ops", "fold_batchnorm"])  # doctest: +SKIP
    >>> new_model, report = optimizer.run(model)                              # doctest: +SKIP
    >>> print(report.table())                                                 # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from tf_balancer._compat import is_keras_model
from tf_balancer._quiet import quietly
from tf_balancer.errors import ConfigError, PassError, VerificationError
from tf_balancer.graph.layer_graph import LayerGraph
from tf_balancer.graph.walk import functional_twin
from tf_balancer.passes.base import GraphPass, PassContext, get_pass
from tf_balancer.passes.chain import Chain, chainable, run_chain
from tf_balancer.verify import (
    Outcome,
    compare_outputs,
    compare_signature,
    random_inputs,
    run_model,
)

if TYPE_CHECKING:
    from tf_balancer.analysis import ModelAnalysis

__all__ = ["PassRecord", "OptimizationReport", "MetaOptimizer", "model_stats"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class PassRecord:
    """What one pass did. ``status``: applied, unchanged, rolled_back."""

    name: str
    status: str
    message: str
    seconds: float
    before: dict[str, int]
    after: dict[str, int]
    max_abs_diff: float = 0.0
    stats: dict[str, Any] = dataclasses.field(default_factory=dict)
    verified_with: tuple[str, ...] = ()
    """The passes of this one's chain (:mod:`tf_balancer.passes.chain`): built as one
    model and verified together, ``max_abs_diff`` being the chain's (and ``seconds``
    of the last of them including that rebuild and verification). Empty for a pass
    verified alone."""


@dataclasses.dataclass(frozen=True)
class OptimizationReport:
    """All pass records, in order."""

    records: tuple[PassRecord, ...]
    analysis: ModelAnalysis | None = None
    """Of the model returned, when a pass alone made it (Keras models only); None after a
    chain (:mod:`tf_balancer.passes.chain`), which costs its result without tracing it."""

    @property
    def rolled_back(self) -> list[str]:
        return [r.name for r in self.records if r.status == "rolled_back"]

    def to_dict(self) -> dict[str, Any]:
        return {"passes": [dataclasses.asdict(r) for r in self.records]}

    def table(self) -> str:
        rows = [("pass", "status", "layers", "params", "FLOPs", "seconds", "message")]
        for r in self.records:
            rows.append(
                (
                    r.name,
                    r.status,
                    f"{r.before['layers']}->{r.after['layers']}",
                    f"{r.before['params']:,}->{r.after['params']:,}",
                    f"{r.before['flops']:,}->{r.after['flops']:,}",
                    f"{r.seconds:.2f}",
                    r.message,
                )
            )
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        return "\n".join(
            "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
        )


def model_stats(model: Any) -> dict[str, int]:
    """Layers, params and FLOPs (batch 1) of a Keras model or a concrete function."""
    return _analysed(model)[0]


def _analysed(model: Any) -> tuple[dict[str, int], ModelAnalysis | None]:
    """:func:`model_stats` and, for a Keras model, its analysis (the next pass's graph)."""
    from tf_balancer.graph.trace import constant_params, op_flops, trace_function

    if is_keras_model(model):
        from tf_balancer.analysis import analyze

        analysis = analyze(model, frozen=False)  # costs are the same; freezing is slow
        return analysis.stats(), analysis
    traced = trace_function(model)
    stats = {
        "layers": len(traced.graph_def.node),
        "params": constant_params(traced.graph_def),
        "flops": sum(op_flops(traced.graph).values()),
    }
    return stats, None


class MetaOptimizer:
    """Runs passes by name, in order, with verification and rollback.

    Args:
        passes: pass names (or ``GraphPass`` instances), in the order to run.
        rtol, atol: output tolerance for function-preserving passes, or None
            (the default) for the row of :data:`tf_balancer.verify.TOLERANCES`
            of the model's compute dtype: 1e-4/1e-5 in float32. In float32 the
            values given are used as they are; in float16 and bfloat16
            (mixed precision) each is the larger of the value given and the
            table's (float16: rtol 2**-9, atol 1e-5 plus 2**-8 of each output's
            largest magnitude), since no pass beats the dtype's rounding.
        fail_on_error: raise :class:`~tf_balancer.errors.PassError` /
            :class:`~tf_balancer.errors.VerificationError` instead of rolling back.
        rollback_log_level: the ``logging`` level of the line logged for a pass
            rolled back. Defaults to ``logging.WARNING``.
        progress_log_level: the level of the line logged after every pass
            (status, seconds, FLOPs before -> after). Defaults to ``logging.DEBUG``.

    Raises:
        ConfigError: unknown pass name (the message lists the registered ones),
            or a pass with non-Keras output (``grappler``) that is not last.
    """

    def __init__(
        self,
        passes: Sequence[str | GraphPass],
        *,
        rtol: float | None = None,
        atol: float | None = None,
        fail_on_error: bool = False,
        rollback_log_level: int = logging.WARNING,
        progress_log_level: int = logging.DEBUG,
    ):
        self.passes = [get_pass(p) if isinstance(p, str) else p for p in passes]
        for p in self.passes[:-1]:
            if not p.keras_output:
                raise ConfigError(f"pass {p.name!r} does not return a Keras model; put it last")
        self.rtol, self.atol, self.fail_on_error = rtol, atol, fail_on_error
        self.rollback_log_level = rollback_log_level
        self.progress_log_level = progress_log_level
        self._outputs = _Outputs()

    @quietly
    def run(
        self,
        model: Any,
        ctx: PassContext | None = None,
        analysis: ModelAnalysis | None = None,
    ) -> tuple[Any, OptimizationReport]:
        """Optimize ``model`` (never modified); returns the new model and the report.

        A subclassed model is optimized through its functional twin (same layers,
        same outputs): what comes back is a functional model.

        Args:
            model: a Keras model (or a concrete function, for graph passes).
            ctx: the passes' context. Defaults to None (an empty one).
            analysis: an analysis made already (weights may have changed since,
                not layers), e.g. the report's ``analysis`` of an earlier run whose
                model was fine-tuned in place: used instead of analysing ``model``
                again when it is ``model``'s (``analysis.model``), else ignored.
                Defaults to None.
        """
        ctx = ctx or PassContext()
        given = model
        if is_keras_model(model):
            model = functional_twin(model)
        probe = ctx.probe_inputs if ctx.probe_inputs is not None else random_inputs(model)
        self._outputs = _Outputs()  # a pass's result is the next pass's reference
        known = analysis is not None and any(analysis.model is m for m in (given, model))
        current = (analysis.stats(), analysis) if known else _analysed(model)
        records: list[PassRecord] = []
        i = 0
        while i < len(self.passes):
            chain = _chain_at(self.passes, i)
            done = self._run_chain(chain, model, current, ctx, probe) if chain else None
            if done is None:
                chain = self.passes[i : i + 1]
                model, current, record = self._run_one(chain[0], model, current, ctx, probe)
                done = model, current, [record]
            model, current, new_records = done
            for record in new_records:
                self._log_progress(record)
            records += new_records
            i += len(chain)
        return model, OptimizationReport(tuple(records), current[1])

    def _log_progress(self, record: PassRecord) -> None:
        logger.log(
            self.progress_log_level,
            "pass %s: %s in %.1f s (FLOPs %s -> %s)",
            record.name,
            record.status,
            record.seconds,
            f"{record.before['flops']:,}",
            f"{record.after['flops']:,}",
        )

    def _run_chain(
        self, chain: Sequence[GraphPass], model: Any, current: tuple, ctx: PassContext, probe: Any
    ) -> tuple[Any, tuple, list[PassRecord]] | None:
        """Several rebuild passes as one (:mod:`tf_balancer.passes.chain`): one model
        built and verified. None when that cannot be done or the result fails
        verification: the caller then runs them one by one, each verified, which
        tells which one fails and rolls back that one only."""
        analysis = current[1]
        if analysis is None:
            return None
        snapshot = _weights_of(model)
        try:
            result = run_chain(chain, model, analysis, ctx)
            _restore_if_mutated(model, snapshot)
            begin = time.perf_counter()
            outcome = Outcome(True)
            if result.model is not model:
                outcome = compare_outputs(
                    model, result.model, probe, self.rtol, self.atol, run=self._outputs
                )
        except Exception as err:  # noqa: BLE001 - the passes then run one by one
            logger.debug("passes %s not run as one chain: %s", [p.name for p in chain], err)
            return None
        if not outcome.ok:
            logger.debug(
                "chain %s failed verification: %s", [p.name for p in chain], outcome.reason
            )
            return None
        shared = result.rebuild_seconds + time.perf_counter() - begin
        records = _chain_records(chain, result, current[0], outcome, shared)
        if all(r.status == "unchanged" for r in records):
            return model, current, records
        return result.model, (records[-1].after, None), records

    def _run_one(
        self, graph_pass: GraphPass, model: Any, current: tuple, ctx: PassContext, probe: Any
    ):
        """One pass; ``current`` is ``(stats, analysis)`` of ``model``, reused (each
        applied pass analyses its result once, and the next pass starts from that)."""
        name = graph_pass.name
        start = time.perf_counter()
        stats, analysis = current
        snapshot = _weights_of(model)
        try:
            graph = analysis.graph if analysis is not None else LayerGraph.from_model(model)
            result = graph_pass.run(model, graph, ctx)
            _restore_if_mutated(model, snapshot)
            outcome = Outcome(True)
            after = current
            if result.changed:
                outcome = self._verify(graph_pass, model, graph, ctx, result.model, probe)
                after = _analysed(result.model) if outcome.ok else current
        except Exception as err:  # any failure of a pass is rolled back, by design
            if self.fail_on_error:
                raise PassError(f"pass {name!r} failed: {err}") from err
            logger.log(self.rollback_log_level, "pass %s failed and was rolled back: %s", name, err)
            return (
                model,
                current,
                PassRecord(
                    name, "rolled_back", f"error: {err}", time.perf_counter() - start, stats, stats
                ),
            )
        seconds = time.perf_counter() - start
        if not outcome.ok:
            if self.fail_on_error:
                raise VerificationError(f"pass {name!r} failed verification: {outcome.reason}")
            logger.log(
                self.rollback_log_level,
                "pass %s failed verification and was rolled back: %s",
                name,
                outcome.reason,
            )
            message = f"verification failed: {outcome.reason}"
            return (
                model,
                current,
                PassRecord(
                    name, "rolled_back", message, seconds, stats, stats, outcome.max_abs_diff
                ),
            )
        if not result.changed:
            return (
                model,
                current,
                PassRecord(
                    name,
                    "unchanged",
                    result.message,
                    seconds,
                    stats,
                    stats,
                    0.0,
                    dict(result.stats),
                ),
            )
        record = PassRecord(
            name,
            "applied",
            result.message,
            seconds,
            stats,
            after[0],
            outcome.max_abs_diff,
            dict(result.stats),
        )
        return result.model, after, record

    def _verify(self, graph_pass, model, graph, ctx, new_model, probe) -> Outcome:
        if graph_pass.preserves_function:
            reference = graph_pass.reference(model, graph, ctx)
            return compare_outputs(
                reference, new_model, probe, self.rtol, self.atol, run=self._outputs
            )
        return compare_signature(model, new_model, probe, run=self._outputs)


def _chain_records(
    chain: Sequence[GraphPass],
    result: Chain,
    before: dict[str, int],
    outcome: Outcome,
    shared_seconds: float,
) -> list[PassRecord]:
    """A record per pass of a verified chain; the last pass that changed something is
    also charged the chain's one rebuild and verification (``shared_seconds``)."""
    applied = [k for k, step in enumerate(result.steps) if step.rewrite]
    names = tuple(chain[k].name for k in applied)
    records = []
    for k, (graph_pass, step) in enumerate(zip(chain, result.steps, strict=True)):
        change = step.rewrite
        records.append(
            PassRecord(
                graph_pass.name,
                "applied" if change else "unchanged",
                change.message if change else graph_pass.nothing_to_do,
                step.seconds + (shared_seconds if applied and k == applied[-1] else 0.0),
                before,
                step.stats,
                outcome.max_abs_diff if change else 0.0,
                dict(change.stats) if change else {},
                names if change else (),
            )
        )
        before = step.stats
    return records


def _chain_at(passes: Sequence[GraphPass], i: int) -> list[GraphPass]:
    """The run of two or more :func:`~tf_balancer.passes.chain.chainable` passes starting
    at ``i``, or an empty list."""
    run = []
    for graph_pass in passes[i:]:
        if not chainable(graph_pass):
            break
        run.append(graph_pass)
    return run if len(run) > 1 else []


class _Outputs:
    """Outputs on the probe batch of the models one run has verified, each computed
    once: the candidate of one pass is the reference of the next (its outputs
    taken before that pass ran)."""

    def __init__(self):
        self._seen: list[tuple[Any, list[np.ndarray]]] = []

    def __call__(self, model: Any, inputs: Any) -> list[np.ndarray]:
        for seen, outputs in self._seen:
            if seen is model:
                return outputs
        outputs = run_model(model, inputs)
        self._seen.append((model, outputs))
        return outputs


def _weights_of(model: Any) -> list[tuple[Any, np.ndarray]] | None:
    """Every variable of a Keras model with a copy of its value (None for other models).
    Entries of ``weights`` that are not variables (tf_keras' lookup layers list a
    vocabulary handler there) are left out."""
    if not is_keras_model(model):
        return None
    return [(v, np.array(v.numpy(), copy=True)) for v in model.weights if hasattr(v, "numpy")]


def _restore_if_mutated(model: Any, snapshot: list[tuple[Any, np.ndarray]] | None) -> None:
    """Restore ``model``'s weights and raise if a pass changed them in place.

    A pass must return a new model; one that writes into its input would change
    the user's model and fool the verifier (its reference would be computed from
    the changed weights), so it is rolled back with the input restored bit for bit.

    Raises:
        PassError: some weight differs from its value before the pass.
    """
    if snapshot is None:
        return
    changed = [v for v, value in snapshot if not np.array_equal(v.numpy(), value)]
    for variable, value in snapshot:
        if any(variable is c for c in changed):
            variable.assign(value)
    if changed:
        names = ", ".join(v.name for v in changed[:3])
        raise PassError(
            f"the pass modified its input model in place ({len(changed)} weights, e.g. {names}); "
            "the input was restored. A pass must return a new model (clone, then change)"
        )

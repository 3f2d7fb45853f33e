"""``BalanceCallback``: cost-aware pruning while ``model.fit`` trains.

Example:
    >>> callback = BalanceCallback(target=0.5, probe_data=(x_train[:256], y_train[:256]),
    ...                            validation_data=(x_val, y_val))      # doctest: +SKIP
    >>> model.fit(x_train, y_train, epochs=8, callbacks=[callback])     # doctest: +SKIP
    >>> callback.export("out/")                                         # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import sys
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from tf_balancer._compat import (
    ensure_keras2_model,
    ensure_keras_model,
    keras,
    resumed_by_backup,
)
from tf_balancer.analysis import ModelAnalysis, analyze
from tf_balancer.attention.balance import (
    METRICS,
    STRATEGIES,
    Bounds,
    KeepPlan,
    allocate,
    check_target,
    lowest_reachable,
)
from tf_balancer.attention.importance import (
    ProbeData,
    attention_weights,
    balance_score,
    check_importance,
    group_scores,
    head_attention,
)
from tf_balancer.attention.streaming import GradientStream
from tf_balancer.errors import ConfigError, UnsupportedModelError
from tf_balancer.graph.walk import clone_flat, functional_twin, weights_of
from tf_balancer.input_shapes import (
    adopt_data_shapes,
    declared_shapes,
    has_open_axes,
    nominal_shapes,
    set_nominal_shapes,
)
from tf_balancer.metrics import output_task_metrics
from tf_balancer.report import log_layer_summaries, task_of, task_scores
from tf_balancer.training.cluster import Cluster
from tf_balancer.training.cluster import supports as cluster_supports
from tf_balancer.training.data_checks import check_callback_data, input_arrays
from tf_balancer.training.finalize import FinalizeInputs, Finalizer
from tf_balancer.training.finetune import FINETUNE_LR_SCALE, FinetuneSettings
from tf_balancer.training.hooks import FitHooks
from tf_balancer.training.ramp import default_schedule, polynomial_ramp
from tf_balancer.training.state import BalanceState, MaskApplier

__all__ = ["BalanceCallback"]

logger = logging.getLogger(__name__)

MODES = ("structured", "sparse")
PROBE_CRITERIA = ("activation", "apoz")  # need probe inputs; taylor can stream from fit


def _ensure_visible_logging() -> None:
    """With ``verbose``, show tf_balancer's info lines even if logging is unconfigured."""
    root = logging.getLogger("tf_balancer")
    if not root.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("tf_balancer: %(message)s"))
        # Stand down once the application configures logging itself (no double lines).
        handler.addFilter(
            lambda record: all(
                isinstance(h, logging.NullHandler) for h in logging.getLogger().handlers
            )
        )
        root.addHandler(handler)
        root.setLevel(logging.INFO)


def _as_probe(data: Any) -> ProbeData | None:
    if data is None or isinstance(data, ProbeData):
        return data
    if isinstance(data, tuple) and len(data) == 2:
        return ProbeData(data[0], data[1])
    return ProbeData(data)


def _adopt_batch_sizes(model: Any, element_spec: Any) -> None:
    """Nominal sizes of ``model``'s open input axes from the spec of ``fit``'s
    batches (``x`` of ``(x, y[, sample_weight])``) where it fixes them."""
    x = element_spec[0] if isinstance(element_spec, tuple) else element_spec
    try:
        arrays = input_arrays(model, "the training data", x)
    except ConfigError:  # a structure fit maps itself; the analysis error says what to do
        return
    adopt_data_shapes(model, arrays)


class BalanceCallback(keras.callbacks.Callback):
    """Balance pruning budgets against cost while training, then compact the model.

    With no arguments it prunes to half the FLOPs using first-order Taylor
    importance accumulated from the gradients of ``fit``'s own training batches
    (no probe data, no extra passes, nothing recompiled).

    During ``fit``, every ``every_n_epochs`` epochs between ``begin_epoch`` and
    ``end_epoch`` the callback recomputes channel importance (from the training
    gradients since the last rebalance, or from ``probe_data``), allocates per-group keep counts for a target that ramps (polynomially, like
    tfmot's ``PolynomialDecay``) from 1 down to ``target``, and masks the pruned
    channels; masks are re-applied after every batch, so training continues on the
    rebalanced network without recompiling. At the end of training the
    :class:`~tf_balancer.optimizer.MetaOptimizer` removes the channels for real,
    optionally fine-tunes, folds BatchNorm and fuses activations, and a report
    compares the dense model (at the first rebalance) with the result. Its
    ``final_flops_ratio`` is measured on the model produced; a pass that cannot
    apply is rolled back and named, with that ratio, in one WARNING line.

    A model not built when ``fit`` starts (subclassed and never called, or a
    ``Sequential`` without an ``Input``) is analysed after ``fit``'s first train
    step builds it; that step trains unmasked and unstreamed. So is a model
    with open input axes, counted at the training batches' sizes (see
    ``input_shape``).

    Each epoch it adds to the Keras ``logs`` (so History, CSVLogger and
    TensorBoard see them; list this callback before those):
    ``balancer/attention_balance``, ``balancer/flops_ratio``,
    ``balancer/params_ratio``, ``balancer/sparsity`` and, with ``validation_data``
    given to the callback, ``balancer/val_accuracy``, ``balancer/val_recall``,
    ``balancer/val_f1`` (classifiers, read as by
    :func:`~tf_balancer.metrics.task_metrics`) or ``balancer/val_mae`` and
    ``balancer/val_rmse`` (other tasks, e.g. regression). For classifiers (read
    from the compiled loss) the train and test steps also compute
    ``macro_recall`` and ``macro_f1``, so ``fit(validation_data=...)`` or
    ``validation_split`` puts ``val_macro_recall`` and ``val_macro_f1`` in
    History every epoch.

    Under ``MirroredStrategy`` or ``MultiWorkerMirroredStrategy`` every worker
    rebalances on the same scores (those from each worker's own ``probe_data`` are
    averaged over all replicas) and applies the chief's plan; only the chief keeps exports and TensorBoard files
    (:mod:`tf_balancer.training.cluster`). With ``BackupAndRestore`` a restarted
    job resumes with the same masks, schedule and gradient sums.

    Args:
        target: fraction of ``target_metric`` to keep, in (0, 1]. Defaults to 0.5.
        target_metric: ``"flops"``, ``"params"`` or ``"latency"``: run time measured
            layer by layer on this machine at batch 32 when training starts
            (:mod:`tf_balancer.graph.latency`, cached on disk); with it, kept
            counts default to multiples of the CPU's vector width
            (``round_to="auto"``), the widths the table's timings hold for.
            Defaults to ``"flops"``.
        mode: ``"structured"`` (channel masks, then compaction: real speed-ups) or
            ``"sparse"`` (tfmot weight pruning; smaller compressed files only; the
            model must be wrapped with ``tf_balancer.sparse.wrapping.wrap_for_pruning(...,
            prune_after_end=True)`` before compiling; ``target`` is then the
            fraction of prunable weights kept). Defaults to ``"structured"``.
        importance: criterion name or ``{name: weight}``; see
            :mod:`tf_balancer.attention.importance`. ``taylor`` streams from the
            training batches unless ``probe_data`` is given; ``activation`` and
            ``apoz`` need ``probe_data``. Defaults to ``"taylor"``.
        strategy: ``"balanced"``, ``"uniform"`` or ``"global"``. Defaults to ``"balanced"``.
        begin_epoch: first epoch (0-based) that rebalances. Defaults to None:
            an eighth of ``fit``'s epochs (at least 1; 0 for a one-epoch ``fit``),
            so the dense model trains first.
        end_epoch: last epoch that may rebalance; the final target is reached
            there. Defaults to None: early enough to leave the last quarter of
            ``fit``'s epochs (at least one) to recover; see
            :func:`tf_balancer.training.ramp.default_schedule`.
        every_n_epochs: rebalance period in epochs. Defaults to 1.
        probe_data: ``(x, y)``, ``x`` or a ``ProbeData`` used for importance
            instead of the training stream (all samples given are used).
            Defaults to None.
        validation_data: ``(x, y)`` for the ``balancer/val_*`` logs and the
            before/after report. Defaults to None.
        passes: passes run at the end of training. Defaults to None:
            ``prune_channels, strip_training_ops, fold_batchnorm, fuse_activation``
            (structured) or the last three (sparse).
        finetune_epochs: epochs of fine-tuning after channel removal: the
            training loss and metrics, a fresh optimizer of the training type at
            ``finetune_lr_scale`` times its current learning rate, ``fit``'s batch
            size; the best epoch on ``validation_data`` is kept (never worse than
            the compacted model). Skipped, with one log line, without
            ``finetune_data``. Defaults to 0.
        finetune_data: ``(x, y)`` or a ``tf.data.Dataset`` for fine-tuning.
            Defaults to None.
        finetune_lr_scale: fraction of the training optimizer's current learning
            rate used for fine-tuning. Defaults to 0.1.
        log_dir: TensorBoard directory for per-layer attention and keep ratios.
            Defaults to None (no summaries).
        min_keep: channels always kept per group. Defaults to 4.
        max_prune_fraction: most of a group that may be pruned. Defaults to 0.9.
        round_to: keep counts are multiples of this; ``"auto"``: the CPU's float32
            vector width (16 with AVX-512, 8 with AVX2), which the compacted model's
            convs run fastest at. Defaults to 1 (``"auto"`` for ``target_metric="latency"``).
        power: exponent of the target ramp. Defaults to 3.
        verbose: 0 silent, 1 one line per rebalance. Defaults to 1.
        input_shape: for a model with open input axes (``keras.Input((None,))``
            for text of any length, ``(None, None, 3)`` for images of any size),
            the sizes at which costs are counted: a shape without the batch axis,
            or a list of them. Defaults to None: the shape of the training
            batches, read when the first one arrives (that step trains
            unmasked). The optimized model keeps its open axes.

    Raises:
        ConfigError: invalid arguments (at construction), missing probe or
            validation data, or probe, validation or fine-tuning data that does
            not fit the model's inputs and outputs (at ``on_train_begin``; see
            :mod:`tf_balancer.training.data_checks`); a parameter-server strategy
            (at ``on_train_begin``).
        UnsupportedModelError: subclassed models whose ``call`` Keras cannot trace
            symbolically, or Keras 3 models in sparse mode (at ``on_train_begin``; for
            a model ``fit`` builds, after its first train step).
    """

    def __init__(
        self,
        target: float = 0.5,
        target_metric: str = "flops",
        mode: str = "structured",
        importance: Any = "taylor",
        strategy: str = "balanced",
        begin_epoch: int | None = None,
        end_epoch: int | None = None,
        every_n_epochs: int = 1,
        probe_data: Any = None,
        validation_data: Any = None,
        passes: Sequence[str] | None = None,
        finetune_epochs: int = 0,
        finetune_data: Any = None,
        finetune_lr_scale: float = FINETUNE_LR_SCALE,
        log_dir: str | None = None,
        min_keep: int = 4,
        max_prune_fraction: float = 0.9,
        round_to: int | str | None = None,
        power: int = 3,
        verbose: int = 1,
        input_shape: Any = None,
    ):
        super().__init__()
        self._prepared_for = None
        check_target(target)
        if target_metric not in METRICS:
            raise ConfigError(f"target_metric must be one of {METRICS}, got {target_metric!r}")
        if target_metric == "latency" and mode != "structured":
            raise ConfigError("target_metric='latency' needs mode='structured' (removed channels)")
        if mode not in MODES:
            raise ConfigError(f"mode must be one of {MODES}, got {mode!r}")
        if strategy not in STRATEGIES:
            raise ConfigError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        if (
            (begin_epoch is not None and begin_epoch < 0)
            or every_n_epochs < 1
            or (end_epoch is not None and end_epoch < (begin_epoch or 0))
        ):
            raise ConfigError(
                "need 0 <= begin_epoch <= end_epoch and every_n_epochs >= 1, got "
                f"begin_epoch={begin_epoch}, end_epoch={end_epoch}, every_n_epochs={every_n_epochs}"
            )
        if finetune_epochs < 0:
            raise ConfigError(f"finetune_epochs must be >= 0, got {finetune_epochs}")
        if not 0.0 < finetune_lr_scale <= 1.0:
            raise ConfigError(f"finetune_lr_scale must be in (0, 1], got {finetune_lr_scale!r}")
        for name, data in (("probe_data", probe_data), ("validation_data", validation_data)):
            if isinstance(data, tf.data.Dataset):
                raise ConfigError(
                    f"{name} must be arrays (x, y), not a tf.data.Dataset; take a few batches: "
                    "x, y = next(iter(dataset.unbatch().batch(512).as_numpy_iterator()))"
                )
        self.target, self.target_metric, self.mode = float(target), target_metric, mode
        check_importance(importance)
        self.importance, self.strategy = importance, strategy
        self.begin_epoch, self.end_epoch, self.every_n_epochs = (
            begin_epoch,
            end_epoch,
            every_n_epochs,
        )
        self.probe = _as_probe(probe_data)
        self.validation_data = validation_data
        self.passes = tuple(passes) if passes is not None else None
        self.finetune_epochs, self.finetune_data = finetune_epochs, finetune_data
        self.finetune_lr_scale = finetune_lr_scale
        self.log_dir = log_dir
        if round_to is None:
            round_to = "auto" if target_metric == "latency" else 1
        self.bounds = Bounds(min_keep, max_prune_fraction, round_to)
        self.power, self.verbose = power, verbose
        self.input_shape = input_shape
        if verbose:
            _ensure_visible_logging()
        self._reset()

    # ----------------------------------------------------------------- state
    def _reset(self) -> None:
        self.analysis: ModelAnalysis | None = None
        self.state: BalanceState | None = None
        self.applier: MaskApplier | None = None
        self._optimized_model = None
        self._trained_digest: bytes | None = None  # the model's weights when it was made
        self._trained_steps: int | None = None  # and its optimizer's step count then
        self.report: dict[str, Any] | None = None
        self.dense_weights: dict[str, list[Any]] | None = None  # cloned at train end
        self.dense_epoch: int | None = None
        self.stream: GradientStream | None = None
        self.hooks: FitHooks | None = None
        self._fallback_logged = False
        self.schedule: list[int] = []
        self._prepare_error: Exception | None = None
        self._synced = -1
        self._diverged = False
        self._attention: dict[int, float] = {}
        self._head_attention: dict[int, list[float]] = {}
        self._writer = None
        self._log_dir_written: str | None = None
        self.cluster: Cluster | None = None
        self._step_callback = None  # tfmot's UpdatePruningStep duties in sparse mode
        self._finished = False
        self._floor = 0.0  # the lowest reachable fraction of the metric
        self._awaiting_build = False
        self._first_step = None  # fit's train function while waiting for the build
        self._hooks_epoch = -1  # hooks installed during this epoch (-1: before the first)
        self._bypass_warned = False
        self._epoch: int | None = None

    def set_model(self, model: Any) -> None:
        """Analyse a new model and attach fresh state before other callbacks restore it.

        ``evaluate``/``predict`` also call ``set_model``; for the model already
        prepared nothing is reset, so the training result survives them.
        """
        super().set_model(model)
        if model is not self._prepared_for:
            self._start_over(model)

    def _start_over(self, model: Any) -> None:
        self._reset()
        self._prepared_for = model
        # A model without input shapes yet (subclassed, or Sequential without an
        # Input, never called) is built by fit's first train step, and one with open
        # input axes is costed at the first batch's sizes: prepare after that step.
        self._awaiting_build = self.mode == "structured" and (
            not getattr(model, "built", True) or self._awaits_sizes(model)
        )
        if self._awaiting_build:
            return
        try:
            self._prepare(model)
        except Exception as err:  # re-raised in on_train_begin, where Keras users expect it
            self._prepare_error = err

    def _awaits_sizes(self, model: Any) -> bool:
        """Open input axes, with no ``input_shape`` given nor nominal sizes known."""
        if self.input_shape is not None or not getattr(model, "inputs", None):
            return False
        return nominal_shapes(model) is None and has_open_axes(declared_shapes(model))

    def _prepare(self, model: Any) -> None:
        model = ensure_keras2_model(model) if self.mode == "sparse" else ensure_keras_model(model)
        if self.input_shape is not None:
            set_nominal_shapes(model, self.input_shape)
        analysed = model
        if self.mode == "sparse":
            import tensorflow_model_optimization as tfmot

            from tf_balancer.sparse.mode import check_sparse_model
            from tf_balancer.sparse.wrapping import strip

            check_sparse_model(model)
            analysed = strip(model)  # shares the wrapped layers' weights
            self._step_callback = tfmot.sparsity.keras.UpdatePruningStep()
            self._step_callback.set_model(model)
        self.analysis = analyze(analysed)
        sizes = {g.id: g.size for g in self.analysis.graph.prunable_groups}
        self.state = BalanceState(sizes, max_rebalances=1024)
        if self._streams() and sizes:
            self.stream = GradientStream(self.analysis.graph)
            self.state.track("stream", self.stream.checkpoint)  # resumed with the masks
        self.state.attach(model)
        if self.mode == "structured" and sizes:
            self.applier = MaskApplier(self.analysis.graph)

    def _check_ready(self) -> None:
        if self._prepare_error is not None:
            raise self._prepare_error
        if getattr(self.model, "optimizer", None) is None:
            raise ConfigError("the model is not compiled; call model.compile(...) before fit")
        needs = [c for c in self._criteria() if c in PROBE_CRITERIA]
        if needs and self.probe is None:
            raise ConfigError(
                f"importance {needs} needs probe_data=(x, y) (a few batches of training data); "
                "or use importance='taylor' (streamed from training), 'magnitude' or 'bn_scale'"
            )
        if "taylor" in self._criteria() and self.probe is not None and self.probe.y is None:
            raise ConfigError(
                "importance 'taylor' with probe_data needs labels: pass probe_data=(x, y), "
                "or leave probe_data out to use the training batches' gradients"
            )
        if self.finetune_epochs and self.finetune_data is not None and self.validation_data is None:
            raise ConfigError(
                "fine-tuning keeps the best epoch on validation data: pass validation_data=(x, y)"
            )
        check_callback_data(self.model, self.probe, self.validation_data, self.finetune_data)

    def _streams(self) -> bool:
        """Taylor importance from the training batches (no probe data given)."""
        return "taylor" in self._criteria() and self.probe is None

    def _criteria(self) -> list[str]:
        return [self.importance] if isinstance(self.importance, str) else list(self.importance)

    def on_train_begin(self, logs=None) -> None:
        if self._finished or (self._awaiting_build and self.model.built):
            self._start_over(self.model)  # reused for another fit, or built since set_model
        if self._awaiting_build:
            self._prepare_after_first_step()
            return
        self._begin()

    def _prepare_after_first_step(self) -> None:
        """Run fit's first train step (which builds the model), then prepare and begin.

        ``fit`` calls ``model.train_function`` once per step: it is replaced by a
        function that runs the original once, then analyses the now built model,
        installs the hooks (which re-trace the train function) and rebalances if
        this epoch is scheduled. That first step runs unmasked and unstreamed.
        """
        model = self.model
        first = model.train_function
        if first is None:  # fit makes it before on_train_begin; nothing to wrap
            raise UnsupportedModelError(
                f"model {model.name!r} is not built; call it once on a batch "
                "(model(x[:1])) before fit, or give it an Input"
            )

        def first_step(*args, **kwargs):
            if args and hasattr(args[0], "element_spec") and self._awaits_sizes(model):
                _adopt_batch_sizes(model, args[0].element_spec)
            logs = first(*args, **kwargs)
            model.train_function = first
            self._awaiting_build = False
            self._prepare(model)
            self._begin()
            if self._epoch is not None:
                self._start_epoch(self._epoch)
            return logs

        self._first_step = first
        model.train_function = first_step

    def _begin(self) -> None:
        self._check_ready()
        self._floor = self._lowest_reachable()
        self.cluster = Cluster.current()
        self.schedule = self._make_schedule(self._epoch or 0)
        in_step = self.applier.apply_in_step if self._masks_in_step() else None
        self.hooks = FitHooks(
            self.model,
            self.stream,
            output_task_metrics(self.model, functional_twin(self.model).outputs),
            in_step,
        )
        self.hooks.install()
        self._hooks_epoch = -1 if self._epoch is None else self._epoch
        if self.log_dir:  # other workers than the chief write a temporary copy
            self._log_dir_written = self.cluster.write_dir(self.log_dir)
            self._writer = tf.summary.create_file_writer(self._log_dir_written)
        if self._step_callback is not None:
            self._step_callback.set_params(self.params)
            self._step_callback.on_train_begin()

    def on_train_batch_begin(self, batch: int, logs=None) -> None:
        if self._step_callback is not None and not self._diverged:
            self._step_callback.on_train_batch_begin(batch, logs)

    # ------------------------------------------------------------- rebalance
    def _sync_masks(self) -> None:
        """Bring masks in line with the (possibly restored) state."""
        done = int(self.state.rebalances.numpy())
        if done and done != self._synced and self.applier is not None:
            plan = KeepPlan(self.state.keep_indices(), self._sizes())
            self.applier.set_plan(plan)
            self.applier.apply()
        self._synced = done

    def _lowest_reachable(self) -> float:
        """The lowest fraction of the metric any plan reaches; warns when it is above
        ``target`` (the callback then prunes as far as it can: training goes on)."""
        if self.mode != "structured":
            return 0.0
        graph = self.analysis.graph
        floor = lowest_reachable(self.analysis, self.target_metric, self.bounds)
        if not graph.prunable_groups:
            plain = ("model input", "reaches a model output")
            reasons = [r for g in graph.groups.values() for r in g.reasons if r not in plain]
            blocked = reasons[0] if reasons else "every channel reaches an input or output"
            warnings.warn(
                f"BalanceCallback: the model has no prunable channel group (e.g. {blocked}); "
                "it trains unpruned. See `tf-balancer inspect` for each layer's reason",
                UserWarning,
                stacklevel=3,
            )
        elif floor > self.target + 1e-9:
            warnings.warn(
                f"BalanceCallback: target {self.target:g} of {self.target_metric} is out of "
                f"reach: with every prunable group at its lower bound the model keeps "
                f"{floor:.3f} (the rest is in layers that cannot be pruned"
                f"{_largest_blocked(self.analysis, self.target_metric)}"
                f"; see `tf-balancer inspect`; or held by min_keep/max_prune_fraction); "
                f"pruning to {floor:.3f}",
                UserWarning,
                stacklevel=3,
            )
        return floor

    def _sizes(self) -> dict[int, int]:
        return {g.id: g.size for g in self.analysis.graph.prunable_groups}

    def target_at(self, epoch: int) -> float:
        """The ramped target of the rebalance at ``epoch`` (1.0 before the first)."""
        if epoch not in self.schedule:
            return float(self.state.target.numpy()) if self.state else 1.0
        r = self.schedule.index(epoch)
        return polynomial_ramp(r, 0, len(self.schedule) - 1, self.target, self.power)

    def on_test_begin(self, logs=None) -> None:
        if self.hooks is not None:
            self.hooks.reset_metrics()

    def _make_schedule(self, first: int) -> list[int]:
        """Rebalance epochs. The default schedule spans the epochs this ``fit`` runs:
        from ``initial_epoch`` (``first``) on, so a model trained dense before is
        pruned on the same ramp; ``begin_epoch``/``end_epoch`` are absolute."""
        epochs = int(self.params.get("epochs", 1)) if self.params else 1
        default = self.begin_epoch is None and self.end_epoch is None
        offset = min(first, max(epochs - 1, 0)) if default else 0
        relative = default_schedule(
            epochs - offset, self.begin_epoch, self.end_epoch, self.every_n_epochs
        )
        return [offset + e for e in relative]

    def on_epoch_begin(self, epoch: int, logs=None) -> None:
        if self._epoch is None and epoch > 0 and self.schedule:
            # fit(initial_epoch=...) starts here; a resumed fit keeps its first schedule
            if not resumed_by_backup(self.model):
                self.schedule = self._make_schedule(epoch)
        self._epoch = epoch
        if self.hooks is not None:
            self.hooks.reset_metrics()
        if not self._awaiting_build:
            self._start_epoch(epoch)

    def _start_epoch(self, epoch: int) -> None:
        """Restore masks after a resume; rebalance if ``epoch`` is scheduled; stream
        gradients only while a rebalance is still to come."""
        if self._diverged:
            return
        if self.stream is not None:
            self.stream.set_active(any(e > epoch for e in self.schedule))
        self._sync_masks()
        if epoch in self.schedule and epoch > int(self.state.epoch.numpy()):
            self._rebalance(epoch)

    def _rebalance(self, epoch: int) -> None:
        if self.dense_weights is None and int(self.state.rebalances.numpy()) == 0:
            self.dense_weights = weights_of(self.analysis.graph.walk)
            self.dense_epoch = epoch
        if self.mode == "structured" and not self.analysis.graph.prunable_groups:
            return  # said once at train begin
        target = max(self.target_at(epoch), self._floor)
        scores = group_scores(self.analysis.graph, *self._signals())
        if self.probe is not None:  # each worker scored its own probe batch: average them
            scores = self.cluster.mean_scores(scores)  # (stream reads and weights agree already)
        self._attention = attention_weights(scores)
        self._head_attention = head_attention(self.analysis.graph, scores)
        if self.mode == "structured":
            plan = None  # the chief allocates; other workers receive its plan, bit for bit
            if self.cluster.is_chief or not self.cluster.multi_worker:
                plan = allocate(
                    self.analysis,
                    scores,
                    target,
                    self.target_metric,
                    self.strategy,
                    self.bounds,
                    # a channel masked before has zero weights and no gradient: it stays out
                    within=self.state.keep_indices(),
                )
            if self.cluster.multi_worker:
                keep = self.cluster.chief_keep(plan.keep if plan else None, self._sizes())
                plan = KeepPlan(keep, self._sizes())
            self.applier.set_plan(plan)
            self.applier.apply()
            keep = plan.keep
        else:
            from tf_balancer.sparse.mode import rebalance_sparsity

            keep = rebalance_sparsity(self, scores, target)
        if self.stream is not None:
            self.stream.reset()
        self.state.record(epoch, target, keep, self._attention)
        self._synced = int(self.state.rebalances.numpy())
        if self.verbose:
            unit = self.target_metric if self.mode == "structured" else "weights kept"
            logger.info("epoch %d: rebalanced to target %.3f %s", epoch + 1, target, unit)

    def _signals(self) -> tuple[Any, Any]:
        """``(signals, importance)`` for this rebalance.

        The training stream when it has seen batches; before the first batch
        (a rebalance at epoch 0) streamed Taylor falls back to ``magnitude``.
        """
        if self.stream is None:
            return self.probe, self.importance
        stream = self.stream.snapshot()  # one read of the sums for the count and the scores
        if stream.batches:
            return stream, self.importance
        if not self._fallback_logged:
            logger.info("no training batch seen yet: this rebalance uses magnitude importance")
            self._fallback_logged = True
        if isinstance(self.importance, str):
            return None, "magnitude"
        weights = dict(self.importance)
        weights["magnitude"] = weights.get("magnitude", 0.0) + weights.pop("taylor")
        return None, weights

    def _masks_in_step(self) -> bool:
        """Masks are applied inside the train step (structured mode)."""
        return self.mode == "structured" and self.applier is not None

    def _implements_train_batch_hooks(self) -> bool:
        # Keras syncs the logs to Python after every batch for callbacks with batch
        # hooks; with in-step masks only tfmot's step counter (sparse mode) needs them.
        # Keras refuses batch hooks under parameter servers with a generic message:
        # on_train_begin refuses them saying what is supported.
        if tf.distribute.has_strategy() and not cluster_supports(tf.distribute.get_strategy()):
            return False
        return self.mode == "sparse"

    def _check_loss(self, logs: Any) -> bool:
        """False (and stop rebalancing, once) when the loss is NaN/inf."""
        loss = (logs or {}).get("loss")
        if loss is None or math.isfinite(float(loss)):
            return True
        self._diverged = True
        warnings.warn(
            "loss is NaN/inf: BalanceCallback stops rebalancing and leaves the weights alone",
            RuntimeWarning,
            stacklevel=3,
        )
        return False

    def on_train_batch_end(self, batch: int, logs=None) -> None:
        if self._diverged or not self._check_loss(logs):
            return
        if self.applier is not None and not (self.hooks and self.hooks.after_update):
            self.applier.apply()

    # ----------------------------------------------------------------- logs
    def current_ratios(self) -> tuple[float, float, float]:
        """``(flops_ratio, params_ratio, sparsity)`` of the current plan."""
        if self.mode == "sparse":
            from tf_balancer.sparse.mode import sparse_ratios

            return sparse_ratios(self)
        counts = {g: len(idx) for g, idx in self.state.keep_indices().items()}
        coster = self.analysis.coster
        flops = coster.total(counts, "flops") / coster.total(None, "flops")
        params = coster.total(counts, "params") / coster.total(None, "params")
        total = sum(self._sizes().values())
        return flops, params, 1.0 - sum(counts.values()) / max(total, 1)

    def on_epoch_end(self, epoch: int, logs=None) -> None:
        if not self._diverged:
            self._check_loss(logs)
        if self._step_callback is not None and not self._diverged:
            self._step_callback.on_epoch_end(epoch, logs)
        self._check_updates_seen(epoch)
        if logs is None or self.state is None:
            return
        flops, params, sparsity = self.current_ratios()
        logs["balancer/attention_balance"] = (
            balance_score(self._attention) if self._attention else 1.0
        )
        logs["balancer/flops_ratio"] = flops
        logs["balancer/params_ratio"] = params
        logs["balancer/sparsity"] = sparsity
        if self.validation_data is not None:
            x, y = self.validation_data[0], self.validation_data[1]
            # The task is read from the compiled loss and the outputs: a subclassed
            # model's are its functional twin's (it has no `outputs` of its own).
            task = task_of(self.model, functional_twin(self.model).outputs)
            scores = task_scores(self.model, x, y, **task)  # accuracy/recall/f1, or mae/rmse
            logs.update({f"balancer/val_{k}": v for k, v in scores.items()})
        if self._writer is not None:
            self._write_summaries(epoch)

    def _check_updates_seen(self, epoch: int) -> None:
        """A train step that updates the weights without ``model.optimizer`` (a custom
        ``train_step`` assigning them itself) bypasses the in-step masks and the
        gradient stream: say so once, and mask after every epoch from then on."""
        hooks = self.hooks
        if hooks is None or hooks.after_update is None or self._hooks_epoch >= epoch:
            return
        if int(hooks.updates.numpy()) == 0:
            if not self._bypass_warned:
                warnings.warn(
                    "the train step updated the weights without going through "
                    "model.optimizer (apply_gradients/apply), so tf_balancer cannot mask "
                    "pruned channels inside it or read its gradients: masks are applied "
                    "after each epoch and rebalances use magnitude importance. Update the "
                    "weights with self.optimizer.apply_gradients(...) in train_step.",
                    UserWarning,
                    stacklevel=2,
                )
                self._bypass_warned = True
            self.applier.apply()

    def _write_summaries(self, epoch: int) -> None:
        graph = self.analysis.graph
        keep = self.state.keep_indices()
        names = {g.id: "+".join(g.nodes("producer")) for g in graph.prunable_groups}
        values = {
            "balancer_attention": {names[g]: a for g, a in self._attention.items()},
            "balancer_keep_ratio": {names[g]: len(keep[g]) / graph.groups[g].size for g in keep},
            "balancer_head_attention": {
                f"{names[g]}/head{i}": a
                for g, heads in self._head_attention.items()
                for i, a in enumerate(heads)
            },
        }
        log_layer_summaries(self._writer, epoch, values)

    # ------------------------------------------------------------ train end
    def on_train_end(self, logs=None) -> None:
        self._finished = True
        if self._awaiting_build:  # fit ran no step: the model was never built
            if self._first_step is not None:
                self.model.train_function = self._first_step
            logger.warning("no training step ran; nothing to prune")
            return
        if self.state is not None:  # the sums served resuming; a saved model needs none
            self.state.untrack("stream")
        if self.hooks is not None:
            self.hooks.remove()
        if self._writer is not None:
            self._writer.close()
            self.cluster.remove_temp(self._log_dir_written, self.log_dir)
        if self._diverged:
            logger.warning("training diverged; skipping compaction and the report")
            return
        self._warn_if_stopped_early()
        if self.applier is not None:  # the model ends as the masked network compacted
            self.applier.apply()
        # Evaluating the user's model (predict) makes Keras attach a new History to it,
        # and fit returns model.history: keep the one this fit filled.
        history = getattr(self.model, "history", None)
        try:
            self.optimized_model, self.report = Finalizer(self.finalize_inputs()).run()
            self._trained_digest = _weights_digest(self.model)
            self._trained_steps = _optimizer_steps(self.model)
        finally:
            if history is not None:
                self.model.history = history

    @property
    def optimized_model(self) -> Any:
        """The compacted, folded and fused model ``fit`` ended with (None before).

        Warns once if the trained model's weights changed after it was made by
        something other than more training (e.g. ``EarlyStopping(restore_best_weights=True)``
        listed after this callback): the optimized model stays the last epoch's pruned
        network. Training the model further after ``fit`` (its optimizer stepped) is the
        user's own business and is not warned about.
        """
        if self._trained_digest is not None and _weights_digest(self.model) != self._trained_digest:
            self._trained_digest = None  # said once
            if _optimizer_steps(self.model) != self._trained_steps:  # trained on after fit
                return self._optimized_model
            warnings.warn(
                "BalanceCallback: the model's weights changed after the optimized model was "
                "made from them (EarlyStopping(restore_best_weights=True) listed after "
                "BalanceCallback?): optimized_model and the report are the last epoch's pruned "
                "network, not the model's current weights. List EarlyStopping before "
                "BalanceCallback: the weights it restores are then pruned to the final plan",
                UserWarning,
                stacklevel=2,
            )
        return self._optimized_model

    @optimized_model.setter
    def optimized_model(self, model: Any) -> None:
        self._optimized_model = model

    def _warn_if_stopped_early(self) -> None:
        """``fit`` ended before the last scheduled rebalance (``EarlyStopping``, a
        ``stop_training``): say what the ramp reached, once."""
        if not self.schedule or self._epoch is None or self._epoch >= self.schedule[-1]:
            return
        reached = float(self.state.target.numpy()) if self.state is not None else 1.0
        warnings.warn(
            f"BalanceCallback: fit ended after epoch {self._epoch + 1}, before the last "
            f"scheduled rebalance (epoch {self.schedule[-1] + 1}; an early stop?): the ramp "
            f"reached target {reached:.3f}, not {self.target:g}. Give end_epoch (0-based) to "
            "reach the target sooner",
            UserWarning,
            stacklevel=3,
        )

    def finalize_inputs(self) -> FinalizeInputs:
        """What the end of training works on: model, plan, data, settings."""
        rebalanced = self.state is not None and int(self.state.rebalances.numpy()) > 0
        if self.dense_weights is not None:
            walk = self.analysis.graph.walk
            dense, dense_epoch = clone_flat(walk, weights=self.dense_weights)[0], self.dense_epoch
        else:  # never rebalanced: the model is dense; resumed: dense weights are gone
            dense, dense_epoch = (None, None) if rebalanced else (self.model, None)
        batch = int(self.hooks.batch_size.numpy()) if self.hooks is not None else 0
        return FinalizeInputs(
            mode=self.mode,
            passes=self.passes,
            model=self.model,
            analysis=self.analysis,
            plan=KeepPlan(self.state.keep_indices(), self._sizes()) if self.state else None,
            finetune=FinetuneSettings(
                epochs=self.finetune_epochs,
                data=self.finetune_data,
                batch_size=batch or 32,
                lr_scale=self.finetune_lr_scale,
            ),
            validation_data=self.validation_data,
            probe_x=self.probe.x if self.probe is not None else None,
            dense_model=dense,
            dense_epoch=dense_epoch,
            attention=self._attention,
            head_attention=self._head_attention,
            attention_history=self.state.attention_history().tolist() if self.state else [],
            settings={
                "target": self.target,
                "target_metric": self.target_metric,
                "strategy": self.strategy,
                "importance": self.importance,
            },
        )

    def export(
        self,
        path: str,
        overwrite: bool = False,
        tflite: bool = False,
        quantize: str | None = None,
    ) -> str:
        """Write the optimized SavedModel, report.json, report.png and report.md atomically.

        Args:
            path: the directory to write.
            overwrite: replace ``path`` if it exists.
            tflite: also write ``model.tflite``, verified against the SavedModel on
                the validation data (its size, accuracy and interpreter latency go
                to ``report["tflite"]``).
            quantize: with ``tflite``: None (float32), ``"dynamic"`` or ``"int8"``
                (calibrated on the fine-tuning, probe or validation inputs).

        Raises:
            ExportError: ``path`` exists and ``overwrite`` is False, or TFLite cannot
                convert the model.
            ConfigError: called before training finished; ``quantize`` without
                ``tflite``, or ``"int8"`` with no data to calibrate on.
            VerificationError: the TFLite model is outside tolerance (nothing written).
        """
        if self.optimized_model is None or self.report is None:
            raise ConfigError(
                "nothing to export yet: call model.fit(..., callbacks=[callback]) first"
            )
        from tf_balancer.export.tflite import check_options
        from tf_balancer.export.writers import export_result

        calibration = self._calibration_inputs() if tflite else None
        check_options(tflite, quantize, calibration is not None)
        options = None
        if tflite:
            options = {
                "quantize": quantize,
                "calibration": calibration,
                "validation_data": self.validation_data,
            }
        # Every worker exports (any collective op inside stays matched); only the
        # chief's copy is kept.
        written = self.cluster.write_path(path) if self.cluster is not None else path
        try:
            export_result(written, self.optimized_model, self.report, overwrite, options)
        finally:
            if self.cluster is not None:
                self.cluster.remove_temp(written, path)
        return os.path.abspath(path)

    def _calibration_inputs(self) -> Any:
        """Inputs to calibrate int8 activations on: fine-tuning, probe or validation data."""
        for data in (self.finetune_data, self.probe, self.validation_data):
            x = getattr(data, "x", None) if isinstance(data, ProbeData) else data
            if isinstance(x, (tuple, list)) and len(x) == 2:
                x = x[0]
            if x is not None:
                return x
        return None


def _optimizer_steps(model: Any) -> int | None:
    """The step count of ``model``'s optimizer (None without one)."""
    iterations = getattr(getattr(model, "optimizer", None), "iterations", None)
    # convert_to_tensor reads a Keras 3 variable and, under a strategy, a mirrored one
    return None if iterations is None else int(tf.convert_to_tensor(iterations))


def _weights_digest(model: Any) -> bytes:
    """A fingerprint of a model's weight values (to notice a later change)."""
    digest = hashlib.blake2b(digest_size=16)
    for weight in model.weights:
        if hasattr(weight, "numpy"):
            digest.update(np.ascontiguousarray(weight.numpy()).tobytes())
    return digest.digest()


def _largest_blocked(analysis: ModelAnalysis, metric: str = "flops") -> str:
    """``", the most FLOPs (N%) behind: <reason>"`` for the non-prunable channel group
    whose layers cost the most (params for ``metric="params"``, else FLOPs), or ""."""
    graph, layers = analysis.graph, analysis.cost.layers
    field, label = ("params", "params") if metric == "params" else ("flops", "FLOPs")
    plain = ("model input", "reaches a model output")
    flops: dict[int, int] = {}
    for node in graph.nodes.values():
        gid = graph.group_of(node.name)
        if gid is not None and node.role in ("producer", "attention", "opaque"):
            flops[gid] = flops.get(gid, 0) + getattr(layers[node.name], field)
    blocked = {
        g: f for g, f in flops.items() if any(r not in plain for r in graph.groups[g].reasons)
    }
    if not blocked:
        return ""
    worst = max(blocked, key=blocked.get)
    reason = next(r for r in graph.groups[worst].reasons if r not in plain)
    share = blocked[worst] / max(getattr(analysis.cost, field), 1)
    return f", the most {label} ({share:.0%}) behind: {reason}"

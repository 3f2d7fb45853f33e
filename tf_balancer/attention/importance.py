"""Channel importance criteria behind a registry, and layer attention weights.

A criterion is a callable ``(graph, probe) -> {node name: scores}`` giving one
score per own channel of every producer layer (output channels of
Conv/Dense/SeparableConv, units of a recurrent layer, heads of an attention layer);
:func:`group_scores` sums the scores of a channel group's producers. Criteria
are interchangeable and can be combined with weights (each is first divided by
its mean over all prunable channels so the weights mean what they say).

Built-in criteria:
    ``magnitude``   L1 norm of the channel's output-side weights (``p=2`` for L2).
    ``taylor``      first-order Taylor: ``|sum(w * dL/dw)|`` over the channel's
                    weights, accumulated over the training batches during ``fit``
                    (a :class:`GradientStream`) or over probe batches (needs labels).
    ``activation``  mean ``|a|`` of the channel over probe batches, measured
                    after the BatchNorm/activation the producer feeds (attention
                    heads, which have no tensor of their own, get their weight
                    magnitude scaled to the criterion's mean; also for ``apoz``).
    ``apoz``        ``1 - APoZ`` (average percentage of zeros) at the same point.
    ``bn_scale``    ``|gamma|`` of the BatchNormalization layers in the group.

Example:
    >>> scores = group_scores(graph, ProbeData(x), "magnitude")  # doctest: +SKIP
    >>> weights = attention_weights(scores)                      # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import tensorflow as tf

from tf_balancer.attention.streaming import GradientStream, producer_weights, weight_times_gradient
from tf_balancer.errors import BalanceError, ConfigError
from tf_balancer.graph.layer_graph import LayerGraph
from tf_balancer.graph.layer_specs import per_channel, spec_for, weights_on
from tf_balancer.graph.walk import rebuild
from tf_balancer.metrics import per_output

__all__ = [
    "check_importance",
    "ProbeData",
    "register_importance",
    "registered_importances",
    "get_importance",
    "group_scores",
    "attention_weights",
    "head_attention",
    "balance_score",
]

Criterion = Callable[[LayerGraph, "ProbeData"], dict[str, np.ndarray]]


@dataclasses.dataclass(frozen=True)
class ProbeData:
    """Probe batches for data-driven criteria; nothing is downloaded.

    Attributes:
        x: model inputs (array or list of arrays), split into ``batch_size`` batches.
        y: labels, needed by ``taylor``.
        loss: ``loss(y_true, y_pred) -> scalar``; defaults to the model's compiled loss.
        batch_size: probe batch size.
        max_batches: at most this many batches are used; None (the default) uses
            every sample given.
    """

    x: Any
    y: Any = None
    loss: Callable[[Any, Any], Any] | None = None
    batch_size: int = 64
    max_batches: int | None = None

    def batches(self) -> list[tuple[Any, Any]]:
        """``(x, y)`` batches; ``x`` and ``y`` may be arrays or the nested lists,
        tuples and dicts of arrays ``fit`` accepts (sliced leaf by leaf)."""
        n = len(tf.nest.flatten(self.x)[0])
        out = []
        for start in range(0, n, self.batch_size)[: self.max_batches]:
            sl = slice(start, start + self.batch_size)
            cut = lambda value, sl=sl: tf.nest.map_structure(lambda a: a[sl], value)  # noqa: E731
            xb = list(cut(self.x)) if isinstance(self.x, tuple) else cut(self.x)
            out.append((xb, None if self.y is None else cut(self.y)))
        return out


_REGISTRY: dict[str, Criterion] = {}


def register_importance(name: str) -> Callable[[Criterion], Criterion]:
    """Decorator registering a criterion under ``name`` (a duplicate raises)."""

    def decorate(fn: Criterion) -> Criterion:
        if name in _REGISTRY:
            raise ValueError(f"importance criterion {name!r} is already registered")
        _REGISTRY[name] = fn
        return fn

    return decorate


def registered_importances() -> list[str]:
    return sorted(_REGISTRY)


def get_importance(name: str) -> Criterion:
    if name not in _REGISTRY:
        raise ConfigError(
            f"unknown importance criterion {name!r}; choose one of {registered_importances()}"
        )
    return _REGISTRY[name]


def _producers(graph: LayerGraph):
    for group in graph.prunable_groups:
        for name in group.nodes("producer"):
            yield name, graph.nodes[name]


def _out_axis_reduce(node, fn: Callable[[np.ndarray, int], np.ndarray]) -> np.ndarray:
    """Apply ``fn(weight, axis)`` to each of the node's own-channel weights; sum per channel."""
    spec = spec_for(node.layer, len(node.input_shapes[0]))
    total = 0.0
    for axis, weight in weights_on(node.layer, spec.out_axes):
        total = total + per_channel(fn(np.asarray(weight), axis.axis), axis.blocks)
    return np.asarray(total, dtype=np.float64)


def _sum_except(array: np.ndarray, axis: int) -> np.ndarray:
    return array.sum(axis=tuple(i for i in range(array.ndim) if i != axis))


@register_importance("magnitude")
def magnitude(graph: LayerGraph, probe: ProbeData | None, p: int = 1) -> dict[str, np.ndarray]:
    """L1 (``p=1``) or L2 norm of each output channel's weights."""
    return {name: _norm(node, p) for name, node in _producers(graph)}


def _norm(node, p: int = 1) -> np.ndarray:
    """Lp norm of each of the node's own channels' weights."""
    return _out_axis_reduce(node, lambda w, ax: _sum_except(np.abs(w) ** p, ax)) ** (1 / p)


@register_importance("bn_scale")
def bn_scale(graph: LayerGraph, probe: ProbeData | None) -> dict[str, np.ndarray]:
    """|gamma| of the group's BatchNorm layers, given to each producer (1 if none)."""
    scores = {}
    for group in graph.prunable_groups:
        gammas = [
            np.abs(graph.nodes[m.node].layer.gamma.numpy()[m.offset : m.offset + group.size])
            for m in group.members
            if m.role == "passthrough"
            and graph.nodes[m.node].class_name == "BatchNormalization"
            and graph.nodes[m.node].layer.gamma is not None
        ]
        value = np.sum(gammas, axis=0) if gammas else np.ones(group.size)
        producers = group.nodes("producer")
        for name in producers:
            scores[name] = value / len(producers)
    return scores


def _require_probe(probe: ProbeData | None, criterion: str, labels: bool = False) -> ProbeData:
    if probe is None or (labels and probe.y is None):
        need = "inputs and labels" if labels else "inputs"
        raise ConfigError(
            f"importance {criterion!r} needs probe data ({need}); pass probe_data=(x, y) "
            "or choose importance='magnitude' or 'bn_scale'."
        )
    return probe


@register_importance("taylor")
def taylor(graph: LayerGraph, probe: ProbeData | GradientStream | None) -> dict[str, np.ndarray]:
    """First-order Taylor ``|sum_w w * dL/dw|`` per output channel.

    From a :class:`~tf_balancer.attention.streaming.GradientStream` (the training
    batches' gradients, accumulated during ``fit``) or from probe batches.
    """
    if isinstance(probe, GradientStream):
        return probe.scores()
    probe = _require_probe(probe, "taylor", labels=True)
    model = rebuild(graph.walk, lambda call: call.layer)  # shares the original weights
    loss_fn = probe.loss or _default_loss(graph)
    owners = producer_weights(graph)
    variables = [weight for _, weight, _ in owners]

    def gradients(xb: Any, yb: Any) -> list[Any]:
        with tf.GradientTape() as tape:
            loss = loss_fn(yb, model(xb, training=False))
        return tape.gradient(loss, variables)

    scores = {name: 0.0 for name, _ in _producers(graph)}
    for xb, yb in probe.batches():
        grads = _replicated(gradients, xb, tf.nest.map_structure(tf.convert_to_tensor, yb))
        channels: dict[str, Any] = {}
        for (name, var, axis), grad in zip(owners, grads, strict=True):
            if grad is not None:
                product = weight_times_gradient(var, grad, [axis.axis]).numpy()
                contrib = _sum_except(product, axis.axis)
                channels[name] = channels.get(name, 0.0) + per_channel(contrib, axis.blocks)
        for name, value in channels.items():
            scores[name] = scores[name] + np.abs(value)
    return {name: np.asarray(v, dtype=np.float64) for name, v in scores.items()}


def _replicated(fn: Callable[..., list[Any]], *args: Any) -> list[Any]:
    """``fn(*args)``; inside a ``tf.distribute`` scope (e.g. a callback during a
    distributed ``fit``) it runs in replica context, where distributed variables
    can be differentiated, and the replicas' results are averaged."""
    if not tf.distribute.has_strategy() or tf.distribute.in_cross_replica_context() is False:
        return fn(*args)
    strategy = tf.distribute.get_strategy()
    per_replica = strategy.run(fn, args=args)
    return [
        None if g is None else strategy.reduce(tf.distribute.ReduceOp.MEAN, g, axis=None)
        for g in per_replica
    ]


def _default_loss(graph: LayerGraph) -> Callable[[Any, Any], Any]:
    """The model's compiled loss as ``loss(y, predictions) -> scalar``.

    Not ``compiled_loss``, which also updates the loss metrics. A model with
    several outputs gets the weighted sum of its per-output losses (``loss`` and
    ``loss_weights`` as dicts by output name, lists in output order, or one loss
    for every output); labels as ``fit`` takes them (a dict by output name or a
    list in output order).
    """
    model = getattr(graph, "model", None)
    loss = getattr(model, "loss", None)
    outputs = list(getattr(model, "outputs", None) or [])
    if loss is None:
        raise ConfigError(
            "taylor importance needs the model's loss: compile the model or pass "
            "ProbeData(loss=...)"
        )
    if len(outputs) <= 1 and not isinstance(loss, (dict, list, tuple)):
        return _shaped(_per_sample_mean(loss))
    from tf_balancer._compat import adapter_for

    names = adapter_for(model).output_names(model)
    weights = _loss_weights(model)
    heads = []
    for index, name in enumerate(names):
        head = per_output(loss, index, name)
        if head is not None:
            weight = per_output(weights, index, name, default=1.0)
            heads.append((name, _shaped(_per_sample_mean(head)), weight))

    def total(y: Any, predictions: Any) -> Any:
        labels = y if isinstance(y, dict) else dict(zip(names, tf.nest.flatten(y), strict=True))
        if isinstance(predictions, dict):
            outs = predictions
        else:
            outs = dict(zip(names, tf.nest.flatten(predictions), strict=True))
        return tf.add_n([float(w) * fn(labels[name], outs[name]) for name, fn, w in heads])

    return total


def _loss_weights(model: Any) -> Any:
    config = model.get_compile_config() if hasattr(model, "get_compile_config") else None
    return (config or {}).get("loss_weights")


def _per_sample_mean(loss: Any) -> Callable[[Any, Any], Any]:
    """A loss (name, ``Loss`` or function) as ``(y, p) -> mean over samples``."""
    from tf_balancer._compat import keras

    if isinstance(loss, str):
        loss = keras.losses.get(loss)
    if isinstance(loss, keras.losses.Loss):
        # Per-sample losses, averaged here: a Loss built under a tf.distribute scope
        # refuses automatic reduction outside ``fit``.
        config = dict(loss.get_config(), reduction=keras.losses.Reduction.NONE)
        per_sample = type(loss).from_config(config)
        return lambda y, p: tf.reduce_mean(per_sample(y, p))
    if callable(loss):
        return lambda y, p: tf.reduce_mean(loss(y, p))
    raise ConfigError(
        f"taylor importance cannot use the compiled loss {loss!r}: pass ProbeData(loss=...)"
    )


def _shaped(loss_fn: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
    """``loss_fn`` with ``(n,)`` labels reshaped to ``(n, 1)`` outputs (and the like)."""

    def call(y: Any, p: Any) -> Any:
        y = tf.convert_to_tensor(y)
        if y.shape.num_elements() == p.shape.num_elements() and y.shape != p.shape:
            y = tf.reshape(y, p.shape)
        return loss_fn(y, p)

    return call


def _activation_stats(graph: LayerGraph, probe: ProbeData) -> dict[str, tuple[np.ndarray, ...]]:
    """Per producer: (mean |a|, APoZ) of its channels where its consumers see them.

    The measuring point follows the producer through the per-channel layers it
    alone feeds (BatchNorm, activation, dropout), so APoZ - the average
    percentage of zeros - is taken after the ReLU, where it means something.
    """
    producers = {name: node for name, node in _producers(graph) if node.role == "producer"}
    keys = [_output_key(graph, _after_chain(graph, name)) for name in producers]
    model = rebuild(graph.walk, lambda call: call.layer, outputs=keys)
    abs_sum = {name: 0.0 for name in producers}
    zero_sum = {name: 0.0 for name in producers}
    count = 0
    for xb, _ in probe.batches():
        outs = model(xb, training=False)
        outs = outs if isinstance(outs, (list, tuple)) else [outs]
        for name, out in zip(producers, outs, strict=True):
            a = np.asarray(out).reshape(-1, out.shape[-1])
            abs_sum[name] = abs_sum[name] + np.abs(a).mean(axis=0)
            zero_sum[name] = zero_sum[name] + (a == 0).mean(axis=0)
        count += 1
    count = max(count, 1)
    return {
        name: (np.asarray(abs_sum[name] / count), np.asarray(zero_sum[name] / count))
        for name in producers
    }


def _after_chain(graph: LayerGraph, name: str) -> str:
    """Last node of the single-consumer per-channel chain that starts at ``name``."""
    while True:
        consumers = graph.consumers(name)
        if len(consumers) != 1:
            return name
        nxt = graph.nodes[consumers[0]]
        if nxt.role != "passthrough" or len(nxt.inputs) != 1:
            return name
        name = nxt.name


@register_importance("activation")
def activation(graph: LayerGraph, probe: ProbeData | None) -> dict[str, np.ndarray]:
    """Mean |activation| of each producer's channels (after its BN/activation) over probe batches."""
    stats = _activation_stats(graph, _require_probe(probe, "activation"))
    scores = {name: mean_abs.astype(np.float64) for name, (mean_abs, _) in stats.items()}
    return _with_heads(graph, scores)


@register_importance("apoz")
def apoz(graph: LayerGraph, probe: ProbeData | None) -> dict[str, np.ndarray]:
    """``1 - APoZ``: the fraction of probe positions where a channel is non-zero.

    A channel that a ReLU zeroes almost everywhere (high APoZ) carries little
    information (Hu et al., 2016, "Network Trimming").
    """
    stats = _activation_stats(graph, _require_probe(probe, "apoz"))
    scores = {name: (1.0 - zeros).astype(np.float64) for name, (_, zeros) in stats.items()}
    return _with_heads(graph, scores)


def _with_heads(graph: LayerGraph, scores: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``scores`` plus the attention heads, which have no tensor of their own to
    measure: a head gets its weight magnitude, scaled to the mean of ``scores``."""
    heads = {name: node for name, node in _producers(graph) if node.role == "attention"}
    if not heads:
        return scores
    mean = float(np.mean(np.concatenate(list(scores.values())))) if scores else 1.0
    for name, node in heads.items():
        size = _norm(node)
        scores[name] = size / (float(np.mean(size)) or 1.0) * mean
    return scores


def _output_key(graph: LayerGraph, node_name: str) -> str:
    for call in graph.walk.calls:
        if call.name == node_name:
            return call.outputs[0]
    raise KeyError(node_name)


def check_importance(importance: Any) -> dict[str, float]:
    """The criteria weights of ``importance`` (a criterion's name or ``{name: weight}``),
    checked, so a typo fails when the callback is made, not after an epoch of training.

    Example:
        >>> check_importance({"taylor": 0.5, "magnitude": 0.5})
        {'taylor': 0.5, 'magnitude': 0.5}

    Raises:
        ConfigError: an unknown criterion, or weights negative, not finite or all 0.
    """
    if not isinstance(importance, (str, Mapping)):
        raise ConfigError(
            f"importance must be a criterion's name or a dict of weights, got {importance!r}; "
            f"criteria: {registered_importances()}"
        )
    weights = _criteria(importance)
    for name in weights:
        get_importance(name)
    return weights


def _criteria(importance: str | Mapping[str, float]) -> dict[str, float]:
    weights = {importance: 1.0} if isinstance(importance, str) else dict(importance)
    if not weights or any(w < 0 or not math.isfinite(w) for w in weights.values()):
        raise ConfigError(f"importance weights must be finite and >= 0, got {weights}")
    if sum(weights.values()) <= 0:
        raise ConfigError("importance weights must not all be 0")
    return weights


def group_scores(
    graph: LayerGraph, probe: ProbeData | None, importance: str | Mapping[str, float] = "magnitude"
) -> dict[int, np.ndarray]:
    """Per-channel importance of every prunable group (one score per channel).

    Args:
        graph: the layer graph (``graph.model`` is used for the default loss).
        probe: probe batches (``taylor`` and ``activation`` need them).
        importance: a criterion name, or ``{name: weight}`` to combine several.

    Returns:
        group id -> non-negative float64 array of the group's size.

    Raises:
        ConfigError: unknown criterion, bad weights, or missing probe data.
        BalanceError: the model has no prunable channel group.
    """
    groups = graph.prunable_groups
    if not groups:
        raise BalanceError(
            "the model has no prunable channel group (every group reaches a model output, an "
            "input, or a layer tf_balancer does not understand); see `tf-balancer inspect`."
        )
    combined = {g.id: np.zeros(g.size) for g in groups}
    for name, weight in _criteria(importance).items():
        per_node = get_importance(name)(graph, probe)
        per_group = {
            g.id: np.sum([per_node[p] for p in g.nodes("producer")], axis=0) for g in groups
        }
        scale = np.mean(np.concatenate(list(per_group.values()))) or 1.0
        for gid, scores in per_group.items():
            combined[gid] += weight * scores / scale
    for gid, scores in combined.items():
        if not np.all(np.isfinite(scores)) or np.any(scores < 0):
            raise BalanceError(f"importance scores of group {gid} are negative or not finite")
    return combined


def attention_weights(scores: Mapping[int, np.ndarray]) -> dict[int, float]:
    """Each group's share of the total importance (sums to 1 over the groups)."""
    totals = {gid: float(np.sum(s)) for gid, s in scores.items()}
    total = sum(totals.values())
    if total <= 0:
        return {gid: 1.0 / len(totals) for gid in totals}
    return {gid: t / total for gid, t in totals.items()}


def head_attention(graph: LayerGraph, scores: Mapping[int, np.ndarray]) -> dict[int, list[float]]:
    """Each attention head's share of the total importance, per group of heads (a
    layer's heads add up to its :func:`attention_weights` entry).

    Example:
        >>> head_attention(graph, scores)[3]   # doctest: +SKIP
        [0.06, 0.02, 0.07, 0.04]
    """
    total = float(sum(np.sum(s) for s in scores.values())) or 1.0
    return {
        gid: (np.asarray(s, dtype=np.float64) / total).tolist()
        for gid, s in scores.items()
        if any(graph.nodes[n].role == "attention" for n in graph.groups[gid].nodes("producer"))
    }


def balance_score(weights: Mapping[int, float]) -> float:
    """Normalized entropy of the attention distribution: 1 = perfectly even."""
    p = np.asarray([w for w in weights.values() if w > 0], dtype=np.float64)
    if len(weights) <= 1:
        return 1.0
    return float(-(p * np.log(p)).sum() / math.log(len(weights)))

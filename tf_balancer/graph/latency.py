"""A per-layer latency table measured on this machine, for ``target_metric="latency"``.

Each layer call is rebuilt alone (a one-layer Keras model, random weights) and
timed at the table's batch size twice: at full width and with every prunable
group at half its channels. Its run time is then modelled as
``t0 + slope * work``, ``work`` being what the cost model says the layer does
under a plan - its FLOPs, or the elements it writes for a layer without FLOPs
(ReLU, pooling, merges) - so the total latency of any plan stays a quadratic in
the keep counts and the allocator optimises it exactly as it does FLOPs. A layer
that cannot be rebuilt alone is timed at full width only and scaled with its work.

Measurements are cached on disk (``~/.cache/tf_balancer/latency.json``, or
``$TF_BALANCER_CACHE``), keyed by layer type, config, input shapes, batch size,
CPU, usable cores and TensorFlow's thread pools: the second analysis of a model
costs nothing.

Example:
    >>> table = measure_latency(analysis, batch_size=32)   # doctest: +SKIP
    >>> analysis.coster.total(None, "latency")             # seconds, dense  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
import time
from typing import Any

import numpy as np
import tensorflow as tf

from tf_balancer._compat import adapter_for
from tf_balancer.graph.layer_specs import plan_overrides
from tf_balancer.graph.walk import clone_layer
from tf_balancer.hardware import usable_cores

__all__ = ["measure_latency", "cache_path"]

REPEATS = 15
WARMUP = 2
BATCH_SIZE = 32
"""The table's default batch size."""


def cache_path() -> str:
    root = os.environ.get("TF_BALANCER_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "tf_balancer"
    )
    return os.path.join(root, "latency.json")


def measure_latency(analysis: Any, batch_size: int = BATCH_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """Fit ``(t0, slope)`` per layer of ``analysis`` (seconds) and give them to its coster.

    Every timing has the cost of calling a one-layer function subtracted (measured
    the same way on a layer that does nothing), so that the layers' sum is the
    model's compute, not one call overhead per layer.

    Returns:
        ``(t0, slope)`` arrays in the coster's layer order.
    """
    coster = analysis.coster
    graph = analysis.graph
    half = {g.id: max(g.blocks, g.size // 2 // g.blocks * g.blocks) for g in graph.prunable_groups}
    rows = coster.work_rows()
    work = coster.evaluate(rows, None), coster.evaluate(rows, half)
    cache = _load_cache()
    t0, slope = np.zeros(len(coster.names)), np.zeros(len(coster.names))
    for row, name in enumerate(coster.names):
        node = graph.nodes[name]
        full = _timed(node, None, batch_size, cache)
        small = _timed(node, half, batch_size, cache) if work[0][row] > work[1][row] else None
        t0[row], slope[row] = _fit(full, small, work[0][row], work[1][row])
    _save_cache(cache)
    coster.latency = (t0, slope)
    return t0, slope


def _fit(full: float, small: float | None, w_full: float, w_small: float) -> tuple[float, float]:
    """``t = t0 + slope * w`` through two timings; through the origin when the two
    do not give a positive slope and intercept (noise, or a layer the plan cannot change)."""
    if small is not None and w_full > w_small and full > small:
        slope = (full - small) / (w_full - w_small)
        t0 = full - slope * w_full
        if t0 >= 0:
            return t0, slope
    if w_full > 0 and small is not None:
        return 0.0, full / w_full
    return full, 0.0


def _timed(node: Any, keep: dict[int, int] | None, batch: int, cache: dict) -> float:
    shapes = [
        _channels_under(shape, layout, keep)
        for shape, layout in zip(node.input_shapes, node.in_layouts, strict=True)
    ]
    overrides = _overrides(node, keep)
    key = _key(node, shapes, overrides, batch)
    if key not in cache:
        cache[key] = _time_layer(node, shapes, overrides, batch)
    keras = adapter_for(node.layer).keras
    return max(cache[key] - _call_overhead(keras, shapes, batch, cache), 0.0)


def _call_overhead(keras: Any, shapes: list[tuple], batch: int, cache: dict) -> float:
    """Seconds of calling a one-layer function that only passes its first input on."""
    key = _key_for(f"overhead/{keras.__name__}", {}, {}, shapes, batch)
    if key not in cache:
        identity = lambda keras, inputs: keras.layers.Activation("linear")(inputs[0])  # noqa: E731
        cache[key] = _time_model(identity, shapes, batch, keras)
    return cache[key]


def _channels_under(shape: tuple, layout: Any, keep: dict[int, int] | None) -> tuple:
    if keep is None or layout is None:
        return tuple(shape)
    width = sum(keep.get(s.group, s.size) for s in layout.segments) * layout.spatial
    return (*tuple(shape)[:-1], width)


def _overrides(node: Any, keep: dict[int, int] | None) -> dict[str, Any]:
    if keep is None or node.channel_layout is None:
        return {}
    own = node.channel_layout.segments[0]
    out = _channels_under(node.output_shape, node.out_layout, keep)[-1]
    return plan_overrides(node.layer, node.role, keep.get(own.group, own.size), out)


def _key(node: Any, shapes: list[tuple], overrides: dict, batch: int) -> str:
    config = {k: v for k, v in node.layer.get_config().items() if k != "name"}
    return _key_for(node.class_name, config, overrides, shapes, batch)


def _key_for(kind: str, config: dict, overrides: dict, shapes: list[tuple], batch: int) -> str:
    text = json.dumps(
        [kind, config, overrides, [list(s[1:]) for s in shapes], batch, _cpu()],
        sort_keys=True,
        default=str,
    )
    return hashlib.sha1(text.encode()).hexdigest()


def _cpu() -> str:
    """What the measured times depend on besides the layer: the CPU, the cores this
    process may use, and TensorFlow's thread pools (a layer timed on two intra-op
    threads is not the same layer on one: at small sizes handing work to the second
    thread costs more than it gains)."""
    threading = tf.config.threading
    pools = (
        threading.get_intra_op_parallelism_threads(),
        threading.get_inter_op_parallelism_threads(),
    )
    cores = f"{os.cpu_count()}|{usable_cores()}"
    return f"{platform.machine()}|{platform.processor()}|{cores}|{pools}"


def _time_layer(node: Any, shapes: list[tuple], overrides: dict, batch: int) -> float:
    """Median seconds of one call of the layer alone on ``shapes`` inputs."""

    def call(keras: Any, inputs: list[Any]) -> Any:
        layer = clone_layer(node.layer, **overrides)
        if node.role == "attention":
            return layer(inputs[0], inputs[0])
        return layer(inputs[0] if len(inputs) == 1 else inputs)

    return _time_model(call, shapes, batch, adapter_for(node.layer).keras)


def _time_model(call: Any, shapes: list[tuple], batch: int, keras: Any) -> float:
    try:
        inputs = [keras.Input(tuple(s[1:])) for s in shapes]
        model = keras.Model(inputs, call(keras, inputs))
    except Exception:  # noqa: BLE001 - a layer that cannot stand alone: no measurement
        return 0.0
    fn = tf.function(lambda xs: model(xs, training=False))
    rng = np.random.default_rng(0)
    xs = [tf.constant(rng.random((batch, *s[1:]), dtype=np.float32)) for s in shapes]
    xs = xs[0] if len(xs) == 1 else xs
    for _ in range(WARMUP):
        tf.nest.map_structure(np.asarray, fn(xs))
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        tf.nest.map_structure(np.asarray, fn(xs))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _load_cache() -> dict:
    try:
        with open(cache_path(), encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return {}


def _save_cache(cache: dict) -> None:
    path = cache_path()
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump(cache, handle)
        os.replace(tmp, path)
    except OSError:  # a read-only home: measure again next time
        pass

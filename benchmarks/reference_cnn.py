"""The reference CNN of the compaction benchmark, and its optimized variants.

``build_reference_cnn`` is a plain, GPU/CPU-friendly network: five 3x3
Conv+BatchNorm+ReLU blocks at full 32x32 resolution, then GlobalAveragePooling
and a Dense(10) head. Each conv's output channels form a prunable group; the
head's units are model outputs and stay, so pruning narrows the five convs.

Two helpers produce the pairs the benchmark compares:

* :func:`dense_and_compact` - magnitude scores, the balanced allocation at a
  FLOPs target, and the ``prune_channels`` pass run through ``MetaOptimizer``
  with ``PassContext(plan=...)`` (verified against the masked model).
* :func:`dense_and_folded` - ``fold_batchnorm`` then ``fuse_activation``
  (function preserving, verified against the dense model).

Example:
    >>> dense, compact = dense_and_compact(target=0.5)   # doctest: +SKIP
    >>> compact.count_params() < dense.count_params()    # doctest: +SKIP
    True
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tf_balancer._compat import keras

__all__ = [
    "build_reference_cnn",
    "dense_and_compact",
    "compact_copy",
    "dense_and_folded",
    "randomize_batchnorm",
]

INPUT_SHAPE = (32, 32, 3)
BLOCKS = 5
CLASSES = 10


def randomize_batchnorm(model: Any, seed: int) -> Any:
    """Non-trivial BN statistics, so that folding does real work (in place)."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            gamma, beta, mean, variance = layer.get_weights()
            layer.set_weights(
                [
                    rng.uniform(0.5, 1.5, gamma.shape).astype("float32"),
                    rng.normal(0.0, 0.2, beta.shape).astype("float32"),
                    rng.normal(0.0, 0.2, mean.shape).astype("float32"),
                    rng.uniform(0.5, 2.0, variance.shape).astype("float32"),
                ]
            )
    return model


def build_reference_cnn(width: int = 64, seed: int = 0) -> keras.Model:
    """Five 3x3 Conv+BN+ReLU blocks (``width`` filters each) on 32x32x3, GAP, Dense(10).

    Args:
        width: filters of every conv.
        seed: seeds the initial weights and the random BN statistics.

    Returns:
        A tf_keras functional model producing logits (no softmax).
    """
    keras.utils.set_random_seed(seed)
    inputs = keras.Input(INPUT_SHAPE, name="image")
    x = inputs
    for i in range(1, BLOCKS + 1):
        x = keras.layers.Conv2D(width, 3, padding="same", use_bias=False, name=f"conv{i}")(x)
        x = keras.layers.BatchNormalization(name=f"bn{i}")(x)
        x = keras.layers.ReLU(name=f"relu{i}")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    outputs = keras.layers.Dense(CLASSES, name="logits")(x)
    model = keras.Model(inputs, outputs, name="reference_cnn")
    return randomize_batchnorm(model, seed)


def dense_and_compact(
    target: float = 0.5, width: int = 64, seed: int = 0, round_to: int | str = 1
) -> tuple[keras.Model, keras.Model]:
    """The reference CNN and its channel-pruned copy at ``target`` of its FLOPs
    (kept counts rounded to ``round_to``; ``"auto"``: the CPU's vector width).

    Raises:
        tf_balancer.errors.PassError / VerificationError: the compaction failed.
    """
    dense = build_reference_cnn(width, seed)
    return dense, compact_copy(dense, target, round_to)


def compact_copy(dense: keras.Model, target: float, round_to: int | str = 1) -> keras.Model:
    """``dense`` with channels removed to ``target`` of its FLOPs: magnitude scores,
    the balanced allocation, ``prune_channels`` verified against the masked model."""
    from tf_balancer.analysis import analyze
    from tf_balancer.attention.balance import Bounds, allocate
    from tf_balancer.attention.importance import group_scores
    from tf_balancer.optimizer import MetaOptimizer
    from tf_balancer.passes.base import PassContext

    analysis = analyze(dense)
    scores = group_scores(analysis.graph, None, "magnitude")
    plan = allocate(analysis, scores, target, bounds=Bounds(round_to=round_to))
    optimizer = MetaOptimizer(["prune_channels"], fail_on_error=True)
    compact, _ = optimizer.run(dense, PassContext(plan=plan))
    return compact


def dense_and_folded(
    width: int = 64, seed: int = 0, fuse: bool = True
) -> tuple[keras.Model, keras.Model]:
    """The reference CNN and its BN-folded (and, with ``fuse``, activation-fused) copy."""
    from tf_balancer.optimizer import MetaOptimizer

    dense = build_reference_cnn(width, seed)
    passes = ["fold_batchnorm", "fuse_activation"] if fuse else ["fold_batchnorm"]
    folded, _ = MetaOptimizer(passes, fail_on_error=True).run(dense)
    return dense, folded

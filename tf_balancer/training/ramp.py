"""The target ramp: how the kept fraction moves from 1 to ``target`` over the rebalances.

Example:
    >>> polynomial_ramp(epoch=0, begin=0, end=4, final=0.5, power=3)
    0.756
"""

from __future__ import annotations

__all__ = ["polynomial_ramp", "default_schedule"]


def polynomial_ramp(epoch: int, begin: int, end: int, final: float, power: int = 3) -> float:
    """Target at ``epoch`` on tfmot's ``PolynomialDecay`` curve from 1 down to ``final``.

    The first rebalance (``epoch == begin``) already moves part of the way; the
    one at ``end`` reaches ``final``.
    """
    if end <= begin:
        return final
    progress = min(max((epoch - begin + 1) / (end - begin + 1), 0.0), 1.0)
    return round(final + (1.0 - final) * (1.0 - progress) ** power, 6)


def default_schedule(
    epochs: int, begin: int | None = None, end: int | None = None, every: int = 1
) -> list[int]:
    """Epochs (0-based) at whose start the callback rebalances.

    By default the first rebalance waits one epoch (the dense model has trained
    and, with streamed Taylor importance, one epoch of gradients has been seen),
    and the final target is reached early enough to leave the last quarter of the
    epochs (at least one) for the masked network to recover:
    ``begin = 1``, ``end = epochs - 1 - max(1, epochs // 4)`` (never before ``begin``).
    A one-epoch ``fit`` rebalances at epoch 0.

    Example:
        >>> default_schedule(8)
        [1, 2, 3, 4, 5]
        >>> default_schedule(2), default_schedule(1)
        ([1], [0])
        >>> default_schedule(10, begin=0, every=2)
        [0, 2, 4, 6]
    """
    if begin is None:
        begin = 1 if epochs >= 2 else 0
    if end is None:
        end = max(begin, epochs - 1 - max(1, epochs // 4))
    return list(range(begin, end + 1, every))

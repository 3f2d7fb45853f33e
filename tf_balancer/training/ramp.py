"""The target ramp: how the kept fraction moves from 1 to ``target`` over the rebalances.

Example:
    >>> polynomial_ramp(epoch=0, begin=0, end=4, final=0.5, power=3)
    0.756
"""

from __future__ import annotations

__all__ = ["polynomial_ramp"]


def polynomial_ramp(epoch: int, begin: int, end: int, final: float, power: int = 3) -> float:
    """Target at ``epoch`` on tfmot's ``PolynomialDecay`` curve from 1 down to ``final``.

    The first rebalance (``epoch == begin``) already moves part of the way; the
    one at ``end`` reaches ``final``.
    """
    if end <= begin:
        return final
    progress = min(max((epoch - begin + 1) / (end - begin + 1), 0.0), 1.0)
    return round(final + (1.0 - final) * (1.0 - progress) ** power, 6)

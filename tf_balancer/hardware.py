"""The CPU tf_balancer runs on: how many float32 lanes its vector unit has.

Convolution and matmul kernels (oneDNN in TensorFlow, XNNPACK in TFLite) work on
whole vector registers of channels, so a layer whose channel count is a
multiple of the lane count runs at full speed while a ragged one pays for a
partial vector. ``Bounds(round_to="auto")`` rounds kept channel counts to
:func:`simd_lanes`. Measured on the reference CNN of ``benchmarks/`` (5 convs of
64, pruned to 0.5 FLOPs, AVX-512 CPU): speed-up at batch 64 1.58x with ragged
counts (44-46), 1.75x rounded to 8, 1.93x rounded to 16 (TensorFlow); 1.46x /
1.49x / 1.83x in the TFLite interpreter.

Example:
    >>> simd_lanes() in (4, 8, 16)
    True
"""

from __future__ import annotations

import functools
import os
import platform

__all__ = ["simd_lanes", "usable_cores"]


def usable_cores() -> int:
    """The cores this process may run on: a container's or ``taskset``'s share, not the
    host's count (``os.cpu_count``) where the platform says (``sched_getaffinity``)."""
    usable = getattr(os, "sched_getaffinity", None)
    return max(len(usable(0)) if usable else os.cpu_count() or 1, 1)


@functools.lru_cache(maxsize=1)
def simd_lanes() -> int:
    """float32 lanes of the widest vector unit: 16 (AVX-512), 8 (AVX/AVX2), 4 (NEON, SSE).

    Read from ``/proc/cpuinfo`` on Linux; 8 where it cannot be read on x86-64,
    4 on ARM.
    """
    machine = platform.machine().lower()
    if machine in ("arm64", "aarch64") or machine.startswith("arm"):
        return 4
    flags = _cpu_flags()
    if flags is None:
        return 8
    if "avx512f" in flags:
        return 16
    return 8 if "avx" in flags or "avx2" in flags else 4


def _cpu_flags() -> set[str] | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        return None
    return None

"""Kernel monotonic ns -> wall-clock ns. Events stay monotonic until spans are built."""

from __future__ import annotations

import time
from dataclasses import dataclass

__all__ = ["MonotonicClock"]


@dataclass(frozen=True, slots=True)
class MonotonicClock:
    """Converts bpf_ktime_get_ns() (CLOCK_MONOTONIC) timestamps with a fixed offset."""

    offset_ns: int  # wall - monotonic

    @classmethod
    def now(cls) -> MonotonicClock:
        """Measure the offset: the narrowest of a few bracketed readings."""
        best: tuple[int, int] | None = None
        for _ in range(5):
            m0 = time.monotonic_ns()
            wall = time.time_ns()
            m1 = time.monotonic_ns()
            if best is None or m1 - m0 < best[0]:
                best = (m1 - m0, wall - (m0 + m1) // 2)
        assert best is not None
        return cls(best[1])

    def to_wall(self, mono_ns: int) -> int:
        """Wall-clock ns since the epoch for a monotonic timestamp."""
        return mono_ns + self.offset_ns

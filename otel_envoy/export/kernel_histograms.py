"""OTLP histogram points from the kernel's cumulative log2 histograms.

The kernel keeps, per series, counts of durations by ``floor(log2(us))`` slot (and for some series a sum);
they only grow, until an entry is evicted and starts again. :class:`HistogramPoints` turns one collection's
counts into data points of the temporality the exporter wants: cumulative points keep the start time of
the series (or of its last reset); delta points are the difference from the previous collection. A series
whose counts went backwards was reset: its next delta point is the new counts, its cumulative start moves.

Slot ``s`` counts durations in ``[2^s, 2^(s+1))`` us (slot 0: ``[0, 2)``); bucket ``s`` of a point has upper
bound ``2^(s+1)`` us (:func:`log2_bounds_s`), so bucket counts are the kernel's counts exactly (OTLP buckets
include their upper bound, the kernel's their lower one: only a duration of exactly 2^k us could fall on
the other side).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

from opentelemetry.sdk.metrics.export import AggregationTemporality, HistogramDataPoint

__all__ = ["HistogramPoints", "log2_bounds_s", "slot_bucket_counts"]


def log2_bounds_s(slots: int) -> tuple[float, ...]:
    """Upper bounds in seconds of the buckets of ``slots`` log2 slots: 2^(s+1) microseconds for slot s."""
    return tuple((1 << (s + 1)) * 1e-6 for s in range(slots))


def slot_bucket_counts(slots: Mapping[int, int], n_slots: int) -> list[int]:
    """The kernel's log2 slots as the bucket counts of :func:`log2_bounds_s` (``n_slots + 1`` counts; later
    slots share the last)."""
    counts = [0] * (n_slots + 1)
    for slot, n in slots.items():
        if n > 0 and slot >= 0:
            counts[min(int(slot), n_slots)] += int(n)
    return counts


class HistogramPoints:
    """Per series state between collections: the previous counts, their time, the last reset."""

    def __init__(self, start_ns: int) -> None:
        """``start_ns``: when the kernel's counting began (the probes were loaded)."""
        self.start_ns = start_ns
        self._previous: dict[Hashable, tuple[int, list[int], float]] = {}  # key -> (ns, counts, sum)
        self._reset_ns: dict[Hashable, int] = {}

    def point(self, key: Hashable, attributes: Mapping[str, Any], counts: list[int], total: float | None,
              bounds: tuple[float, ...], now_ns: int, temporality: AggregationTemporality
              ) -> HistogramDataPoint | None:
        """The point of series ``key`` for this collection (``None``: a delta with nothing new).
        ``total`` is the sum of the values (``None`` when the kernel keeps none)."""
        prev_ns, prev, prev_total = self._previous.get(key, (self.start_ns, None, 0.0))
        went_back = prev is not None and any(c < p for c, p in zip(counts, prev, strict=True))
        self._previous[key] = (now_ns, counts, total or 0.0)
        if went_back:  # kernel entry evicted and started again: a reset
            self._reset_ns[key] = prev_ns
        if temporality == AggregationTemporality.DELTA:
            start = prev_ns
            if prev is not None and not went_back:
                counts = [c - p for c, p in zip(counts, prev, strict=True)]
                if total is not None:
                    total -= prev_total
        else:
            start = self._reset_ns.get(key, self.start_ns)
        count = sum(counts)
        if count == 0 and temporality == AggregationTemporality.DELTA:
            return None
        return HistogramDataPoint(
            attributes=dict(attributes), start_time_unix_nano=start, time_unix_nano=now_ns, count=count,
            sum=total, bucket_counts=counts, explicit_bounds=bounds,  # type: ignore[arg-type]
            min=None, max=None)  # type: ignore[arg-type]

    def forget(self, keys: set[Hashable]) -> None:
        """Drop the state of series that are gone for good."""
        for key in keys:
            self._previous.pop(key, None)
            self._reset_ns.pop(key, None)

    def series(self) -> set[Hashable]:
        """The series seen so far."""
        return set(self._previous)

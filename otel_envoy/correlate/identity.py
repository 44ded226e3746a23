"""Names the correlator gives: random trace and span ids for new records, thread names from kernel comms."""

from __future__ import annotations

import random
from functools import lru_cache

__all__ = ["IdSource", "thread_name"]


class IdSource:
    """Random trace and span ids as lowercase hex (as SpanRecord carries them), never all zero.

    One source serves every part of the correlator, so a seeded ``rng`` gives the same ids in the same
    order of events.
    """

    __slots__ = ("random_bits",)

    def __init__(self, rng: random.Random | None = None) -> None:
        self.random_bits = (rng or random.Random()).getrandbits  # the source's own bits (hot paths use them)

    def trace_id(self) -> str:
        """A new 128-bit trace id."""
        return f"{self.random_bits(128) or 1:032x}"

    def span_id(self) -> str:
        """A new 64-bit span id."""
        return f"{self.random_bits(64) or 1:016x}"


@lru_cache(maxsize=1024)
def thread_name(comm: bytes) -> str:
    """A thread's name from its NUL-padded comm (a worker's accepts and connects repeat it: cached)."""
    return comm.split(b"\0", 1)[0].decode(errors="replace")

"""Stack ids from the kernel's stack table -> frame strings, for the span builders (off the event path)."""

from __future__ import annotations

import errno
import threading
import time
from collections.abc import Callable, Iterable

from .symbolize import Symbolizer

__all__ = ["IDLE_S", "SymbolizedStacks"]

MAX_CACHED = 65536
#: A stack id no record has named for this long leaves the kernel's table (:meth:`SymbolizedStacks.sweep`).
IDLE_S = 60.0


class SymbolizedStacks:
    """Reads stack ids through ``addresses`` (the loader's ``stack_addresses``) and symbolizes them.

    Kernel stacks are cached by id (a stack id names the same stack until :meth:`sweep` lets it go from the
    kernel's table, and from the caches with it); user stacks by (id, process). Call from a worker thread:
    the first lookups read ELF files.

    Table hygiene: the kernel's stack table keeps every stack it was given, so over days it fills and new
    stacks collide with old ones (the kernel then records no stack: counted in :attr:`collisions`).
    :meth:`sweep` removes the ids no record has named for :data:`IDLE_S` seconds.
    """

    def __init__(self, addresses: Callable[[int], list[int]], symbolizer: Symbolizer,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._addresses = addresses
        self.symbolizer = symbolizer
        self._clock = clock
        self._lock = threading.Lock()
        self._kernel: dict[int, list[str]] = {}
        self._user: dict[tuple[int, int], tuple[list[str], list[str]]] = {}
        self._last_used: dict[int, float] = {}
        #: Stacks the kernel could not record because their slot held another stack (-EEXIST).
        self.collisions = 0
        #: Ids let go by :meth:`sweep`.
        self.swept = 0

    def _touch(self, stack_id: int) -> None:
        if stack_id >= 0:
            self._last_used[stack_id] = self._clock()
        elif stack_id == -errno.EEXIST:
            self.collisions += 1

    def kernel(self, stack_id: int) -> list[str]:
        """Frames of a kernel stack, innermost first."""
        with self._lock:
            self._touch(stack_id)
            frames = self._kernel.get(stack_id)
            if frames is None:
                frames = self.symbolizer.kernel_frames(self._addresses(stack_id))
                if len(self._kernel) >= MAX_CACHED:
                    self._kernel.clear()
                self._kernel[stack_id] = frames
            return frames

    def sweep(self, ids_in_table: Iterable[int], keep: set[int], delete: Callable[[int], None]) -> int:
        """Let go of the ids of the kernel's table (``ids_in_table``) that no record named for
        :data:`IDLE_S` seconds, except ``keep`` (ids that kernel aggregates still name): ``delete`` removes
        one from the table; the caches forget it. An id first met here gets :data:`IDLE_S` from now.
        Returns how many went."""
        now = self._clock()
        gone: set[int] = set()
        with self._lock:
            present = set()
            for sid in ids_in_table:
                present.add(sid)
                last = self._last_used.get(sid)
                if last is None:
                    self._last_used[sid] = now
                elif now - last >= IDLE_S and sid not in keep:
                    delete(sid)
                    gone.add(sid)
            for sid in gone | (self._last_used.keys() - present):
                self._last_used.pop(sid, None)
                self._kernel.pop(sid, None)
            if gone:
                for key in [k for k in self._user if k[0] in gone]:
                    del self._user[key]
            self.swept += len(gone)
        return len(gone)

    def user(self, stack_id: int, tgid: int) -> list[str]:
        """Frames of a user stack of process ``tgid``, innermost first."""
        return self._user_entry(stack_id, tgid)[0]

    def user_build_ids(self, stack_id: int, tgid: int) -> list[str]:
        """``module=build-id`` of each module whose frames in that stack have no function name: what a
        user needs to symbolize ``module+0xVADDR`` frames later."""
        return self._user_entry(stack_id, tgid, touch=False)[1]

    def _user_entry(self, stack_id: int, tgid: int, *, touch: bool = True) -> tuple[list[str], list[str]]:
        key = (stack_id, tgid)
        with self._lock:
            if touch:
                self._touch(stack_id)
            entry = self._user.get(key)
            if entry is None:
                frames = self.symbolizer.user_frames(tgid, self._addresses(stack_id))
                ids = sorted({f"{f.module}={f.build_id}" for f in frames
                              if not f.symbolized and f.module and f.build_id})
                entry = ([str(f) for f in frames], ids)
                if len(self._user) >= MAX_CACHED:
                    self._user.clear()
                self._user[key] = entry
            return entry

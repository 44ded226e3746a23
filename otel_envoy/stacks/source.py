"""Stack ids from the kernel's stack table -> frame strings, for the span builders (off the event path)."""

from __future__ import annotations

from collections.abc import Callable

from .symbolize import Symbolizer

__all__ = ["SymbolizedStacks"]

MAX_CACHED = 65536


class SymbolizedStacks:
    """Reads stack ids through ``addresses`` (the loader's ``stack_addresses``) and symbolizes them.

    Kernel stacks are cached by id (a stack id always names the same stack while the table is not
    cleared); user stacks by (id, process). Call from a worker thread: the first lookups read ELF files.
    """

    def __init__(self, addresses: Callable[[int], list[int]], symbolizer: Symbolizer) -> None:
        self._addresses = addresses
        self.symbolizer = symbolizer
        self._kernel: dict[int, list[str]] = {}
        self._user: dict[tuple[int, int], tuple[list[str], list[str]]] = {}

    def kernel(self, stack_id: int) -> list[str]:
        """Frames of a kernel stack, innermost first."""
        frames = self._kernel.get(stack_id)
        if frames is None:
            frames = self.symbolizer.kernel_frames(self._addresses(stack_id))
            if len(self._kernel) >= MAX_CACHED:
                self._kernel.clear()
            self._kernel[stack_id] = frames
        return frames

    def user(self, stack_id: int, tgid: int) -> list[str]:
        """Frames of a user stack of process ``tgid``, innermost first."""
        return self._user_entry(stack_id, tgid)[0]

    def user_build_ids(self, stack_id: int, tgid: int) -> list[str]:
        """``module=build-id`` of each module whose frames in that stack have no function name: what a
        user needs to symbolize ``module+0xVADDR`` frames later."""
        return self._user_entry(stack_id, tgid)[1]

    def _user_entry(self, stack_id: int, tgid: int) -> tuple[list[str], list[str]]:
        key = (stack_id, tgid)
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

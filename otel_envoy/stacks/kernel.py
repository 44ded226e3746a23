"""Kernel addresses to symbol names from ``/proc/kallsyms`` (parsed once, then bisected).

bcc's ``BPF.ksym(addr)`` is a static method and would do the same through libbcc; parsing kallsyms here
keeps this independent of bcc (unit-testable without it) and lets frames name the kernel module.
"""

from __future__ import annotations

from array import array
from bisect import bisect_right

__all__ = ["KernelSymbols"]

_TEXT_TYPES = frozenset("tTwW")
_MAX_OFFSET = 1 << 20  # past the last symbol of a region: no kernel function is a megabyte long


def _underscores(name: str) -> int:
    return len(name) - len(name.lstrip("_"))


class KernelSymbols:
    """Text symbols of the running kernel and its modules, sorted by address."""

    __slots__ = ("_modules", "_names", "_starts")

    def __init__(self, entries: list[tuple[int, str, str | None]]) -> None:
        """``entries``: ``(address, name, module or None)`` in any order; aliases at one address allowed."""
        ranked = sorted(entries, key=lambda e: (e[0], _underscores(e[1])))
        starts: list[int] = []
        names: list[str] = []
        modules: list[str | None] = []
        for addr, name, module in ranked:
            if starts and starts[-1] == addr:
                continue  # keep the alias with the fewest leading underscores
            starts.append(addr)
            names.append(name)
            modules.append(module)
        self._starts = array("Q", starts)
        self._names = names
        self._modules = modules

    def __len__(self) -> int:
        return len(self._starts)

    @classmethod
    def parse(cls, text: str) -> KernelSymbols:
        """Parse the text of ``/proc/kallsyms``. Zeroed addresses (kptr_restrict, no privilege) give an
        empty table."""
        entries: list[tuple[int, str, str | None]] = []
        for line in text.splitlines():
            parts = line.split()
            if len(parts) < 3 or parts[1] not in _TEXT_TYPES:
                continue
            try:
                addr = int(parts[0], 16)
            except ValueError:
                continue
            if addr == 0:
                continue
            module = parts[3].strip("[]") if len(parts) > 3 else None
            entries.append((addr, parts[2], module))
        return cls(entries)

    @classmethod
    def load(cls, path: str = "/proc/kallsyms") -> KernelSymbols:
        """Read and parse ``path`` (an empty table if it cannot be read)."""
        try:
            with open(path) as f:
                return cls.parse(f.read())
        except OSError:
            return cls([])

    def lookup(self, addr: int) -> tuple[str, int, str | None] | None:
        """``(name, offset, module or None for vmlinux)`` of the symbol at or before ``addr``, or None."""
        i = bisect_right(self._starts, addr) - 1
        if i < 0 or addr - self._starts[i] >= _MAX_OFFSET:
            return None
        return self._names[i], addr - self._starts[i], self._modules[i]

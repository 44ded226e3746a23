"""Function symbols of one ELF file, sorted by address, looked up by bisection; C++ names demangled.

The table is parsed straight from the raw ``.symtab`` / ``.dynsym`` bytes with :mod:`struct` (pyelftools
builds one Python object per symbol, far too slow for an unstripped Envoy's million symbols). Only
function symbols (STT_FUNC, STT_GNU_IFUNC) that are defined and have a size are kept, and an address
resolves only if it lies *inside* a symbol (``value <= vaddr < value + size``): a ``.dynsym``-only file
such as a stripped Envoy therefore names the few exported functions it has and never attributes an
internal function to the nearest exported one. Names stay as offsets into the string table until a
lookup needs them.
"""

from __future__ import annotations

import functools
import os
import struct
from array import array
from bisect import bisect_right

from .elf import ElfFacts, SymbolSection

__all__ = ["SymbolTable", "demangle"]

_STT_FUNC = 2
_STT_GNU_IFUNC = 10
_FUNC_TYPES = (_STT_FUNC, _STT_GNU_IFUNC)
_BIND_RANK = {1: 0, 2: 1, 0: 2}  # GLOBAL, WEAK, LOCAL: the preferred alias among symbols at one address
_NESTED_LOOKBACK = 4  # how many earlier symbols may enclose an address (nested / overlapping symbols)


@functools.lru_cache(maxsize=65536)
def demangle(name: str) -> str:
    """Demangle an Itanium C++ name (``_ZN4demo3fooEi`` -> ``demo::foo(int)``); other names unchanged.

    Never raises: a name the demangler rejects is returned as it is.
    """
    if not name.startswith("_Z"):
        return name
    try:
        import cxxfilt

        return cxxfilt.demangle(name) or name
    except Exception:  # cxxfilt.InvalidName, or no usable __cxa_demangle in this process
        return name


def _leading_underscores(strtab: bytes, off: int) -> int:
    n = 0
    while n < 3 and off + n < len(strtab) and strtab[off + n] == 0x5F:
        n += 1
    return n


class SymbolTable:
    """Sorted function symbols of one file; :meth:`lookup` maps an ELF virtual address to a name."""

    __slots__ = ("_ends", "_name_offsets", "_starts", "_strtab", "path", "source")

    def __init__(self, path: str, source: str, entries: list[tuple[int, int, int]], strtab: bytes) -> None:
        """``entries`` are ``(value, size, name offset)`` sorted by value, one per address."""
        self.path = path
        self.source = source  # ".symtab" or ".dynsym"
        self._starts = array("Q", (e[0] for e in entries))
        self._ends = array("Q", (e[0] + e[1] for e in entries))
        self._name_offsets = array("Q", (e[2] for e in entries))
        self._strtab = strtab

    def __len__(self) -> int:
        return len(self._starts)

    @classmethod
    def load(cls, path: str | os.PathLike[str], facts: ElfFacts, section: SymbolSection) -> SymbolTable:
        """Parse ``section`` (one of ``facts.symtab`` / ``facts.dynsym``) of the file at ``path``."""
        path = os.fspath(path)
        with open(path, "rb") as f:
            f.seek(section.offset)
            raw = f.read(section.size)
            f.seek(section.strtab_offset)
            strtab = f.read(section.strtab_size)
        endian = "<" if facts.little_endian else ">"
        if facts.is64:
            fmt, size = endian + "IBBHQQ", 24
        else:
            fmt, size = endian + "IIIBBH", 16
        if section.entsize != size:
            raise ValueError(f"{path}: {section.name} entry size {section.entsize}, expected {size}")
        raw = raw[: len(raw) - len(raw) % size]
        candidates: list[tuple[int, int, int, int, int]] = []
        for fields in struct.iter_unpack(fmt, raw):
            if facts.is64:
                name_off, info, _other, shndx, value, sym_size = fields
            else:
                name_off, value, sym_size, info, _other, shndx = fields
            if (info & 0xF) not in _FUNC_TYPES or shndx == 0 or value == 0 or sym_size == 0:
                continue
            rank = (_leading_underscores(strtab, name_off), _BIND_RANK.get(info >> 4, 3))
            candidates.append((value, rank[0], rank[1], sym_size, name_off))
        candidates.sort()
        entries: list[tuple[int, int, int]] = []
        last = -1
        for value, _u, _b, sym_size, name_off in candidates:
            if value != last:  # the first of several aliases at one address is the preferred name
                entries.append((value, sym_size, name_off))
                last = value
        return cls(path, section.name, entries, strtab)

    def _name(self, index: int) -> str:
        off = self._name_offsets[index]
        end = self._strtab.find(b"\0", off)
        return self._strtab[off : end if end >= 0 else len(self._strtab)].decode("utf-8", "replace")

    def lookup(self, vaddr: int) -> tuple[str, int] | None:
        """``(demangled function name, offset of vaddr in it)``, or None if no function contains vaddr."""
        i = bisect_right(self._starts, vaddr) - 1
        for j in range(i, max(i - _NESTED_LOOKBACK, -1), -1):
            if vaddr < self._ends[j]:
                return demangle(self._name(j)), vaddr - self._starts[j]
        return None

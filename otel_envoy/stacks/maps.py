"""A process's memory mappings from ``/proc/<pid>/maps``, searchable by address."""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass

__all__ = ["Mapping", "ProcessMaps", "parse_maps", "read_maps"]

_DELETED = " (deleted)"


@dataclass(frozen=True, slots=True)
class Mapping:
    """One line of ``/proc/<pid>/maps``."""

    start: int
    end: int
    perms: str  # e.g. "r-xp"
    offset: int  # file offset of ``start``
    dev: str  # "major:minor"
    inode: int
    path: str  # file path (may end in " (deleted)"), "[vdso]", "[heap]", ... or "" (anonymous)

    @property
    def executable(self) -> bool:
        """The mapping is executable (``x`` permission)."""
        return "x" in self.perms

    @property
    def file_backed(self) -> bool:
        """The mapping is backed by a file (a path and a non-zero inode)."""
        return self.inode != 0 and self.path.startswith("/")

    @property
    def file_path(self) -> str:
        """The path without the kernel's `` (deleted)`` suffix."""
        return self.path.removesuffix(_DELETED)

    def file_offset(self, addr: int) -> int:
        """The file offset that ``addr`` (inside this mapping) maps."""
        return addr - self.start + self.offset


def parse_maps(text: str) -> list[Mapping]:
    """Parse the text of ``/proc/<pid>/maps`` (lines that do not parse are skipped)."""
    out = []
    for line in text.splitlines():
        parts = line.split(None, 5)
        if len(parts) < 5:
            continue
        try:
            lo, hi = parts[0].split("-", 1)
            out.append(
                Mapping(
                    start=int(lo, 16),
                    end=int(hi, 16),
                    perms=parts[1],
                    offset=int(parts[2], 16),
                    dev=parts[3],
                    inode=int(parts[4]),
                    path=parts[5].strip() if len(parts) > 5 else "",
                )
            )
        except ValueError:
            continue
    return out


class ProcessMaps:
    """The mappings of one process, sorted by start address."""

    __slots__ = ("_mappings", "_starts")

    def __init__(self, mappings: list[Mapping]) -> None:
        self._mappings = sorted(mappings, key=lambda m: m.start)
        self._starts = [m.start for m in self._mappings]

    def __iter__(self):
        return iter(self._mappings)

    def __len__(self) -> int:
        return len(self._mappings)

    def find(self, addr: int) -> Mapping | None:
        """The mapping containing ``addr``, or None."""
        i = bisect_right(self._starts, addr) - 1
        if i >= 0 and addr < self._mappings[i].end:
            return self._mappings[i]
        return None


def read_maps(pid: int, proc: str = "/proc") -> ProcessMaps:
    """Read ``<proc>/<pid>/maps``. Raises OSError (e.g. ProcessLookupError / FileNotFoundError) if gone."""
    with open(f"{proc}/{pid}/maps") as f:
        return ProcessMaps(parse_maps(f.read()))

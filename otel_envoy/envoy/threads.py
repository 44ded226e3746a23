"""Threads of the traced processes, named from /proc."""

from __future__ import annotations

from pathlib import Path

__all__ = ["thread_identity"]


def thread_identity(tid: int, proc: str = "/proc") -> tuple[int, str]:
    """(tgid, thread name) of a live thread from /proc, (0, "") when it is gone."""
    base = Path(proc) / str(tid)
    try:
        name = (base / "comm").read_text().strip()
        tgid = 0
        for line in (base / "status").read_text().splitlines():
            if line.startswith("Tgid:"):
                tgid = int(line.split()[1])
                break
        return tgid, name
    except (OSError, ValueError):
        return 0, ""

"""The daemon's threads named for the kernel, so ``top -H``, ``ps -L`` and /proc show which one works.

Python (before 3.14) names threads only for itself; every thread of the daemon shows as ``python3`` to the
kernel. Each long-lived thread calls :func:`name_this_thread` first thing: ``prctl(PR_SET_NAME)`` sets the
calling thread's ``comm`` (at most 15 bytes, longer names are cut by the kernel).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

__all__ = ["name_this_thread"]

_PR_SET_NAME = 15
_COMM_BYTES = 15  # TASK_COMM_LEN (16) with its NUL
_libc: ctypes.CDLL | None = None


def name_this_thread(name: str) -> bool:
    """Give the calling thread ``name`` (cut to 15 bytes) as its kernel-visible name; False where that
    cannot be done (not Linux, or the call failed): naming is a convenience, never an error."""
    global _libc
    if not sys.platform.startswith("linux"):
        return False
    try:
        if _libc is None:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        return _libc.prctl(_PR_SET_NAME, name.encode()[:_COMM_BYTES], 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False

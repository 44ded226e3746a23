"""Run one client function on many threads at once and collect what each returned (or raise the first
error)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

__all__ = ["run_in_threads"]

T = TypeVar("T")


def run_in_threads(n: int, client: Callable[[int], T], timeout: float = 60.0) -> list[T]:
    """``client(0) .. client(n-1)`` concurrently; their results in index order."""
    results: list[T | None] = [None] * n
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            results[i] = client(i)
        except BaseException as exc:  # re-raised below, on the caller's thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    if errors:
        raise errors[0]
    assert all(not t.is_alive() for t in threads), "a client thread did not finish"
    return results  # type: ignore[return-value]

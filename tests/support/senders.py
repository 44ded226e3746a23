"""Checks both OTLP senders (gRPC and HTTP) must pass against their scripted test servers."""

from __future__ import annotations

import threading
import time
from typing import Any

__all__ = ["assert_shutdown_ends_a_backoff"]


def assert_shutdown_ends_a_backoff(sender: Any, calls: list[Any], payload: bytes) -> None:
    """The server's first answer asked for a long backoff: ``shutdown()`` ends the waiting send at once
    (it fails), later sends fail without a call, and the server saw exactly one call."""
    results: list[bool] = []
    thread = threading.Thread(target=lambda: results.append(sender.send(payload)))
    started = time.monotonic()
    thread.start()
    while not calls:
        time.sleep(0.01)
    time.sleep(0.1)
    sender.shutdown()
    thread.join(3.0)
    assert results == [False] and time.monotonic() - started < 2.0
    assert not sender.send(payload)
    assert len(calls) == 1

"""The retry schedule both OTLP senders share, as the SDK's exporters have it.

An export makes at most :data:`MAX_ATTEMPTS` attempts within its timeout; after a retryable failure it
waits an exponential backoff of 2^n seconds +-20% (or what the server asked for), unless that wait would
pass the deadline; a shutdown ends a wait at once.
"""

from __future__ import annotations

import logging
import random
import threading
import time

__all__ = ["MAX_ATTEMPTS", "RetryWindow", "backoff_s"]

log = logging.getLogger("otel_envoy.export.otlp")

#: Attempts per export (the first one and its retries).
MAX_ATTEMPTS = 6


def backoff_s(attempt: int) -> float:
    """The wait after failed attempt ``attempt`` (0-based): 2^attempt seconds, +-20% jitter."""
    return 2**attempt * random.uniform(0.8, 1.2)


class RetryWindow:
    """The attempts of one export: numbered, within a deadline, their waits cut short by ``shutdown``."""

    def __init__(self, timeout_s: float, shutdown: threading.Event) -> None:
        self.deadline = time.time() + timeout_s
        self._shutdown = shutdown

    @staticmethod
    def attempts() -> range:
        """The attempt numbers, 0 first."""
        return range(MAX_ATTEMPTS)

    def left_s(self) -> float:
        """Seconds left before the deadline (0 when it has passed)."""
        return max(self.deadline - time.time(), 0.0)

    def may_retry(self, attempt: int, backoff: float) -> bool:
        """Whether another attempt may follow ``attempt`` after waiting ``backoff`` seconds."""
        return not (attempt + 1 == MAX_ATTEMPTS or backoff > self.deadline - time.time()
                    or self._shutdown.is_set())

    def wait(self, backoff: float) -> bool:
        """Wait ``backoff`` seconds; ``False`` when a shutdown ended the wait (no more attempts)."""
        if self._shutdown.wait(backoff):
            log.warning("Shutdown in progress, aborting retry.")
            return False
        return True

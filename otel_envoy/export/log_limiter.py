"""Rate-limited logging for the export side: a collector that is down must not flood the log.

:class:`LogRateLimiter` allows one line per key per interval and counts what it held back;
:class:`ExporterLogFilter` applies it to whole loggers (the OTLP senders' and the SDK metric exporters'),
one line per message template per interval.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Iterable

__all__ = ["WARN_INTERVAL_S", "ExporterLogFilter", "LogRateLimiter", "install_log_filter"]

#: Seconds between two lines of the same kind.
WARN_INTERVAL_S = 30.0


class LogRateLimiter:
    """Allows one log line per key per interval; counts what it suppressed in between."""

    def __init__(self, interval: float = WARN_INTERVAL_S) -> None:
        """``interval``: seconds between two allowed lines of one key."""
        self._interval = interval
        self._last: dict[str, float] = {}
        self._suppressed: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()

    def allow(self, key: str) -> tuple[bool, int]:
        """``(allowed, suppressed_since_last)`` for one occurrence of ``key``."""
        now = time.monotonic()
        with self._lock:
            last = self._last.get(key)
            if last is None or now - last >= self._interval:
                self._last[key] = now
                return True, self._suppressed.pop(key, 0)
            self._suppressed[key] += 1
            return False, 0


class ExporterLogFilter(logging.Filter):
    """Rate-limits the exporters' own per-batch error/retry lines (by logger and message template).

    Lines below WARNING pass unchanged.
    """

    def __init__(self, interval: float = WARN_INTERVAL_S) -> None:
        """``interval``: seconds between two lines of one logger and template."""
        super().__init__("otel_envoy.sdk_rate_limit")
        self._limiter = LogRateLimiter(interval)

    def filter(self, record: logging.LogRecord) -> bool:
        """Whether ``record`` is logged."""
        if record.levelno < logging.WARNING:
            return True
        allowed, _ = self._limiter.allow(f"{record.name}:{record.msg}")
        return allowed


def install_log_filter(log_filter: logging.Filter, logger_names: Iterable[str]) -> None:
    """Add ``log_filter`` to each named logger (once)."""
    for name in logger_names:
        logger = logging.getLogger(name)
        if log_filter not in logger.filters:
            logger.addFilter(log_filter)

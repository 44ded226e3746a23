"""The retry schedule the OTLP senders share: attempts, deadline, jittered backoff, shutdown."""

from __future__ import annotations

import threading
import time

from otel_envoy.export.retry import MAX_ATTEMPTS, RetryWindow, backoff_s


def test_backoff_doubles_with_twenty_percent_jitter() -> None:
    for attempt in range(MAX_ATTEMPTS):
        waits = [backoff_s(attempt) for _ in range(200)]
        assert 0.8 * 2**attempt <= min(waits) and max(waits) <= 1.2 * 2**attempt
        assert max(waits) > min(waits)


def test_no_retry_after_the_last_attempt_past_the_deadline_or_after_shutdown() -> None:
    shutdown = threading.Event()
    window = RetryWindow(10.0, shutdown)
    assert list(window.attempts()) == list(range(MAX_ATTEMPTS))
    assert window.may_retry(0, 1.0)
    assert not window.may_retry(MAX_ATTEMPTS - 1, 0.0)
    assert not window.may_retry(0, 11.0)  # the wait would pass the deadline
    assert 9.0 < window.left_s() <= 10.0
    shutdown.set()
    assert not window.may_retry(0, 0.0)


def test_a_shutdown_ends_a_wait_at_once() -> None:
    shutdown = threading.Event()
    window = RetryWindow(60.0, shutdown)
    assert window.wait(0.01)
    threading.Timer(0.05, shutdown.set).start()
    t0 = time.monotonic()
    assert not window.wait(30.0)
    assert time.monotonic() - t0 < 5.0


def test_left_time_never_goes_negative() -> None:
    assert RetryWindow(-1.0, threading.Event()).left_s() == 0.0

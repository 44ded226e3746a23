"""One sink's delivery: its own thread, a buffer bounded by bytes, retries until the sink takes a batch.

The export thread (:mod:`otel_envoy.export.span_queue`) encodes each batch once per sink and hands the
encoding to that sink's :class:`SinkWorker`, which never blocks it: the encoding joins the worker's buffer,
and when the buffer holds more than its bound (in bytes) the oldest encodings are dropped and counted.
The worker's thread sends the oldest encoding; a transient failure (the collector restarting, a 503, a
timeout) keeps it at the head and the worker tries again after a backoff of 1, 2, 4 ... up to 10 seconds,
so the spans made while a collector was down arrive, in order, once it is back; a permanent failure (a
request the collector refuses, a sink that raises) drops the batch, counted. Each sink has its own worker,
so a slow or unreachable one never delays the others.

Every span handed to a worker ends in exactly one of: ``sent``, ``buffer_full`` (evicted to stay within
the bound), ``failed`` (refused for good), ``unsent`` (still buffered when the daemon stopped and its
shutdown time ran out), or is still ``buffered``; :meth:`SinkWorker.stats` reports each, and their sum is
what the worker was handed.
"""

from __future__ import annotations

import collections
import enum
import logging
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from otel_envoy.export.log_limiter import LogRateLimiter
from otel_envoy.thread_names import name_this_thread

if TYPE_CHECKING:
    from otel_envoy.export.sinks import SpanSink

__all__ = ["DEFAULT_BUFFER_BYTES", "Delivery", "Encoded", "SinkWorker"]

log = logging.getLogger("otel_envoy.export")

#: Each sink's buffer bound: 64 MiB holds about 3 minutes of the spans the default sampler makes at
#: saturation on the bench (~500 spans/s of ~700 bytes); see docs/export.md.
DEFAULT_BUFFER_BYTES = 64 << 20
#: Waits between attempts at one batch after transient failures: doubling from the first, up to the last.
FIRST_BACKOFF_S, MAX_BACKOFF_S = 1.0, 10.0


class Delivery(enum.Enum):
    """What became of one attempt to hand an encoded batch to a sink."""

    SENT = "sent"
    #: Not taken now, may be later (collector unreachable, overloaded, a timeout): keep it and try again.
    RETRY = "retry"
    #: Refused for good (a request the collector rejects, a sink that raised): drop it, counted.
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class Encoded:
    """One batch in a sink's own encoding: the payload, how many spans it carries, its size in bytes."""

    payload: Any
    spans: int
    size: int


class SinkWorker:
    """Delivers one sink's encoded batches from its own thread (see the module's text)."""

    def __init__(self, sink: SpanSink, name: str, max_bytes: int = DEFAULT_BUFFER_BYTES) -> None:
        """Start the worker's thread; ``max_bytes`` bounds the encodings it holds (the one being sent
        included)."""
        if max_bytes < 1:
            raise ValueError("max_bytes must be positive")
        self.sink = sink
        self.name = name
        self.max_bytes = max_bytes
        self._buffer: collections.deque[Encoded] = collections.deque()
        self._buffered_bytes = 0  # the buffer's and the batch in flight's
        self._peak_bytes = 0
        self._in_flight: Encoded | None = None
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)  # wakes the worker: a batch came, or stop
        self._changed = threading.Condition(self._lock)  # wakes waiters: a batch left the buffer
        self._stopping = False
        self._deadline = 0.0  # monotonic time after which a stopping worker gives up
        self._counts: collections.Counter[str] = collections.Counter()  # spans by outcome
        self._batches_sent = 0
        self._retries = 0
        self._handed = 0  # spans handed to the worker
        self._settled = 0  # spans sent, dropped or failed
        self._warn = LogRateLimiter()
        self._retry_wait = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"otel-envoy-export-{name}", daemon=True)
        self._thread.start()

    # -- called by the export thread ------------------------------------------------------------------

    def hand(self, batch: Encoded, *, wait_for_room: bool = False) -> None:
        """Add ``batch`` to the buffer without blocking; the oldest batches make room when it is full
        (counted ``buffer_full``), and ``batch`` itself is dropped (counted) when it still does not fit
        (larger than the bound, or next to the batch being sent). ``wait_for_room``: wait for the sink
        instead (replays lose nothing; a batch larger than the bound is taken when the buffer is empty)."""
        with self._lock:
            self._handed += batch.spans
            if self._stopping:
                self._settle(batch, "unsent")
                return
            if wait_for_room:
                while (self._buffered_bytes and self._buffered_bytes + batch.size > self.max_bytes
                       and not self._stopping and self._thread.is_alive()):
                    self._changed.wait(0.1)
            else:
                while self._buffer and self._buffered_bytes + batch.size > self.max_bytes:
                    self._settle(self._buffer.popleft(), "buffer_full", buffered=True)
                if self._buffered_bytes + batch.size > self.max_bytes:  # the batch in flight holds the room,
                    self._settle(batch, "buffer_full")  # or this one alone is larger than the bound
                    return
            self._buffer.append(batch)
            self._buffered_bytes += batch.size
            self._peak_bytes = max(self._peak_bytes, self._buffered_bytes)
            self._work.notify()

    def handed(self) -> int:
        """How many spans have been handed to the worker."""
        with self._lock:
            return self._handed

    def wait_settled(self, spans: int, deadline: float) -> bool:
        """Wait until ``spans`` handed spans are settled, or the monotonic ``deadline`` passes."""
        with self._lock:
            while self._settled < spans:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self._thread.is_alive():
                    return self._settled >= spans
                self._changed.wait(min(remaining, 0.1))
            return True

    def stop(self, deadline: float) -> None:
        """Deliver what is buffered until the monotonic ``deadline``, then count the rest ``unsent`` and
        end the thread (the sink is shut down by the caller, which aborts a send in progress)."""
        with self._lock:
            self._stopping = True
            self._deadline = deadline
            self._work.notify()
        self._retry_wait.set()  # a backoff in progress ends: one more attempt, then the deadline rules

    def join(self, timeout: float) -> bool:
        """Wait for the thread to end; ``True`` if it has."""
        self._thread.join(max(timeout, 0.0))
        return not self._thread.is_alive()

    def stats(self) -> dict[str, Any]:
        """Spans by outcome (``sent``, ``buffer_full``, ``failed``, ``unsent``), ``buffered`` spans and
        bytes (now, at the peak, the bound), ``batches`` sent, ``retries`` made, spans ``handed``."""
        with self._lock:
            buffered = sum(b.spans for b in self._buffer) + (self._in_flight.spans if self._in_flight else 0)
            return {"handed": self._handed, **{k: self._counts[k] for k in ("sent", "buffer_full", "failed",
                                                                            "unsent")},
                    "buffered": buffered, "buffered_bytes": self._buffered_bytes,
                    "peak_buffered_bytes": self._peak_bytes, "max_bytes": self.max_bytes,
                    "batches": self._batches_sent, "retries": self._retries}

    # -- the worker's thread --------------------------------------------------------------------------

    def _settle(self, batch: Encoded, outcome: str, *, buffered: bool = False) -> None:
        """With the lock held: count ``batch`` under ``outcome``; ``buffered``: it leaves the buffer."""
        self._counts[outcome] += batch.spans
        self._settled += batch.spans
        if buffered:
            self._buffered_bytes -= batch.size
        self._changed.notify_all()

    def _next(self) -> Encoded | None:
        """The batch to send next; ``None`` when stopping with nothing left (or past the deadline)."""
        with self._lock:
            while not self._buffer and not self._stopping:
                self._work.wait()
            if self._stopping and (not self._buffer or time.monotonic() >= self._deadline):
                while self._buffer:
                    self._settle(self._buffer.popleft(), "unsent", buffered=True)
                return None
            self._in_flight = self._buffer.popleft()
            return self._in_flight

    def _run(self) -> None:
        name_this_thread(f"oe-sink-{self.name}")
        backoff = FIRST_BACKOFF_S
        while (batch := self._next()) is not None:
            outcome = self._deliver(batch)
            with self._lock:
                self._in_flight = None
                if outcome is Delivery.RETRY and not (self._stopping and time.monotonic() >= self._deadline):
                    self._buffer.appendleft(batch)  # still counted in _buffered_bytes
                    self._retries += 1
                else:
                    self._settle(batch, "sent" if outcome is Delivery.SENT else
                                 "failed" if outcome is Delivery.FAILED else "unsent", buffered=True)
                    if outcome is Delivery.SENT:
                        self._batches_sent += 1
                stopping = self._stopping
            if outcome is Delivery.RETRY and not stopping:
                self._warn_retry()
                self._retry_wait.wait(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_S)
            else:
                backoff = FIRST_BACKOFF_S

    def _deliver(self, batch: Encoded) -> Delivery:
        try:
            outcome = self.sink.send(batch.payload)
        except Exception as exc:  # a broken sink must not end the worker
            outcome, reason, kind = Delivery.FAILED, f"{type(exc).__name__}: {exc}", type(exc).__name__
        else:
            reason, kind = "the sink refused it", "refused"
        if outcome is Delivery.FAILED:
            allowed, suppressed = self._warn.allow(f"{self.name}:{kind}")
            if allowed:
                more = f" ({suppressed} similar failures suppressed)" if suppressed else ""
                log.warning("span sink %s dropped a batch of %d spans: %s%s", self.name, batch.spans, reason,
                            more)
        return outcome

    def _warn_retry(self) -> None:
        allowed, suppressed = self._warn.allow(f"{self.name}:retry")
        if allowed:
            with self._lock:
                spans, size = sum(b.spans for b in self._buffer), self._buffered_bytes
            log.warning("span sink %s is not taking batches; %d spans (%.1f MiB of %.0f) kept to try again%s",
                        self.name, spans, size / (1 << 20), self.max_bytes / (1 << 20),
                        f" ({suppressed} similar lines suppressed)" if suppressed else "")

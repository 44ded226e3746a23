"""The span export queue: bounded, never blocking the event path, drained by one background thread.

The hot event path calls :meth:`SpanPipeline.submit` with finished :class:`SpanRecord` objects from the
span builders; it only appends to a bounded deque under a lock and counts what does not fit.  A daemon
thread takes batches (up to ``max_batch`` spans, or whatever arrived within ``flush_interval``), encodes
each once per sink (:mod:`otel_envoy.export.sinks`) and hands the encoding to that sink's own
:class:`~otel_envoy.export.sink_worker.SinkWorker`, which delivers it from its own thread and keeps what a
sink cannot take yet (a collector restarting) in a buffer bounded by bytes, retrying it. So a slow sink
delays only itself, and nothing here waits on a network.

Every span submitted is accounted for: ``queue_full`` (did not fit), ``shutdown`` (came or was still
queued when the pipeline stopped), or handed to every sink, where it is ``invalid_span`` (could not be
encoded), ``encode_failed`` (its batch's encoder raised), ``export_failed`` (refused),
``export_buffer_full`` (evicted from the bound), ``export_unsent`` (still buffered at the end of the
shutdown time), exported, or still buffered (:meth:`SpanPipeline.stats`; otel_envoy/accounting.py).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TypeAlias

from otel_envoy.export.sink_worker import DEFAULT_BUFFER_BYTES, SinkWorker
from otel_envoy.spans.model import SpanRecord
from otel_envoy.thread_names import name_this_thread

if TYPE_CHECKING:
    from otel_envoy.export.sinks import SpanSink

__all__ = ["ExportSpan", "SpanPipeline"]

#: What the queue carries and the sinks export.
ExportSpan: TypeAlias = SpanRecord

log = logging.getLogger("otel_envoy.export")


class SpanPipeline:
    """Bounded span queue plus one daemon thread encoding batches for every sink's worker.

    :meth:`submit` never blocks (beyond a short lock) and never raises for a full queue: spans that
    do not fit are dropped and counted under ``drops["queue_full"]``.  What each sink could not take is
    kept (``buffer_bytes`` per sink) and retried by its worker; what it refused for good is counted as
    ``drops["export_failed:<sink name>"]`` and logged, rate-limited, to the ``otel_envoy.export`` logger.
    """

    def __init__(
        self,
        sinks: Sequence[SpanSink],
        max_queue: int = 20000,
        max_batch: int = 1024,
        flush_interval: float = 0.2,
        *,
        block_when_full: bool = False,
        buffer_bytes: int = DEFAULT_BUFFER_BYTES,
    ) -> None:
        """Start the export thread and one worker per sink. ``block_when_full``: :meth:`submit` (and the
        hand-over to a sink's worker) waits for room instead of dropping (for replays, which have no ring
        buffer to protect and must not lose spans). ``buffer_bytes``: each sink's bound for the encoded
        batches it has not taken yet."""
        if max_queue < 1 or max_batch < 1:
            raise ValueError("max_queue and max_batch must be positive")
        self._sinks: list[SpanSink] = list(sinks)
        self._names = _unique_names(self._sinks)
        self._workers = [SinkWorker(sink, name, buffer_bytes) for sink, name in
                         zip(self._sinks, self._names, strict=True)]
        self._max_queue = max_queue
        self._block_when_full = block_when_full
        self._max_batch = max_batch
        self._flush_interval = flush_interval
        self._queue: collections.deque[ExportSpan] = collections.deque()
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)  # wakes the export thread
        self._done = threading.Condition(self._lock)  # wakes flush() waiters
        self._refused = 0  # of those, refused because the pipeline was stopping
        self._accepted = 0  # spans ever put in the queue
        self._abandoned = 0  # spans still queued when the shutdown time ran out
        self._processed = 0  # spans taken out of the queue and handled (exported, failed or dropped)
        self._in_flight = 0
        self._flush_waiters = 0
        self._stopping = False
        self._abandon = False
        self._closed = False
        self._drops: collections.Counter[str] = collections.Counter()
        self._rejected: dict[str, int] = {}  # each sink's rejected count, as last read
        self._thread = threading.Thread(target=self._run, name="otel-envoy-export", daemon=True)
        self._thread.start()

    # -- hot path ---------------------------------------------------------------------------------------

    def submit(self, spans: Sequence[ExportSpan]) -> int:
        """Queue finished spans for export without blocking; returns how many were accepted."""
        n = len(spans)
        if not n:
            return 0
        with self._lock:
            if self._stopping:
                self._drops["shutdown"] += n
                self._refused += n
                return 0
            queue = self._queue
            if self._block_when_full and len(queue) + n > self._max_queue:
                self._wait_for_room(n)
            room = self._max_queue - len(queue)
            if room >= n:
                queue.extend(spans)
                accepted = n
            else:
                accepted = max(room, 0)
                if accepted:
                    queue.extend(spans[:accepted])
                self._drops["queue_full"] += n - accepted
            self._accepted += accepted
            if len(queue) >= self._max_batch:
                self._work.notify()
        return accepted

    def _wait_for_room(self, n: int) -> None:
        """With the lock held: wait until ``n`` spans fit (or the queue is empty, or the pipeline stops)."""
        queue = self._queue
        self._work.notify()
        while (len(queue) + n > self._max_queue and queue and not self._stopping
               and self._thread.is_alive()):
            self._done.wait(0.1)

    # -- control ----------------------------------------------------------------------------------------

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything submitted so far has been delivered by every sink, or dropped and
        counted; ``False`` on timeout (a sink still holding spans it could not deliver yet)."""
        deadline = time.monotonic() + timeout
        with self._lock:
            target = self._accepted
            self._flush_waiters += 1
            try:
                self._work.notify()
                while self._processed < target:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0 or not self._thread.is_alive():
                        if self._processed < target:
                            return False
                        break
                    self._done.wait(remaining)
            finally:
                self._flush_waiters -= 1
        return all([w.wait_settled(w.handed(), deadline) for w in self._workers])

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop accepting spans, drain the queue and let each sink deliver what it holds within
        ``timeout``, then shut the sinks down.

        Spans still queued when the time is up are dropped (``drops["shutdown"]``), those a sink still
        holds are counted ``export_unsent:<sink>``; the sinks are shut down, which makes the OTLP senders
        abandon their retries.  Idempotent.
        """
        deadline = time.monotonic() + max(timeout, 0.0)
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._stopping = True
            self._work.notify()
        # The queue into the workers first (encoding only), leaving them most of the budget to deliver.
        self._thread.join(max(0.0, deadline - time.monotonic()) * 0.5)
        if self._thread.is_alive():
            with self._lock:
                self._abandon = True
                self._work.notify()
            self._thread.join(max(0.05, (deadline - time.monotonic()) * 0.2))
            if self._thread.is_alive():
                log.warning("span export thread still busy after shutdown timeout of %.1f s", timeout)
        # Leave a little of the budget for the sinks' own shutdown.
        delivery_end = time.monotonic() + max(0.0, deadline - time.monotonic()) * 0.8
        for worker in self._workers:
            worker.stop(delivery_end)
        for worker in self._workers:
            worker.join(delivery_end - time.monotonic())
        self._shutdown_sinks()  # aborts a send still in progress: its worker counts it unsent
        for worker in self._workers:
            if not worker.join(max(0.05, deadline - time.monotonic())):
                log.warning("span sink %s still busy after shutdown timeout of %.1f s", worker.name, timeout)

    def stats(self) -> dict[str, Any]:
        """Counters: ``exported``/``batches`` per sink, ``drops`` by reason, ``queue_depth``, each sink's
        worker (``sinks``: handed, sent, buffered spans and bytes, retries, ...)."""
        sinks = {w.name: w.stats() for w in self._workers}
        with self._lock:
            drops = collections.Counter(self._drops)
            for name, st in sinks.items():
                drops[f"export_failed:{name}"] += st["failed"]
                drops[f"export_buffer_full:{name}"] += st["buffer_full"]
                drops[f"export_unsent:{name}"] += st["unsent"]
            return {
                "submitted": self._accepted + self._drops["queue_full"],
                "accepted": self._accepted,
                "refused_stopping": self._refused,
                "abandoned": self._abandoned,
                "processed": self._processed,
                "queue_depth": len(self._queue),
                "in_flight": self._in_flight,
                "max_queue": self._max_queue,
                "exported": {name: st["sent"] for name, st in sinks.items()},
                "batches": {name: st["batches"] for name, st in sinks.items()},
                "buffered": {name: st["buffered"] for name, st in sinks.items()},
                "sinks": sinks,
                "drops": {k: v for k, v in drops.items() if v},
            }

    @property
    def sinks(self) -> list[SpanSink]:
        """The sinks, in export order."""
        return list(self._sinks)

    def __enter__(self) -> SpanPipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # -- export thread ----------------------------------------------------------------------------------

    def _shutdown_sinks(self) -> None:
        for sink, name in zip(self._sinks, self._names, strict=True):
            try:
                sink.shutdown()
            except Exception as exc:  # a broken sink must not break shutdown
                log.warning("shutting down span sink %s failed: %s", name, exc)

    def _take_batch(self) -> list[ExportSpan] | None:
        """Wait for a batch; ``None`` when the pipeline is stopping and the queue is empty."""
        with self._lock:
            deadline = time.monotonic() + self._flush_interval
            queue = self._queue
            while len(queue) < self._max_batch and not self._stopping and not (self._flush_waiters and queue):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._work.wait(remaining)
            if self._abandon and queue:
                self._drops["shutdown"] += len(queue)
                self._abandoned += len(queue)
                self._processed += len(queue)
                queue.clear()
                self._done.notify_all()
            if not queue:
                return None if self._stopping else []
            n = min(self._max_batch, len(queue))
            batch = [queue.popleft() for _ in range(n)]
            self._in_flight = n
            return batch

    def _run(self) -> None:
        name_this_thread("oe-export")
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            if not batch:
                continue
            for sink, worker in zip(self._sinks, self._workers, strict=True):
                self._hand(sink, worker, batch)
            with self._lock:
                self._in_flight = 0
                self._processed += len(batch)
                self._done.notify_all()

    def _hand(self, sink: SpanSink, worker: SinkWorker, batch: list[ExportSpan]) -> None:
        """Encode ``batch`` for ``sink`` and hand it to the sink's worker; spans left out are counted."""
        name = worker.name
        try:
            encoded = sink.encode(batch)
        except Exception as exc:  # an encoder that fails for a whole batch: the batch is refused
            log.warning("span sink %s could not encode a batch of %d spans: %s: %s", name, len(batch),
                        type(exc).__name__, exc)
            with self._lock:
                self._drops[f"encode_failed:{name}"] += len(batch)
            return
        rejected = getattr(sink, "rejected", 0)  # spans left out of the batch, not encodable
        with self._lock:
            left_out = rejected - self._rejected.get(name, 0)
            self._rejected[name] = rejected
            if left_out:
                self._drops[f"invalid_span:{name}"] += left_out
        if encoded is not None:
            worker.hand(encoded, wait_for_room=self._block_when_full)


def _unique_names(sinks: Sequence[SpanSink]) -> list[str]:
    names: list[str] = []
    for sink in sinks:
        base = getattr(sink, "name", None) or type(sink).__name__
        name, i = base, 2
        while name in names:
            name, i = f"{base}#{i}", i + 1
        names.append(name)
    return names

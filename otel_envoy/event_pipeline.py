"""probes -> events -> correlation -> spans -> export, as one object both live runs and replays drive.

Single-threaded by design: whoever calls ``on_record`` (the ring-buffer thread, or
:meth:`EventPipeline.replay`) owns the decoder and the correlator. Finished spans leave through
``SpanPipeline.submit``, which never blocks.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import queue
import sys
import threading
from collections import Counter
from collections.abc import Callable, Collection, Iterable

from opentelemetry.sdk.resources import Resource

from .correlate.correlator import ConnectionCorrelator
from .correlate.downstream_requests import KeptHead
from .correlate.records import ConnectionRecord, RequestRecord, UpstreamRecord
from .correlate.round_tracker import RoundRecord, WaitRecord
from .correlate.startup import StartupRecord
from .events.decode import Decoder
from .events.layout import load_layout
from .events.recording import RecordingError, RecordingWriter
from .events.recording_context import (
    AdoptedContext,
    ClockContext,
    FilterChainsContext,
    ListenerNamesContext,
    ListenSocketsContext,
    OwnConnectionContext,
    ProcessResourceContext,
    SamplerContext,
)
from .events.types import Event, RequestKeptEvent
from .export.log_limiter import LogRateLimiter
from .export.span_queue import SpanPipeline
from .protocols.http import HttpExchange
from .spans.clock import MonotonicClock
from .spans.connection import ConnectionSpanBuilder
from .spans.request_summaries import SummarySpans
from .spans.requests import RequestSpanBuilder
from .spans.round_spans import RoundSpanBuilder, StackSource
from .spans.startup_spans import StartupSpanBuilder
from .thread_names import name_this_thread

__all__ = ["DamagedContextError", "EventPipeline", "tune_allocator", "tune_garbage_collector",
           "tune_thread_switching"]

log = logging.getLogger("otel_envoy.event_pipeline")
_C = load_layout().constants
#: Records the daemon is told of as well (on_notice): a listen (rescan the listeners), a process that
#: started under the followed name, a traced process that exited.
NOTICE_KINDS = frozenset((_C["EV_LISTEN"], _C["EV_EXEC"], _C["EV_EXIT"]))
#: The event path hands its spans to the export queue this many at a time (and at the end of every ring
#: pass, :meth:`EventPipeline.flush_spans`): one lock and one wake-up per batch instead of per request.
SUBMIT_BATCH = 256


class DamagedContextError(RecordingError):
    """A context record of a replayed recording does not parse (the message is one line)."""


def tune_garbage_collector() -> None:
    """Collect cycles rarely: the event path allocates many short-lived objects and makes no cycles.

    With the default thresholds the young generation is collected every 700 allocations, which cost as much
    as decoding the events themselves. Objects made during start-up (bcc, the SDK) are frozen out of the
    collector's view. Live runs and replays both call it before their first record.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 50, 1000)


#: glibc mallopt parameters, and what the daemon sets them to: a batch of spans is encoded into strings of
#: ~1 MB, which glibc by default takes from mmap and gives back on free, so every batch page-faults its
#: memory in again (0.4 us per span on this VM, measured on the OTLP/JSON joins). Kept in the heap instead:
#: the daemon's memory is bounded by its queues, not by what the allocator returns.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD_BYTES = 32 << 20  # glibc's largest on 64-bit
TRIM_THRESHOLD_BYTES = 64 << 20


def tune_allocator() -> bool:
    """Serve large blocks from the heap and keep freed ones (glibc; elsewhere nothing is changed). Returns
    whether the allocator took the settings."""
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt if name else None
    except (OSError, AttributeError):
        mallopt = None
    if mallopt is None:
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))


#: How long a thread running Python keeps the interpreter before another thread that waits for it gets a
#: turn (CPython's default is 5 ms). The daemon's busy threads (the ring's, the export's) each work through
#: batches; measured alternately on this VM (always_on, a new TLS connection per request at saturation, 7
#: pairs), 50 ms cost 1.0-4.5 us less daemon CPU per connection than 5 ms (fewer hand-overs, and fewer
#: caches refilled after them). The price: a thread waits up to 50 ms for its turn while another runs Python
#: (the ring is drained every 50 ms anyway; the event path never waits on another thread).
SWITCH_INTERVAL_S = 0.05


def tune_thread_switching() -> None:
    """Let a thread running Python keep the interpreter for SWITCH_INTERVAL_S before handing it over."""
    sys.setswitchinterval(SWITCH_INTERVAL_S)


class EventPipeline:
    """Decodes raw records, correlates them and hands finished spans to the export pipeline."""

    def __init__(
        self,
        spans_out: SpanPipeline,
        resource: Resource,
        clock: MonotonicClock,
        *,
        recorder: RecordingWriter | None = None,
        on_notice: Callable[[Event], None] | None = None,
        http: bool = True,
        rounds: bool = True,
        stacks: StackSource | None = None,
        threaded_rounds: bool = False,
        operator_keys: Collection[str] = (),
    ) -> None:
        self.decoder = Decoder()
        self.spans_out = spans_out
        # a process's spans carry its own resource (process_resource context records) but never over the
        # keys the operator set in the daemon's OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES
        self.builder = ConnectionSpanBuilder(resource, clock, fixed_keys=operator_keys)
        self.request_builder = RequestSpanBuilder(self.builder)
        self.round_builder = RoundSpanBuilder(self.builder, stacks)
        self.round_worker = RoundWorker(self, threaded=threaded_rounds) if rounds else None
        self.correlator = ConnectionCorrelator(
            self._on_connection,
            on_request=self._on_request,
            on_upstream=self._on_upstream,
            on_upstream_request=self._on_upstream_request,
            on_round=self.round_worker.submit_round if self.round_worker else None,
            on_wait=self.round_worker.submit_wait if self.round_worker else None,
            on_startup=self._on_startup,
            http=http,
        )
        requests = self.correlator.downstream.requests
        self.summary_spans = SummarySpans(self.request_builder, requests.kept_exchange)
        requests.on_summary = self._on_summary
        self._summary_spans = self.summary_spans.spans
        self._is_own = self.correlator.downstream.is_own
        self._summaries = 0  # request summaries' spans built by _on_summary (one each), not counted yet
        self.startup_builder = StartupSpanBuilder(self.builder, self.correlator.downstream.listener_name,
                                                  self.correlator.downstream.listen_socket)
        self.recorder = recorder
        self.on_notice = on_notice
        self._decode = self.decoder.decode  # bound once: on_record runs per kernel record
        self._handle = self.correlator.handle
        self._counts: Counter[str] = Counter()
        self._events = 0  # a plain int: counted per kernel record (see the counts property)
        self._error_log = LogRateLimiter()  # correlation errors: one line per event type per interval
        self._pending: list = []  # spans built on the event path, not handed to spans_out yet
        self.received = 0  # raw records handed in, decodable or not (the accounting's ring line)
        if recorder is not None:
            recorder.context(ClockContext(clock.offset_ns).to_json())

    def on_record(self, raw: bytes) -> None:
        """One raw ring-buffer record (hot path)."""
        self.received += 1
        if self.recorder is not None:
            self.recorder.kernel(raw)
        event = self._decode(raw)
        if event is None:
            return
        self._events += 1
        if event.kind in NOTICE_KINDS and self.on_notice is not None:
            self.on_notice(event)
        try:
            self._handle(event)
        except Exception:  # a bug in correlation must not stop tracing: this record is left out, counted
            self._correlation_failed(event)

    def _correlation_failed(self, event: Event) -> None:
        """The correlator raised on ``event`` (a bug): counted by event type and logged (one line per type
        per interval, with the traceback), and the next record is handled as usual."""
        kind = type(event).__name__
        self._counts["correlation_errors"] += 1
        self._counts[f"correlation_errors.{kind}"] += 1
        allowed, held_back = self._error_log.allow(kind)
        if allowed:
            log.exception("could not correlate an event %s (a bug: it is left out, tracing goes on)%s", kind,
                          f"; {held_back} more since the last report" if held_back else "")

    @property
    def counts(self) -> Counter[str]:
        """Events decoded, connections, requests, spans built, span-building errors, ... (the round worker's
        included: a snapshot)."""
        if self._events:
            self._counts["events"] = self._events
        if self.round_worker is None or not self.round_worker.counts:
            return self._counts
        return self._counts + self.round_worker.counts

    def on_context(self, obj: dict) -> None:
        """A user-space context record (events/recording_context.py) in its JSON form: recorded as given,
        then applied. Other types (the clock) are recorded only. Raises what the record's ``from_json``
        raises when it is damaged."""
        if self.recorder is not None:
            self.recorder.context(obj)
        kind = obj.get("type")
        if kind == ListenSocketsContext.TYPE:
            self.correlator.set_listen_sockets(ListenSocketsContext.from_json(obj).sockets)
        elif kind == ListenerNamesContext.TYPE:
            self.correlator.set_listener_names(ListenerNamesContext.from_json(obj).names)
        elif kind == FilterChainsContext.TYPE:
            self.correlator.set_filter_chains(FilterChainsContext.from_json(obj).listeners)
        elif kind == OwnConnectionContext.TYPE:
            own = OwnConnectionContext.from_json(obj)
            self.correlator.add_own_peer(own.address, own.port)
        elif kind == AdoptedContext.TYPE:
            self.correlator.adopt(AdoptedContext.from_json(obj))
        elif kind == ProcessResourceContext.TYPE:
            proc = ProcessResourceContext.from_json(obj)
            self.builder.set_process_resource(proc.pid, proc.attributes)
        elif kind == SamplerContext.TYPE:
            sampler = SamplerContext.from_json(obj)
            self.correlator.attribution.exact_only = sampler.ratio < 1.0
            self.correlator.attribution.late_requests = sampler.summary

    def replay(self, items: Iterable[tuple[str, object]]) -> int:
        """Feed recorded kernel and context records (those after the clock record), then finish at the last
        event time; returns that time. This is `otel-envoy replay`.

        Raises :class:`DamagedContextError` for a context record that does not parse, numbered from 1 after
        the clock record; what the recording's reader raises passes through.
        """
        on_record = self.on_record
        for index, (kind, payload) in enumerate(items, start=1):
            if kind == "kernel":
                on_record(payload)  # type: ignore[arg-type]
                continue
            try:
                self.on_context(payload)  # type: ignore[arg-type]
            except (AttributeError, KeyError, TypeError, ValueError) as exc:
                raise DamagedContextError(
                    f"context record {index} is damaged ({type(exc).__name__}: {exc})") from exc
        last = self.correlator.latest_ns  # the latest event time: it only grows
        self.finish(last)
        return last

    @property
    def requests_sampled(self) -> bool:
        """The kernel samples requests (the last sampler context record said so): an upstream request or
        connection that no traced request caused belongs, most likely, to a request that was not sampled,
        so it is left out, and attribution pairs by request line only."""
        return self.correlator.attribution.exact_only

    def tick(self, now_mono_ns: int) -> None:
        """Periodic (after every ring pass): emit connections whose linger time passed, and hand the spans
        built since the last tick to the export queue."""
        self.correlator.expire(now_mono_ns)
        self.flush_spans()

    def finish(self, now_mono_ns: int) -> None:
        """End of run: emit everything, still-open connections ended at ``now_mono_ns``."""
        self.correlator.flush(now_mono_ns)
        self.flush_spans()
        if self.round_worker is not None:
            self.round_worker.stop()

    def flush_spans(self) -> None:
        """Hand the event path's pending spans to the export queue (which never blocks), and count the
        request summaries' spans built since the last call (a plain int per request on the hot path)."""
        if self._summaries:
            self._counts["requests"] += self._summaries
            self._counts["spans"] += self._summaries
            self._summaries = 0
        if self._pending:
            pending, self._pending = self._pending, []
            self.spans_out.submit(pending)

    def _hold(self, spans: list) -> None:
        """Spans built on the event path: handed over SUBMIT_BATCH at a time (and at every tick)."""
        pending = self._pending
        pending.extend(spans)
        if len(pending) >= SUBMIT_BATCH:
            self.flush_spans()

    def _build_failed(self, counts: Counter[str], what: str) -> None:
        """A span builder raised (a bug): counted and logged, tracing goes on."""
        counts["span_build_errors"] += 1
        counts[f"span_build_errors.{what}"] += 1
        log.exception("could not build spans (%s)", what)

    def _on_connection(self, conn: ConnectionRecord) -> None:
        if conn.own:  # the daemon's own admin API call (DownstreamConnections.is_own)
            self._counts["own_connections_left_out"] += 1
            return
        self._submit("connections", self.builder.build_records, conn)

    def _on_startup(self, rec: StartupRecord) -> None:
        self._submit("startups", self.startup_builder.spans, rec)

    def _on_request(self, rr: RequestRecord, exchange: HttpExchange) -> None:
        if self.correlator.downstream.is_own(rr.conn):
            self._counts["own_requests_left_out"] += 1
            return
        self._submit("requests", self.request_builder.downstream, rr, exchange)

    def _on_summary(self, conn: ConnectionRecord, head: KeptHead, span_id: str, ev: RequestKeptEvent) -> None:
        """_on_request for a request summary no upstream request waited for: what _submit does, for the
        one span it has, without its generality (this runs per request)."""
        if self._is_own(conn):
            self._counts["own_requests_left_out"] += 1
            return
        try:
            spans = self._summary_spans(conn, head, span_id, ev)
        except Exception:  # a bug in span building must not stop tracing
            self._build_failed(self._counts, "requests")
            return
        self._summaries += 1
        self._hold(spans)

    def _on_upstream(self, up: UpstreamRecord) -> None:
        if self.requests_sampled and up.cause.request is None and up.cause.conn is None:
            self._counts["upstream_connections_not_sampled"] += 1
            return
        self._submit("upstream_connections", self.request_builder.upstream_connection, up)

    def _on_upstream_request(self, up: UpstreamRecord, exchange: HttpExchange,
                             ids: tuple[str, str, str | None, str]) -> None:
        if self.requests_sampled and ids[2] is None:  # no downstream request, no TLS connection found
            self._counts["upstream_requests_not_sampled"] += 1
            return
        self._submit("upstream_requests_unpaired", self.request_builder.unpaired_upstream_request, up,
                     exchange, ids)

    def _submit(self, what: str, build: Callable[..., list], *args: object,
                counts: Counter[str] | None = None) -> None:
        """Build spans and hand them to the export queue; ``counts``: where to count (the round worker's
        own, on its thread: its spans go at once), else this pipeline's (the event path's spans go in
        batches of SUBMIT_BATCH, and at every tick)."""
        on_event_path = counts is None
        counts = self._counts if counts is None else counts
        try:
            spans = build(*args)
        except Exception:  # a bug in span building must not stop tracing
            self._build_failed(counts, what)
            return
        counts[what] += 1
        counts["spans"] += len(spans)
        if on_event_path:
            self._hold(spans)
        else:
            self.spans_out.submit(spans)

    def drops(self) -> dict[str, int]:
        """User-space drops: decoder errors, correlator evictions, export queue and failures."""
        out: dict[str, int] = {f"decode.{k}": v for k, v in self.decoder.errors.items()}
        out.update({f"correlate.{k}": v for k, v in self.correlator.drops.items()})
        out.update({f"export.{k}": v for k, v in self.spans_out.stats().get("drops", {}).items()})
        out["span_build_errors"] = self.counts["span_build_errors"]
        out["correlation_errors"] = self.counts["correlation_errors"]
        if self.round_worker is not None:
            out["rounds.queue_full"] = self.round_worker.dropped
        return {k: v for k, v in out.items() if v}


class RoundWorker:
    """Builds round and off-CPU wait spans off the event path: resolving their stacks reads ELF files and
    /proc. Live runs use a thread behind a bounded queue (a full queue drops, counted); replays build
    inline (deterministic)."""

    def __init__(self, pipeline: EventPipeline, *, threaded: bool, max_queue: int = 8192) -> None:
        self._pipeline = pipeline
        self.dropped = 0
        self.offered = 0  # rounds and waits handed in (built, failed or dropped)
        self.counts: Counter[str] = Counter()  # what _build counted, on the worker's thread
        self._queue: queue.Queue[tuple[str, object] | None] | None = None
        self._thread: threading.Thread | None = None
        if threaded:
            self._queue = queue.Queue(max_queue)
            self._thread = threading.Thread(target=self._run, name="otel-envoy-rounds", daemon=True)
            self._thread.start()

    def submit_round(self, rec: RoundRecord) -> None:
        """A reported round (called on the event path: never blocks)."""
        self._put("rounds", rec)

    def submit_wait(self, wait: WaitRecord) -> None:
        """A wait outside any round."""
        self._put("waits", wait)

    def _put(self, what: str, item: object) -> None:
        self.offered += 1
        if self._queue is None:
            self._build(what, item)
            return
        try:
            self._queue.put_nowait((what, item))
        except queue.Full:
            self.dropped += 1

    def _build(self, what: str, item: object) -> None:
        builder = self._pipeline.round_builder
        if what == "rounds":
            self._pipeline._submit("rounds", builder.round_spans, item, counts=self.counts)
        else:
            self._pipeline._submit("offcpu_waits", builder.wait_spans, item, counts=self.counts)

    def _run(self) -> None:
        assert self._queue is not None
        name_this_thread("oe-rounds")
        while True:
            item = self._queue.get()
            if item is None:
                return
            self._build(*item)

    def stop(self, timeout: float = 10.0) -> None:
        """Build what is queued, then end the thread."""
        if self._queue is not None and self._thread is not None and self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(timeout)

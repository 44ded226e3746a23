"""The span export pipeline: a bounded, never-blocking queue drained by one background thread.

The hot event path calls :meth:`SpanPipeline.submit` with finished spans -- :class:`SpanRecord`
objects from the span builder, or SDK ``ReadableSpan`` objects; it only appends to a bounded deque
under a lock and counts what does not fit.  A daemon thread takes batches (up to ``max_batch`` spans, or
whatever arrived within ``flush_interval``) and hands each batch to every :class:`SpanSink` in
turn.  Sinks may block (the SDK's OTLP exporters retry with sleeps up to their timeout): that only
delays this thread, while the queue in front of it absorbs or drops spans.

Both sinks encode records with otel-envoy's own encoders: OTLP/JSON text for the file, and the
protobuf request for OTLP, which :class:`OtlpSink` hands to the SDK exporter's transport (so the
SDK's retries, backoff, timeouts, compression and headers apply unchanged).
"""

from __future__ import annotations

import abc
import collections
import functools
import logging
import os
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any, TextIO, TypeAlias
from urllib.parse import urlsplit

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExportResult

from otel_envoy.export.otlp import PROTOCOLS, OtlpSettings, traces_url
from otel_envoy.export.otlp_json import encode_request_json
from otel_envoy.export.records import SpanRecord, encode_request_proto, to_readable_spans

__all__ = [
    "ExportSpan",
    "JsonLinesFileSink",
    "OtlpSink",
    "SpanPipeline",
    "SpanSink",
]

#: What the pipeline and the sinks accept: records (the fast path) or SDK spans.
ExportSpan: TypeAlias = SpanRecord | ReadableSpan

log = logging.getLogger("otel_envoy.export")

_WARN_INTERVAL_S = 30.0


class _RateLimiter:
    """Allows one log line per key per interval; counts what it suppressed in between."""

    def __init__(self, interval: float = _WARN_INTERVAL_S) -> None:
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


class _SdkLogFilter(logging.Filter):
    """Rate-limits the SDK exporters' own per-batch error/retry lines (same message template)."""

    def __init__(self, interval: float = _WARN_INTERVAL_S) -> None:
        super().__init__("otel_envoy.sdk_rate_limit")
        self._limiter = _RateLimiter(interval)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        allowed, _ = self._limiter.allow(f"{record.name}:{record.msg}")
        return allowed


_SDK_LOGGERS = (
    "opentelemetry.exporter.otlp.proto.grpc.exporter",
    "opentelemetry.exporter.otlp.proto.http.trace_exporter",
    "opentelemetry.exporter.otlp.common.http",
)
_sdk_filter = _SdkLogFilter()


def _install_sdk_log_filter() -> None:
    for name in _SDK_LOGGERS:
        logger = logging.getLogger(name)
        if _sdk_filter not in logger.filters:
            logger.addFilter(_sdk_filter)


# --------------------------------------------------------------------------------------------- sinks


class SpanSink(abc.ABC):
    """Somewhere a batch of finished spans goes.  Called from the pipeline's export thread only."""

    #: Short name used in stats and drop reasons (``export_failed:<name>``).
    name: str = "sink"

    @abc.abstractmethod
    def export(self, spans: Sequence[ExportSpan]) -> bool:
        """Export one batch; ``True`` on success.  May raise; the pipeline counts that as a failure."""

    def shutdown(self) -> None:  # noqa: B027 - optional hook, default does nothing
        """Release resources; called once, after the last :meth:`export`."""


class JsonLinesFileSink(SpanSink):
    """Writes one OTLP/JSON ``ExportTraceServiceRequest`` per line, one line per batch.

    The file is truncated when the sink is created and flushed after every batch, so ``show`` (or
    ``tail -f``) sees complete lines.
    """

    def __init__(self, path: str | os.PathLike[str], name: str = "jsonl") -> None:
        """Create (truncate) ``path`` for writing."""
        self.path = os.fspath(path)
        self.name = name
        self._lock = threading.Lock()
        self._file: TextIO | None = open(self.path, "w", encoding="utf-8")  # noqa: SIM115 - long-lived

    def export(self, spans: Sequence[ExportSpan]) -> bool:
        """Append one line for ``spans`` and flush."""
        if not spans:
            return True
        line = encode_request_json(spans)  # a batch is ~1 MB: not copied again to append the newline
        with self._lock:
            if self._file is None:
                return False
            self._file.write(line)
            self._file.write("\n")
            self._file.flush()
        return True

    def shutdown(self) -> None:
        """Close the file."""
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None


class OtlpSink(SpanSink):
    """Sends batches with the SDK's ``OTLPSpanExporter`` (gRPC or HTTP/protobuf).

    Batches are serialised by :func:`otel_envoy.export.records.encode_request_proto` (byte-identical to
    the SDK's encoding, several times faster) and sent through the exporter's own channel / HTTP client,
    with its retries.  Should an SDK release move the internals this relies on, the sink falls back to
    handing the exporter SDK spans.

    ``endpoint=None`` lets the SDK read ``OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT`` itself.  An explicit
    HTTP endpoint is treated as a base URL and gets ``/v1/traces`` appended (unless it already ends
    with it, or ``append_traces_path=False``).  For gRPC, an ``http://`` endpoint means plaintext and
    ``https://`` TLS.  ``headers`` are merged over ``OTEL_EXPORTER_OTLP_(TRACES_)HEADERS`` (keys
    lower-cased); ``timeout`` (seconds) bounds one export including the SDK's retries.
    """

    def __init__(
        self,
        protocol: str = "http/protobuf",
        endpoint: str | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: float = 5.0,
        *,
        append_traces_path: bool = True,
        name: str | None = None,
    ) -> None:
        """Build the SDK exporter (no connection is made until the first export)."""
        if protocol not in PROTOCOLS:
            raise ValueError(f"unknown OTLP protocol {protocol!r} (expected grpc or http/protobuf)")
        self.protocol = protocol
        self.name = name or ("otlp-grpc" if protocol == "grpc" else "otlp-http")
        self._closed = False
        self._lock = threading.Lock()
        _install_sdk_log_filter()
        if protocol == "grpc":
            insecure: bool | None = None
            if endpoint is not None:
                scheme = urlsplit(endpoint).scheme.lower()
                if scheme == "http":
                    insecure = True
                elif scheme == "https":
                    insecure = False
            self.endpoint = endpoint
            self._exporter: Any = _grpc_exporter_type()(
                endpoint=endpoint,
                insecure=insecure,
                headers=_grpc_headers(headers),
                timeout=timeout,
            )
        else:
            if endpoint is not None and append_traces_path:
                endpoint = traces_url(endpoint)
            self.endpoint = endpoint
            self._exporter = _http_exporter_type()(
                endpoint=endpoint,
                headers=dict(headers) if headers else None,
                timeout=timeout,
            )

    @classmethod
    def from_settings(
        cls, settings: OtlpSettings, headers: Mapping[str, str] | None = None, timeout: float = 5.0
    ) -> OtlpSink:
        """Build a sink from :func:`otel_envoy.export.otlp.resolve_otlp_settings` output."""
        return cls(
            settings.protocol,
            settings.export_endpoint,
            headers=headers,
            timeout=timeout,
            append_traces_path=False,
        )

    def export(self, spans: Sequence[ExportSpan]) -> bool:
        """Export one batch through the SDK exporter (blocking, with the SDK's retries)."""
        if self._closed:
            return False
        return self._exporter.export(spans) == SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        """Shut the exporter down; aborts a retry sleep in progress.  Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._exporter.shutdown()


class _EncodedBatch:
    """A serialised ``ExportTraceServiceRequest`` and how many spans it holds."""

    __slots__ = ("count", "payload")

    def __init__(self, payload: bytes, count: int) -> None:
        self.payload = payload
        self.count = count


_TRACE_EXPORT_METHOD = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"


def _pass_bytes(request: Any) -> bytes:
    """gRPC request serialiser: serialised requests go out as they are."""
    return request if type(request) is bytes else request.SerializeToString()


class _RawTraceServiceStub:
    """``TraceServiceStub`` whose Export sends already serialised requests."""

    def __init__(self, channel: Any) -> None:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse

        kwargs = {
            "request_serializer": _pass_bytes,
            "response_deserializer": ExportTraceServiceResponse.FromString,
        }
        try:
            self.Export = channel.unary_unary(_TRACE_EXPORT_METHOD, _registered_method=True, **kwargs)
        except TypeError:  # grpcio before 1.62
            self.Export = channel.unary_unary(_TRACE_EXPORT_METHOD, **kwargs)


@functools.cache
def _grpc_exporter_type() -> type:
    """The SDK's gRPC span exporter, sending requests serialised by :func:`encode_request_proto`.

    The SDK's ``_export`` loop (deadline, retries with backoff, channel re-creation on UNAVAILABLE,
    shutdown) is used unchanged: it calls ``_translate_data`` for the request of each attempt.
    """
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    class GrpcRecordExporter(OTLPSpanExporter):
        def export(self, spans: Sequence[ExportSpan]) -> SpanExportResult:  # type: ignore[override]
            return self._export(_EncodedBatch(encode_request_proto(spans), len(spans)))  # type: ignore[arg-type]

        def _translate_data(self, data: Any) -> Any:
            if type(data) is not _EncodedBatch:
                return super()._translate_data(data)
            if type(self._client) is _RawTraceServiceStub:
                return data.payload
            return ExportTraceServiceRequest.FromString(data.payload)  # a stub of an unknown SDK release

        def _count_data(self, data: Any) -> int:
            return data.count if type(data) is _EncodedBatch else len(data)

        def _initialize_channel_and_stub(self) -> None:  # called at start and on reconnects
            super()._initialize_channel_and_stub()  # type: ignore[misc]
            self._client = _RawTraceServiceStub(self._channel)

    return GrpcRecordExporter


@functools.cache
def _http_exporter_type() -> type:
    """The SDK's HTTP/protobuf span exporter, posting requests serialised by :func:`encode_request_proto`.

    ``export`` follows the SDK's own steps (shutdown check, size limit, export metrics) and sends with
    the exporter's HTTP client, which does the retries, backoff, compression and headers.
    """
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    try:
        from opentelemetry.exporter.otlp.common.http import _OTLPHTTPClient
    except ImportError:  # an SDK release without it: always the fallback
        _OTLPHTTPClient = None

    sdk_log = logging.getLogger(OTLPSpanExporter.__module__)

    class HttpRecordExporter(OTLPSpanExporter):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._encodes_records = (
                _OTLPHTTPClient is not None
                and isinstance(getattr(self, "_client", None), _OTLPHTTPClient)
                and hasattr(self, "_metrics")
                and isinstance(getattr(self, "_max_request_size", None), int)
            )

        def export(self, spans: Sequence[ExportSpan]) -> SpanExportResult:  # type: ignore[override]
            if not self._encodes_records:
                sdk_spans = [s for s in spans if type(s) is not SpanRecord]
                records = [s for s in spans if type(s) is SpanRecord]
                return super().export(sdk_spans + to_readable_spans(records))  # type: ignore[operator]
            if self._shutdown:
                sdk_log.warning("Exporter already shutdown, ignoring batch")
                return SpanExportResult.FAILURE
            with self._metrics.export_operation(len(spans)) as result:
                try:
                    payload = encode_request_proto(spans)
                except Exception as error:
                    sdk_log.error("Failed to encode span batch: %s", error)
                    result.error = error
                    return SpanExportResult.FAILURE
                limit = self._max_request_size
                if 0 < limit < len(payload):
                    sdk_log.warning(
                        "Dropping span batch: serialized size %d bytes exceeds max_request_size %d bytes.",
                        len(payload),
                        limit,
                    )
                    result.error = ValueError(f"request of {len(payload)} bytes exceeds {limit} bytes")
                    return SpanExportResult.FAILURE
                sent = self._client.export(payload)
                if not sent.success:
                    result.error = sent.error
                    return SpanExportResult.FAILURE
            return SpanExportResult.SUCCESS

    return HttpRecordExporter


def _grpc_headers(headers: Mapping[str, str] | None) -> dict[str, str] | None:
    """Explicit headers merged over the env ones (the gRPC exporter would otherwise ignore the env)."""
    if not headers:
        return None
    from opentelemetry.util.re import parse_env_headers

    env_value = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_HEADERS") or os.environ.get(
        "OTEL_EXPORTER_OTLP_HEADERS", ""
    )
    merged = {k.lower(): v for k, v in parse_env_headers(env_value, liberal=True).items()}
    merged.update({k.lower(): v for k, v in headers.items()})
    return merged


# --------------------------------------------------------------------------------------------- pipeline


class SpanPipeline:
    """Bounded span queue plus one daemon thread exporting batches to every sink.

    :meth:`submit` never blocks (beyond a short lock) and never raises for a full queue: spans that
    do not fit are dropped and counted under ``drops["queue_full"]``.  Sink failures (``False`` or
    an exception) are counted as ``drops["export_failed:<sink name>"]`` and logged, rate-limited,
    to the ``otel_envoy.export`` logger.
    """

    def __init__(
        self,
        sinks: Sequence[SpanSink],
        max_queue: int = 20000,
        max_batch: int = 1024,
        flush_interval: float = 0.2,
        *,
        block_when_full: bool = False,
    ) -> None:
        """Start the export thread. ``block_when_full``: :meth:`submit` waits for room instead of dropping
        (for replays, which have no ring buffer to protect and must not lose spans)."""
        if max_queue < 1 or max_batch < 1:
            raise ValueError("max_queue and max_batch must be positive")
        self._sinks: list[SpanSink] = list(sinks)
        self._names = _unique_names(self._sinks)
        self._max_queue = max_queue
        self._block_when_full = block_when_full
        self._max_batch = max_batch
        self._flush_interval = flush_interval
        self._queue: collections.deque[ExportSpan] = collections.deque()
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)  # wakes the export thread
        self._done = threading.Condition(self._lock)  # wakes flush() waiters
        self._accepted = 0  # spans ever put in the queue
        self._processed = 0  # spans taken out of the queue and handled (exported, failed or dropped)
        self._in_flight = 0
        self._flush_waiters = 0
        self._stopping = False
        self._abandon = False
        self._closed = False
        self._drops: collections.Counter[str] = collections.Counter()
        self._exported: dict[str, int] = dict.fromkeys(self._names, 0)
        self._batches: dict[str, int] = dict.fromkeys(self._names, 0)
        self._warn = _RateLimiter()
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
        """Wait until everything submitted so far has been handed to the sinks; ``False`` on timeout."""
        deadline = time.monotonic() + timeout
        with self._lock:
            target = self._accepted
            self._flush_waiters += 1
            try:
                self._work.notify()
                while self._processed < target:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0 or not self._thread.is_alive():
                        return self._processed >= target
                    self._done.wait(remaining)
                return True
            finally:
                self._flush_waiters -= 1

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop accepting spans, drain the queue within ``timeout``, then shut the sinks down.

        Spans still queued when the time is up are dropped (``drops["shutdown"]``) and sinks are shut
        down early, which makes the SDK exporters abandon their retries.  Idempotent.
        """
        deadline = time.monotonic() + max(timeout, 0.0)
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._stopping = True
            self._work.notify()
        # Leave a little of the budget for the sinks' own shutdown.
        self._thread.join(max(0.0, deadline - time.monotonic()) * 0.8)
        if self._thread.is_alive():
            with self._lock:
                self._abandon = True
                self._work.notify()
            # Abort blocking exports (retry sleeps) so the thread can finish.
            self._shutdown_sinks()
            self._thread.join(max(0.05, deadline - time.monotonic()))
            if self._thread.is_alive():
                log.warning("span export thread still busy after shutdown timeout of %.1f s", timeout)
        else:
            self._shutdown_sinks()

    def stats(self) -> dict[str, Any]:
        """Counters: ``exported``/``batches`` per sink, ``drops`` by reason, ``queue_depth``, ..."""
        with self._lock:
            return {
                "submitted": self._accepted + self._drops["queue_full"],
                "accepted": self._accepted,
                "queue_depth": len(self._queue),
                "in_flight": self._in_flight,
                "max_queue": self._max_queue,
                "exported": dict(self._exported),
                "batches": dict(self._batches),
                "drops": {k: v for k, v in self._drops.items() if v},
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
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            if not batch:
                continue
            results = [
                self._export_one(sink, name, batch)
                for sink, name in zip(self._sinks, self._names, strict=True)
            ]
            with self._lock:
                for name, ok in zip(self._names, results, strict=True):
                    if ok:
                        self._exported[name] += len(batch)
                        self._batches[name] += 1
                    else:
                        self._drops[f"export_failed:{name}"] += len(batch)
                self._in_flight = 0
                self._processed += len(batch)
                self._done.notify_all()

    def _export_one(self, sink: SpanSink, name: str, batch: list[ExportSpan]) -> bool:
        try:
            ok = bool(sink.export(batch))
            reason = "export returned failure"
        except Exception as exc:
            ok = False
            reason = f"{type(exc).__name__}: {exc}"
            kind = type(exc).__name__
        else:
            kind = "failure"
        if ok:
            return True
        allowed, suppressed = self._warn.allow(f"{name}:{kind}")
        if allowed:
            more = f" ({suppressed} similar failures suppressed)" if suppressed else ""
            log.warning("span sink %s dropped a batch of %d spans: %s%s", name, len(batch), reason, more)
        return False


def _unique_names(sinks: Sequence[SpanSink]) -> list[str]:
    names: list[str] = []
    for sink in sinks:
        base = getattr(sink, "name", None) or type(sink).__name__
        name, i = base, 2
        while name in names:
            name, i = f"{base}#{i}", i + 1
        names.append(name)
    return names

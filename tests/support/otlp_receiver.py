"""A real, in-process OTLP trace and metrics receiver for integration tests (gRPC and HTTP).

Usage::

    with OtlpReceiver() as rx:
        exporter_endpoint = rx.grpc_endpoint        # "http://127.0.0.1:PORT"
        ...
        spans = rx.wait_for(lambda s: len(s) >= 3, timeout=10)
        points = rx.wait_for_metrics(lambda p: any(x.name == "m" for x in p), timeout=10)

Both servers listen on 127.0.0.1 with free ports.  The gRPC side implements
``opentelemetry.proto.collector.trace.v1.TraceService/Export`` and
``opentelemetry.proto.collector.metrics.v1.MetricsService/Export``; the HTTP side accepts
``POST /v1/traces`` and ``POST /v1/metrics`` with ``application/x-protobuf`` or ``application/json``
bodies (optionally gzip/deflate encoded).  Every accepted trace request is flattened into
:class:`SpanRecord` objects, every metrics request into :class:`MetricPoint` objects (one per data
point).  ``set_failing(True)`` makes both answer with retryable errors (gRPC UNAVAILABLE, HTTP 503),
``set_failing(True, permanent=True)`` with errors that must not be retried (INVALID_ARGUMENT, 400);
``stop()`` then ``start(same_ports=True)`` is a collector restarting.
Trace requests are counted in ``requests`` / ``rejected`` / ``bytes_received``, metrics requests
separately in ``metric_requests`` / ``metric_rejected``.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import socket
import threading
import time
import zlib
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc
from google.protobuf import json_format
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from otel_envoy.export.otlp_json_decode import decode_request_json
from otel_envoy.spans.model import SpanRecord
from tests.support.sdk_oracle import proto_attributes, records_from_proto

__all__ = ["MetricPoint", "OtlpReceiver", "metric_points_from_proto"]


@dataclass(frozen=True, slots=True)
class MetricPoint:
    """One data point of one metric, with its metric's and resource's description.

    ``kind`` is the OTLP data case: ``sum``, ``gauge``, ``histogram``, ``exponential_histogram`` or
    ``summary``.  ``value`` is set for sums and gauges; ``count``, ``sum`` (``None`` when absent),
    ``bucket_counts`` and ``explicit_bounds`` for histograms.  ``temporality``: 1 delta, 2 cumulative.
    """

    name: str
    unit: str
    kind: str
    attributes: dict[str, Any]
    start_ns: int
    time_ns: int
    value: int | float | None = None
    is_monotonic: bool | None = None
    temporality: int | None = None
    count: int | None = None
    sum: float | None = None
    bucket_counts: tuple[int, ...] = ()
    explicit_bounds: tuple[float, ...] = ()
    description: str = ""
    resource_attributes: dict[str, Any] = field(default_factory=dict)
    scope_name: str = ""
    scope_version: str = ""
    protocol: str = ""

    @property
    def series(self) -> tuple[str, tuple[tuple[str, Any], ...]]:
        """``(name, sorted attribute items)``: what identifies a time series within one resource."""
        return self.name, tuple(sorted((k, _hashable(v)) for k, v in self.attributes.items()))


def _hashable(v: Any) -> Any:
    if isinstance(v, list):
        return tuple(_hashable(x) for x in v)
    if isinstance(v, dict):
        return tuple(sorted((k, _hashable(x)) for k, x in v.items()))
    return v


def _point_head(p: Any) -> dict[str, Any]:
    return {"attributes": proto_attributes(p.attributes), "start_ns": p.start_time_unix_nano,
            "time_ns": p.time_unix_nano}


def _metric_points(m: Any, common: dict[str, Any]) -> list[MetricPoint]:
    kind = m.WhichOneof("data") or ""
    head = {"name": m.name, "unit": m.unit, "description": m.description, "kind": kind, **common}
    if kind == "sum":
        extra = {"is_monotonic": m.sum.is_monotonic, "temporality": int(m.sum.aggregation_temporality)}
        return [MetricPoint(value=p.as_int if p.WhichOneof("value") == "as_int" else p.as_double,
                            **_point_head(p), **extra, **head) for p in m.sum.data_points]
    if kind == "gauge":
        return [MetricPoint(value=p.as_int if p.WhichOneof("value") == "as_int" else p.as_double,
                            **_point_head(p), **head) for p in m.gauge.data_points]
    if kind in ("histogram", "exponential_histogram"):
        data = getattr(m, kind)
        return [MetricPoint(
            temporality=int(data.aggregation_temporality), count=p.count,
            sum=p.sum if p.HasField("sum") else None,
            bucket_counts=tuple(p.bucket_counts) if kind == "histogram" else (),
            explicit_bounds=tuple(p.explicit_bounds) if kind == "histogram" else (),
            **_point_head(p), **head) for p in data.data_points]
    if kind == "summary":
        return [MetricPoint(count=p.count, sum=p.sum, **_point_head(p), **head)
                for p in m.summary.data_points]
    return []


def metric_points_from_proto(request: Any, protocol: str = "") -> list[MetricPoint]:
    """Flatten an ``ExportMetricsServiceRequest`` into :class:`MetricPoint` objects."""
    out: list[MetricPoint] = []
    for rm in request.resource_metrics:
        resource = proto_attributes(rm.resource.attributes)
        for sm in rm.scope_metrics:
            common = {"resource_attributes": resource, "scope_name": sm.scope.name,
                      "scope_version": sm.scope.version, "protocol": protocol}
            for m in sm.metrics:
                out.extend(_metric_points(m, common))
    return out


class _TraceService(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, receiver: OtlpReceiver) -> None:
        self._rx = receiver

    def Export(self, request: Any, context: grpc.ServicerContext) -> Any:
        if self._rx._count("grpc"):
            code = grpc.StatusCode.INVALID_ARGUMENT if self._rx._permanent else grpc.StatusCode.UNAVAILABLE
            context.abort(code, "test receiver is failing on purpose")
        self._rx._add("grpc", records_from_proto(request), request.ByteSize())
        return trace_service_pb2.ExportTraceServiceResponse()


class _MetricsService(metrics_service_pb2_grpc.MetricsServiceServicer):
    def __init__(self, receiver: OtlpReceiver) -> None:
        self._rx = receiver

    def Export(self, request: Any, context: grpc.ServicerContext) -> Any:
        if self._rx._count_metrics("grpc"):
            context.abort(grpc.StatusCode.UNAVAILABLE, "test receiver is failing on purpose")
        self._rx._add_metrics(metric_points_from_proto(request, "grpc"))
        return metrics_service_pb2.ExportMetricsServiceResponse()


def _make_handler(rx: OtlpReceiver) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def setup(self) -> None:
            super().setup()
            with rx._cond:
                rx._http_connections.add(self.connection)

        def finish(self) -> None:
            with rx._cond:
                rx._http_connections.discard(self.connection)
            super().finish()

        def _reply(self, code: int, body: bytes, ctype: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length)
            path = self.path.split("?", 1)[0]
            if path not in ("/v1/traces", "/v1/metrics"):
                self._reply(404, b"not found", "text/plain")
                return
            encoding = (self.headers.get("Content-Encoding") or "").lower()
            try:
                if encoding == "gzip":
                    body = gzip.decompress(body)
                elif encoding == "deflate":
                    body = zlib.decompress(body)
            except (OSError, zlib.error) as exc:
                self._reply(400, f"bad {encoding} body: {exc}".encode(), "text/plain")
                return
            ctype = (self.headers.get("Content-Type") or "").split(";", 1)[0].strip().lower()
            if ctype == "application/x-protobuf":
                protocol = "http/protobuf"
            elif ctype == "application/json":
                protocol = "http/json"
            else:
                self._reply(415, f"unsupported content type {ctype!r}".encode(), "text/plain")
                return
            if path == "/v1/metrics":
                self._metrics(protocol, body, ctype)
                return
            if rx._count(protocol):
                self._reply(400 if rx._permanent else 503, b"test receiver is failing on purpose",
                            "text/plain")
                return
            try:
                if protocol == "http/protobuf":
                    request = trace_service_pb2.ExportTraceServiceRequest.FromString(body)
                    records = records_from_proto(request)
                    reply = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
                else:
                    records = decode_request_json(json.loads(body))
                    reply = b"{}"
            except Exception as exc:
                rx._reject(protocol)
                self._reply(400, f"cannot decode request: {exc}".encode(), "text/plain")
                return
            rx._add(protocol, records, len(body))
            self._reply(200, reply, ctype)

        def _metrics(self, protocol: str, body: bytes, ctype: str) -> None:
            if rx._count_metrics(protocol):
                self._reply(503, b"test receiver is failing on purpose", "text/plain")
                return
            request = metrics_service_pb2.ExportMetricsServiceRequest()
            try:
                if protocol == "http/protobuf":
                    request.ParseFromString(body)
                    reply = metrics_service_pb2.ExportMetricsServiceResponse().SerializeToString()
                else:
                    json_format.Parse(body, request, ignore_unknown_fields=True)
                    reply = b"{}"
                points = metric_points_from_proto(request, protocol)
            except Exception as exc:
                rx._reject_metrics(protocol)
                self._reply(400, f"cannot decode request: {exc}".encode(), "text/plain")
                return
            rx._add_metrics(points)
            self._reply(200, reply, ctype)

    return Handler


class OtlpReceiver:
    """In-process OTLP receiver (gRPC + HTTP) collecting :class:`SpanRecord` objects.  Thread-safe."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        """Prepare (but do not start) both servers; use as a context manager or call :meth:`start`."""
        self._host = host
        self._cond = threading.Condition()
        self._spans: list[SpanRecord] = []
        self._requests: dict[str, int] = {"grpc": 0, "http/protobuf": 0, "http/json": 0}
        self._rejected: dict[str, int] = {"grpc": 0, "http/protobuf": 0, "http/json": 0}
        self._bytes: dict[str, int] = {"grpc": 0, "http/protobuf": 0, "http/json": 0}
        self._metric_points: list[MetricPoint] = []
        self._metric_requests: dict[str, int] = {"grpc": 0, "http/protobuf": 0, "http/json": 0}
        self._metric_rejected: dict[str, int] = {"grpc": 0, "http/protobuf": 0, "http/json": 0}
        self._failing = False
        self._permanent = False
        self._http_connections: set[socket.socket] = set()
        self._grpc_server: grpc.Server | None = None
        self._http_server: ThreadingHTTPServer | None = None
        self._http_thread: threading.Thread | None = None
        self.grpc_port = 0
        self.http_port = 0

    # -- lifecycle ------------------------------------------------------------------------------------

    def start(self, *, same_ports: bool = False) -> OtlpReceiver:
        """Start both servers on free ports; ``same_ports``: on the ports of the last start (a collector
        restarting after :meth:`stop`)."""
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_TraceService(self), server)
        metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(_MetricsService(self), server)
        grpc_port = self.grpc_port if same_ports else 0
        self.grpc_port = server.add_insecure_port(f"{self._host}:{grpc_port}")
        if same_ports and self.grpc_port != grpc_port:
            raise RuntimeError(f"OTLP receiver: gRPC port {grpc_port} is taken")
        server.start()
        self._grpc_server = server

        httpd = ThreadingHTTPServer((self._host, self.http_port if same_ports else 0), _make_handler(self))
        httpd.daemon_threads = True
        self.http_port = httpd.server_address[1]
        self._http_server = httpd
        self._http_thread = threading.Thread(
            target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="otlp-receiver-http", daemon=True
        )
        self._http_thread.start()
        return self

    def stop(self) -> None:
        """Stop both servers."""
        if self._grpc_server is not None:
            self._grpc_server.stop(grace=0.2).wait(2.0)
            self._grpc_server = None
        if self._http_server is not None:
            self._http_server.shutdown()
            self._http_server.server_close()
            self._http_server = None
            with self._cond:  # a collector that stops closes its clients' kept-alive connections too
                for conn in list(self._http_connections):
                    with contextlib.suppress(OSError):
                        conn.shutdown(socket.SHUT_RDWR)
        if self._http_thread is not None:
            self._http_thread.join(2.0)
            self._http_thread = None

    def __enter__(self) -> OtlpReceiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- endpoints ------------------------------------------------------------------------------------

    @property
    def grpc_endpoint(self) -> str:
        """``http://127.0.0.1:PORT`` of the gRPC server (plaintext)."""
        return f"http://{self._host}:{self.grpc_port}"

    @property
    def http_endpoint(self) -> str:
        """``http://127.0.0.1:PORT`` base URL of the HTTP server (traces go to ``/v1/traces``)."""
        return f"http://{self._host}:{self.http_port}"

    # -- results --------------------------------------------------------------------------------------

    def spans(self) -> list[SpanRecord]:
        """A copy of every span received so far, in arrival order."""
        with self._cond:
            return list(self._spans)

    @property
    def requests(self) -> dict[str, int]:
        """Requests received per protocol (``grpc``, ``http/protobuf``, ``http/json``), failed included."""
        with self._cond:
            return dict(self._requests)

    @property
    def rejected(self) -> dict[str, int]:
        """Requests answered with an error per protocol (failing mode or undecodable body)."""
        with self._cond:
            return dict(self._rejected)

    @property
    def bytes_received(self) -> dict[str, int]:
        """Payload bytes of accepted requests per protocol."""
        with self._cond:
            return dict(self._bytes)

    def metric_points(self) -> list[MetricPoint]:
        """A copy of every metric data point received so far, in arrival order."""
        with self._cond:
            return list(self._metric_points)

    def latest_metric_points(self, name: str) -> dict[tuple[tuple[str, Any], ...], MetricPoint]:
        """The newest point of each series of metric ``name``, keyed by its sorted attribute items."""
        latest: dict[tuple[tuple[str, Any], ...], MetricPoint] = {}
        for p in self.metric_points():
            if p.name == name:
                key = p.series[1]
                if key not in latest or p.time_ns >= latest[key].time_ns:
                    latest[key] = p
        return latest

    @property
    def metric_requests(self) -> dict[str, int]:
        """Metrics requests received per protocol, failed included."""
        with self._cond:
            return dict(self._metric_requests)

    @property
    def metric_rejected(self) -> dict[str, int]:
        """Metrics requests answered with an error per protocol."""
        with self._cond:
            return dict(self._metric_rejected)

    def wait_for_metrics(
        self, predicate: Callable[[list[MetricPoint]], bool], timeout: float = 10.0
    ) -> list[MetricPoint]:
        """Wait until ``predicate(points)`` is true and return the points; ``TimeoutError`` otherwise."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                snapshot = list(self._metric_points)
                if predicate(snapshot):
                    return snapshot
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(
                        f"OTLP receiver: metrics condition not met within {timeout:g} s; "
                        f"{len(snapshot)} points received ({sorted({p.name for p in snapshot})}), "
                        f"requests={self._metric_requests}, rejected={self._metric_rejected}"
                    )
                self._cond.wait(min(remaining, 0.25))

    def clear(self) -> None:
        """Forget received spans, metric points and counters."""
        with self._cond:
            self._spans.clear()
            self._metric_points.clear()
            for d in (self._requests, self._rejected, self._bytes,
                      self._metric_requests, self._metric_rejected):
                for k in d:
                    d[k] = 0

    def set_failing(self, failing: bool, *, permanent: bool = False) -> None:
        """Make both servers answer every export with a retryable error (UNAVAILABLE / 503), or with
        ``permanent``, one that says never to send that request again (INVALID_ARGUMENT / 400)."""
        with self._cond:
            self._failing = failing
            self._permanent = permanent

    def wait_for(
        self, predicate: Callable[[list[SpanRecord]], bool], timeout: float = 10.0
    ) -> list[SpanRecord]:
        """Wait until ``predicate(spans)`` is true and return the spans; ``TimeoutError`` otherwise."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                snapshot = list(self._spans)
                if predicate(snapshot):
                    return snapshot
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(
                        f"OTLP receiver: condition not met within {timeout:g} s; "
                        f"{len(snapshot)} spans received, requests={self._requests}, "
                        f"rejected={self._rejected}"
                    )
                self._cond.wait(min(remaining, 0.25))

    # -- server callbacks -----------------------------------------------------------------------------

    def _count(self, protocol: str) -> bool:
        """Count a request; ``True`` if it must be failed."""
        with self._cond:
            self._requests[protocol] += 1
            if self._failing:
                self._rejected[protocol] += 1
            return self._failing

    def _reject(self, protocol: str) -> None:
        with self._cond:
            self._rejected[protocol] += 1

    def _add(self, protocol: str, records: list[SpanRecord], size: int) -> None:
        with self._cond:
            self._spans.extend(records)
            self._bytes[protocol] += size
            self._cond.notify_all()

    def _count_metrics(self, protocol: str) -> bool:
        """Count a metrics request; ``True`` if it must be failed."""
        with self._cond:
            self._metric_requests[protocol] += 1
            if self._failing:
                self._metric_rejected[protocol] += 1
            return self._failing

    def _reject_metrics(self, protocol: str) -> None:
        with self._cond:
            self._metric_rejected[protocol] += 1

    def _add_metrics(self, points: list[MetricPoint]) -> None:
        with self._cond:
            self._metric_points.extend(points)
            self._cond.notify_all()

"""A real, in-process OTLP trace receiver for integration tests (gRPC and HTTP).

Usage::

    with OtlpReceiver() as rx:
        exporter_endpoint = rx.grpc_endpoint        # "http://127.0.0.1:PORT"
        ...
        spans = rx.wait_for(lambda s: len(s) >= 3, timeout=10)

Both servers listen on 127.0.0.1 with free ports.  The gRPC side implements
``opentelemetry.proto.collector.trace.v1.TraceService/Export``; the HTTP side accepts
``POST /v1/traces`` with ``application/x-protobuf`` or ``application/json`` bodies (optionally
gzip/deflate encoded).  Every accepted request is flattened into :class:`SpanRecord` objects.
``set_failing(True)`` makes both answer with retryable errors (gRPC UNAVAILABLE, HTTP 503).
"""

from __future__ import annotations

import gzip
import json
import threading
import time
import zlib
from collections.abc import Callable
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from otel_envoy.export.otlp_json import decode_request_json
from otel_envoy.export.records import SpanRecord, records_from_proto

__all__ = ["OtlpReceiver"]


class _TraceService(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, receiver: OtlpReceiver) -> None:
        self._rx = receiver

    def Export(self, request: Any, context: grpc.ServicerContext) -> Any:
        if self._rx._count("grpc"):
            context.abort(grpc.StatusCode.UNAVAILABLE, "test receiver is failing on purpose")
        self._rx._add("grpc", records_from_proto(request), request.ByteSize())
        return trace_service_pb2.ExportTraceServiceResponse()


def _make_handler(rx: OtlpReceiver) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _reply(self, code: int, body: bytes, ctype: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length)
            if self.path.split("?", 1)[0] != "/v1/traces":
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
            if rx._count(protocol):
                self._reply(503, b"test receiver is failing on purpose", "text/plain")
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
        self._failing = False
        self._grpc_server: grpc.Server | None = None
        self._http_server: ThreadingHTTPServer | None = None
        self._http_thread: threading.Thread | None = None
        self.grpc_port = 0
        self.http_port = 0

    # -- lifecycle ------------------------------------------------------------------------------------

    def start(self) -> OtlpReceiver:
        """Start both servers on free ports."""
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_TraceService(self), server)
        self.grpc_port = server.add_insecure_port(f"{self._host}:0")
        server.start()
        self._grpc_server = server

        httpd = ThreadingHTTPServer((self._host, 0), _make_handler(self))
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

    def clear(self) -> None:
        """Forget received spans and counters."""
        with self._cond:
            self._spans.clear()
            for d in (self._requests, self._rejected, self._bytes):
                for k in d:
                    d[k] = 0

    def set_failing(self, failing: bool) -> None:
        """Make both servers answer every export with a retryable error (UNAVAILABLE / 503)."""
        with self._cond:
            self._failing = failing

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

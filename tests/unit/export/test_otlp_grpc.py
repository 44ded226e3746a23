"""The OTLP/gRPC sender: settings as the SDK exporter resolves them, and its retries against a scripted
server."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from google.rpc.error_details_pb2 import RetryInfo

from otel_envoy.export.otlp_grpc import RETRYABLE_CODES, GrpcTraceSender
from tests.support.senders import assert_shutdown_ends_a_backoff

PAYLOAD = b"\x0a\x00"  # one empty ResourceSpans


class ScriptedServer:
    """A TraceService/Export endpoint answering with the scripted status codes, then OK."""

    def __init__(self) -> None:
        self.script: list[tuple[grpc.StatusCode, float | None]] = []
        self.calls: list[tuple[bytes, dict[str, str]]] = []
        self._lock = threading.Lock()
        handler = grpc.method_handlers_generic_handler(
            "opentelemetry.proto.collector.trace.v1.TraceService",
            {"Export": grpc.unary_unary_rpc_method_handler(self._export)})
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), handlers=[handler])
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        self._server.start()

    def _export(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        with self._lock:
            self.calls.append((request, dict(context.invocation_metadata())))
            code, delay = self.script.pop(0) if self.script else (grpc.StatusCode.OK, None)
        if code != grpc.StatusCode.OK:
            if delay is not None:
                info = RetryInfo(retry_delay=Duration(seconds=int(delay), nanos=int(delay % 1 * 1e9)))
                context.set_trailing_metadata((("google.rpc.retryinfo-bin", info.SerializeToString()),))
            context.abort(code, "scripted failure")
        return b""

    def stop(self) -> None:
        self._server.stop(0).wait(2.0)


@pytest.fixture
def server() -> Iterator[ScriptedServer]:
    s = ScriptedServer()
    yield s
    s.stop()


def _sender(server: ScriptedServer, timeout: float = 5.0, **kw: Any) -> GrpcTraceSender:
    env = kw.pop("env", {})
    return GrpcTraceSender(f"http://127.0.0.1:{server.port}", True, timeout=timeout, env=env, **kw)


# --------------------------------------------------------------------------------------------- settings


def test_target_and_plaintext_follow_the_endpoint_and_the_environment() -> None:
    cases: list[tuple[str | None, bool | None, dict[str, str], str, bool]] = [
        ("http://h:4317", True, {}, "h:4317", True),
        ("https://h:4317", False, {}, "h:4317", False),
        (None, None, {"OTEL_EXPORTER_OTLP_ENDPOINT": "https://c:4317"}, "c:4317", False),
        (None, None, {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://t:1",
                      "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:2"}, "t:1", True),
        (None, None, {}, "localhost:4317", True),
        ("c:4317", None, {}, "c:4317", False),  # no scheme: TLS, as the SDK does
        ("c:4317", None, {"OTEL_EXPORTER_OTLP_INSECURE": "true"}, "c:4317", True),
        ("c:4317", None, {"OTEL_EXPORTER_OTLP_TRACES_INSECURE": "TRUE"}, "c:4317", True),
        ("https://h:1", None, {"OTEL_EXPORTER_OTLP_TRACES_INSECURE": "true"}, "h:1", False),  # https wins
    ]
    for endpoint, insecure, env, target, plaintext in cases:
        sender = GrpcTraceSender(endpoint, insecure, env=env)
        try:
            assert (sender.target, sender.insecure) == (target, plaintext), (endpoint, env)
        finally:
            sender.shutdown()


def test_headers_compression_timeout_and_codes_from_the_environment() -> None:
    env = {"OTEL_EXPORTER_OTLP_HEADERS": "Authorization=Bearer x,team=a",
           "OTEL_EXPORTER_OTLP_COMPRESSION": "gzip", "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT": "3",
           "OTEL_PYTHON_EXPORTER_OTLP_GRPC_RETRYABLE_ERROR_CODES": "unavailable, internal"}
    sender = GrpcTraceSender("http://h:1", True, headers={"Team": "b"}, env=env)
    try:
        assert sender.metadata == (("authorization", "Bearer x"), ("team", "b"))
        assert sender.compression == grpc.Compression.Gzip
        assert sender.timeout == 3.0
        assert sender.retryable == {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL}
    finally:
        sender.shutdown()
    sender = GrpcTraceSender("http://h:1", True, timeout=5.0, env={"OTEL_EXPORTER_OTLP_COMPRESSION": "none"})
    try:
        assert sender.compression == grpc.Compression.NoCompression and sender.timeout == 5.0
        assert sender.retryable == RETRYABLE_CODES
    finally:
        sender.shutdown()
    with pytest.raises(ValueError, match="COMPRESSION"):
        GrpcTraceSender("http://h:1", True, env={"OTEL_EXPORTER_OTLP_TRACES_COMPRESSION": "brotli"})


# --------------------------------------------------------------------------------------------- sending


def test_the_request_goes_out_as_it_is_with_the_headers(server: ScriptedServer) -> None:
    sender = _sender(server, headers={"X-Tenant": "t1"})
    try:
        assert sender.send(PAYLOAD)
    finally:
        sender.shutdown()
    ((request, metadata),) = server.calls
    assert request == PAYLOAD
    assert metadata["x-tenant"] == "t1"
    assert metadata["user-agent"].startswith("OTel-OTLP-Exporter-Python/")


def test_a_retryable_failure_is_retried_after_the_delay_the_server_asks_for(server: ScriptedServer) -> None:
    server.script = [(grpc.StatusCode.RESOURCE_EXHAUSTED, 0.05), (grpc.StatusCode.ABORTED, 0.05)]
    sender = _sender(server)
    try:
        started = time.monotonic()
        assert sender.send(PAYLOAD)
        assert time.monotonic() - started < 0.8  # not the 1 s + 2 s of the exponential backoff
    finally:
        sender.shutdown()
    assert len(server.calls) == 3 and sender.reconnects == 0


def test_unavailable_builds_a_new_channel_once(server: ScriptedServer) -> None:
    server.script = [(grpc.StatusCode.UNAVAILABLE, 0.01), (grpc.StatusCode.UNAVAILABLE, 0.01)]
    sender = _sender(server)
    try:
        assert sender.send(PAYLOAD)
    finally:
        sender.shutdown()
    assert len(server.calls) == 3 and sender.reconnects == 1


def test_a_failure_that_is_not_retryable_ends_the_export(server: ScriptedServer) -> None:
    server.script = [(grpc.StatusCode.INVALID_ARGUMENT, None)]
    sender = _sender(server)
    try:
        assert not sender.send(PAYLOAD)
    finally:
        sender.shutdown()
    assert len(server.calls) == 1


def test_no_retry_past_the_deadline(server: ScriptedServer) -> None:
    server.script = [(grpc.StatusCode.UNAVAILABLE, 3.0)]
    sender = _sender(server, timeout=1.0)
    try:
        started = time.monotonic()
        assert not sender.send(PAYLOAD)
        assert time.monotonic() - started < 0.9
    finally:
        sender.shutdown()
    assert len(server.calls) == 1


def test_shutdown_ends_a_backoff_and_later_sends(server: ScriptedServer) -> None:
    server.script = [(grpc.StatusCode.UNAVAILABLE, 5.0)]
    sender = _sender(server, timeout=10.0)
    assert_shutdown_ends_a_backoff(sender, server.calls, PAYLOAD)

"""The OTLP/HTTP sender: settings as the SDK exporter resolves them, and its retries against a scripted
server."""

from __future__ import annotations

import gzip
import socket
import threading
import time
import zlib
from collections.abc import Iterator
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from otel_envoy.export import otlp_http
from otel_envoy.export.otlp_http import HttpTraceSender
from tests.support.senders import assert_shutdown_ends_a_backoff

PAYLOAD = b"\x0a\x00"  # one empty ResourceSpans


class ScriptedServer:
    """An OTLP/HTTP endpoint answering with the scripted statuses (and headers), then 200."""

    def __init__(self) -> None:
        self.script: list[tuple[int, dict[str, str]]] = []
        self.calls: list[tuple[str, dict[str, str], bytes]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                server.calls.append((self.path, {k.lower(): v for k, v in self.headers.items()}, body))
                status, headers = server.script.pop(0) if server.script else (200, {})
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}/v1/traces"
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(2.0)


@pytest.fixture
def server() -> Iterator[ScriptedServer]:
    s = ScriptedServer()
    yield s
    s.stop()


# --------------------------------------------------------------------------------------------- settings


def test_url_headers_compression_and_timeout_from_the_environment() -> None:
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318/",
           "OTEL_EXPORTER_OTLP_HEADERS": "Authorization=k,a=1",
           "OTEL_EXPORTER_OTLP_COMPRESSION": "GZIP", "OTEL_EXPORTER_OTLP_TIMEOUT": "4"}
    sender = HttpTraceSender(None, headers={"A": "2"}, env=env)
    assert sender.url == "http://c:4318/v1/traces"
    assert sender.timeout == 4.0 and sender.compression == "gzip"
    assert sender.headers["content-type"] == "application/x-protobuf"
    assert sender.headers["user-agent"].startswith("OTel-OTLP-Exporter-Python/")
    assert (sender.headers["authorization"], sender.headers["a"]) == ("k", "2")
    assert sender.headers["Content-Encoding"] == "gzip"
    sender.shutdown()
    sender = HttpTraceSender(None, timeout=1.5, env={"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://t/custom",
                                                     "OTEL_EXPORTER_OTLP_COMPRESSION": "zstd"})
    assert (sender.url, sender.timeout, sender.compression) == ("http://t/custom", 1.5, "none")
    assert "Content-Encoding" not in sender.headers
    sender.shutdown()
    assert HttpTraceSender(None, env={}).url == "http://localhost:4318/v1/traces"


# --------------------------------------------------------------------------------------------- sending


@pytest.mark.parametrize("compression", ["none", "gzip", "deflate"])
def test_the_request_is_posted_as_it_is(server: ScriptedServer, compression: str) -> None:
    sender = HttpTraceSender(server.url, headers={"X-Tenant": "t1"}, timeout=5.0,
                             env={"OTEL_EXPORTER_OTLP_COMPRESSION": compression})
    try:
        assert sender.send(PAYLOAD)
    finally:
        sender.shutdown()
    ((path, headers, body),) = server.calls
    assert path == "/v1/traces" and headers["content-type"] == "application/x-protobuf"
    assert headers["x-tenant"] == "t1"
    if compression == "gzip":
        assert headers["content-encoding"] == "gzip" and gzip.decompress(body) == PAYLOAD
    elif compression == "deflate":

        assert headers["content-encoding"] == "deflate" and zlib.decompress(body) == PAYLOAD
    else:
        assert "content-encoding" not in headers and body == PAYLOAD


def test_retryable_statuses_are_retried_after_retry_after(server: ScriptedServer) -> None:
    past = formatdate(time.time() - 60, usegmt=True)
    server.script = [(503, {"Retry-After": "0"}), (429, {"Retry-After": past}),
                     (502, {"Retry-After": "0.05"})]
    sender = HttpTraceSender(server.url, timeout=5.0, env={})
    try:
        started = time.monotonic()
        assert sender.send(PAYLOAD)
        assert time.monotonic() - started < 0.8  # not 1 s + 2 s + 4 s of exponential backoff
    finally:
        sender.shutdown()
    assert len(server.calls) == 4


@pytest.mark.parametrize("status", [400, 404, 500])
def test_other_statuses_end_the_export(server: ScriptedServer, status: int) -> None:
    server.script = [(status, {})]
    sender = HttpTraceSender(server.url, timeout=5.0, env={})
    try:
        assert not sender.send(PAYLOAD)
    finally:
        sender.shutdown()
    assert len(server.calls) == 1


def test_no_retry_past_the_deadline(server: ScriptedServer) -> None:
    server.script = [(503, {"Retry-After": "3"})]
    sender = HttpTraceSender(server.url, timeout=1.0, env={})
    try:
        started = time.monotonic()
        assert not sender.send(PAYLOAD)
        assert time.monotonic() - started < 0.9
    finally:
        sender.shutdown()
    assert len(server.calls) == 1


def test_a_refused_connection_is_retried_then_given_up_within_the_timeout() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sender = HttpTraceSender(f"http://127.0.0.1:{port}/v1/traces", timeout=1.5, env={})
    try:
        started = time.monotonic()
        assert not sender.send(PAYLOAD)  # refused, at once again, then after ~1 s: no time for a third
        assert time.monotonic() - started < 1.5
    finally:
        sender.shutdown()


def test_too_large_requests_are_dropped_before_sending(server: ScriptedServer,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(otlp_http, "MAX_REQUEST_BYTES", 1)
    sender = HttpTraceSender(server.url, timeout=5.0, env={})
    try:
        assert not sender.send(PAYLOAD)
    finally:
        sender.shutdown()
    assert server.calls == []


def test_shutdown_ends_a_backoff_and_later_sends(server: ScriptedServer) -> None:
    server.script = [(503, {"Retry-After": "5"})]
    sender = HttpTraceSender(server.url, timeout=10.0, env={})
    assert_shutdown_ends_a_backoff(sender, server.calls, PAYLOAD)

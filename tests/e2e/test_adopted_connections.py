"""Connections a real Envoy accepted before the daemon started: adopted from the kernel's socket table, their
spans marked ``envoy.connection.adopted`` and started at the adoption, not at a start nobody saw."""

from __future__ import annotations

import json
import socket
import ssl
import time

import pytest

from otel_envoy.lab.envoy_config import PLAIN_LISTENER
from otel_envoy.lab.lab import EnvoyLab
from otel_envoy.spans.model import SpanRecord
from tests.support.daemon import DaemonProcess
from tests.support.otlp_receiver import OtlpReceiver

pytestmark = pytest.mark.root

REQUEST = b"GET /adopted HTTP/1.1\r\nHost: lab\r\n\r\n"


def _exchange(s: socket.socket) -> None:
    """One keep-alive request on ``s``, its answer read whole (the lab's direct response is small)."""
    s.sendall(REQUEST)
    answer = b""
    while b"\r\n\r\n" not in answer:
        chunk = s.recv(65536)
        assert chunk, answer
        answer += chunk
    assert answer.startswith(b"HTTP/1.1 200"), answer[:100]


def _connection_of(spans: list[SpanRecord], client_port: int) -> SpanRecord | None:
    return next((s for s in spans if s.name == "envoy.downstream.connection"
                 and s.attributes.get("network.peer.port") == client_port), None)


def test_connections_open_before_the_daemon_are_adopted(tmp_path) -> None:
    summary = tmp_path / "summary.json"
    receiver = OtlpReceiver().start()
    with EnvoyLab(concurrency=2, direct_response=True) as lab:
        plain = socket.create_connection(("127.0.0.1", lab.http_port), timeout=5)
        _exchange(plain)  # served before the daemon exists
        context = ssl.create_default_context(cafile=str(lab.ca_path))
        context.set_alpn_protocols(["http/1.1"])
        tls = context.wrap_socket(socket.create_connection(("127.0.0.1", lab.tls_port), timeout=5),
                                  server_hostname="a.example.com")
        _exchange(tls)
        before_daemon, envoy_pid = time.time_ns(), lab.pid
        daemon = DaemonProcess(["--pid", str(lab.pid), "--envoy-admin", lab.admin_url,
                                "--otlp-endpoint", receiver.grpc_endpoint, "--otlp-protocol", "grpc",
                                "--summary-json", str(summary)], tmp_path).start()
        try:
            _exchange(plain)
            _exchange(plain)
            _exchange(tls)
            plain_port, tls_port = plain.getsockname()[1], tls.getsockname()[1]
            plain.close()
            tls.close()
            fresh = socket.create_connection(("127.0.0.1", lab.http_port), timeout=5)
            _exchange(fresh)
            fresh_port = fresh.getsockname()[1]
            fresh.close()
            spans = receiver.wait_for(lambda s: all(_connection_of(s, p) for p in
                                                    (plain_port, tls_port, fresh_port)), timeout=20)
        finally:
            code = daemon.stop()
            receiver.stop()
    assert code == 0, daemon.stderr()
    adopted_plain, adopted_tls, fresh_span = (_connection_of(spans, p)
                                              for p in (plain_port, tls_port, fresh_port))
    for span in (adopted_plain, adopted_tls):
        assert span is not None
        assert span.attributes.get("envoy.connection.adopted") is True, span.attributes
        assert span.attributes["process.pid"] == envoy_pid
        assert span.start_ns >= before_daemon, "an adopted span claims a start the daemon never saw"
        assert "otel_envoy.partial" not in span.attributes, span.attributes
        # only what it did under the daemon: the request served before it is not counted
        assert span.attributes["envoy.connection.close_initiator"] == "peer", span.attributes
        children = {s.name for s in spans if s.trace_id == span.trace_id and s.parent_span_id == span.span_id}
        assert not children & {"tcp.accept_queue", "envoy.listener_filters", "tls.handshake"}, children
    assert adopted_plain.attributes["envoy.connection.bytes_received"] == 2 * len(REQUEST)
    assert adopted_plain.attributes["envoy.listener.name"] == PLAIN_LISTENER
    assert adopted_plain.attributes["network.local.port"] == lab.http_port
    requests = [s for s in spans if s.trace_id == adopted_plain.trace_id and s.name.startswith("GET")]
    assert len(requests) == 2, [s.name for s in spans if s.trace_id == adopted_plain.trace_id]
    assert all(r.attributes.get("url.path") == "/adopted" for r in requests)
    assert adopted_tls.attributes["envoy.connection.bytes_received"] > len(REQUEST)  # one TLS record or more
    assert adopted_tls.attributes["network.local.port"] == lab.tls_port
    assert fresh_span is not None and "envoy.connection.adopted" not in fresh_span.attributes
    adopted = json.loads(summary.read_text())["adopted_connections"]
    assert adopted.get("adopted") == 2, adopted

"""Connections a real Envoy accepted before the daemon started: adopted from the kernel's socket table, their
spans marked ``envoy.connection.adopted`` and started at the adoption, not at a start nobody saw."""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import sys
import time

import pytest

from otel_envoy.lab.envoy_config import PLAIN_LISTENER
from otel_envoy.lab.lab import EnvoyLab
from otel_envoy.spans.model import SpanRecord
from tests.support.capabilities import daemonset_capabilities
from tests.support.daemon import DaemonProcess
from tests.support.otlp_receiver import OtlpReceiver

pytestmark = pytest.mark.root

REQUEST = b"GET /adopted HTTP/1.1\r\nHost: lab\r\n\r\n"
ENVOY_ADDRESS, CLIENT_ADDRESS = "10.199.1.1", "10.199.1.2"  # on the loopback of Envoy's namespace


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


def test_adopted_connections_are_not_decided_at_the_first_bytes_the_kernel_sees(tmp_path) -> None:
    """A plaintext connection is decided whole (by the ratio) when its first bytes are no HTTP/1.x request:
    h2c, or no HTTP at all. The first bytes the kernel sees of an adopted connection are from its middle (a
    TLS application-data record; a write before any read), so it is not decided again that way: every
    connection adoption picked (adoption samples by the same ratio) makes its span."""
    summary = tmp_path / "summary.json"
    receiver = OtlpReceiver().start()
    with EnvoyLab(concurrency=1, direct_response=True) as lab:
        context = ssl.create_default_context(cafile=str(lab.ca_path))
        context.set_alpn_protocols(["http/1.1"])
        plains, tlss = [], []
        for _ in range(12):
            plain = socket.create_connection(("127.0.0.1", lab.http_port), timeout=5)
            plain.sendall(REQUEST[:10])  # the rest comes under the daemon: Envoy's answer is its first write
            plains.append(plain)
            tls = context.wrap_socket(socket.create_connection(("127.0.0.1", lab.tls_port), timeout=5),
                                      server_hostname="a.example.com")
            _exchange(tls)
            tlss.append(tls)
        daemon = DaemonProcess(["--pid", str(lab.pid), "--envoy-admin", lab.admin_url,
                                "--otlp-endpoint", receiver.grpc_endpoint, "--otlp-protocol", "grpc",
                                "--summary-json", str(summary), "--sampler", "traceidratio",
                                "--sampler-arg", "0.5"], tmp_path).start()
        try:
            for plain, tls in zip(plains, tlss, strict=True):
                plain.sendall(REQUEST[10:])
                answer = plain.recv(65536)
                assert answer.startswith(b"HTTP/1.1 200"), answer[:100]
                _exchange(tls)
            ports = [c.getsockname()[1] for c in plains + tlss]
            for c in plains + tlss:
                c.close()
        finally:
            code = daemon.stop()  # exports what it holds
            spans = receiver.spans()
            receiver.stop()
    assert code == 0, daemon.stderr()
    report = json.loads(summary.read_text())
    adopted = report["adopted_connections"].get("adopted", 0)
    assert adopted >= 1, report["adopted_connections"]  # binomial(24, 0.5)
    made = [s for s in (_connection_of(spans, p) for p in ports) if s is not None]
    assert len(made) == adopted and all(s.attributes.get("envoy.connection.adopted") is True for s in made)
    assert report["sampler"]["other_connections"] == {"traced": 0, "not_traced": 0}, report["sampler"]


#: A client inside Envoy's namespace: a keep-alive connection with one request answered, then, at each line
#: on stdin, another request; at EOF it closes. It prints its local port once connected.
HELD_CLIENT = """
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), source_address=(sys.argv[3], 0))
print(s.getsockname()[1], flush=True)
def exchange():
    s.sendall(b"GET /adopted HTTP/1.1\\r\\nHost: lab\\r\\n\\r\\n")
    answer = b""
    while b"\\r\\n\\r\\n" not in answer:
        answer += s.recv(65536)
    print(answer.split(b" ")[1].decode(), flush=True)
exchange()
for _ in sys.stdin:
    exchange()
s.close()
"""


def test_a_connection_of_an_envoy_in_its_own_namespaces_is_adopted_with_the_daemonset_capabilities(
        tmp_path) -> None:
    """Envoy in namespaces of its own, a client inside holding a keep-alive connection, then the daemon with
    only the DaemonSet's capabilities (no CAP_SYS_ADMIN: it cannot enter the namespace; the socket table
    comes from /proc/<pid>/net/tcp): the connection is adopted, with the addresses Envoy sees."""
    summary = tmp_path / "summary.json"
    receiver = OtlpReceiver().start()
    lab = EnvoyLab(concurrency=1, netns=True, address=ENVOY_ADDRESS, direct_response=True)
    client = None
    try:
        lab.start()
        pid = lab.pid
        client = subprocess.Popen(lab.in_netns([sys.executable, "-c", HELD_CLIENT, ENVOY_ADDRESS,
                                                str(lab.http_port), CLIENT_ADDRESS]),
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert client.stdout is not None and client.stdin is not None
        client_port = int(client.stdout.readline())
        assert client.stdout.readline().strip() == "200"  # answered before the daemon exists
        daemon = DaemonProcess(["--otlp-endpoint", receiver.grpc_endpoint, "--otlp-protocol", "grpc",
                                "--summary-json", str(summary)], tmp_path)
        daemon.cmd = daemonset_capabilities(daemon.cmd)
        daemon.start()
        for _ in range(2):
            client.stdin.write("again\n")
            client.stdin.flush()
            assert client.stdout.readline().strip() == "200"
        client.stdin.close()
        assert client.wait(10) == 0
        spans = receiver.wait_for(lambda s: _connection_of(s, client_port) is not None, timeout=20)
        code = daemon.stop()
    finally:
        if client is not None and client.poll() is None:
            client.kill()
        lab.stop()
        receiver.stop()
    assert code == 0, daemon.stderr()
    span = _connection_of(spans, client_port)
    assert span is not None
    a = span.attributes
    assert a["envoy.connection.adopted"] is True and a["process.pid"] == pid, a
    assert (a["network.peer.address"], a["network.local.address"], a["network.local.port"]) == (
        CLIENT_ADDRESS, ENVOY_ADDRESS, lab.http_port), a
    requests = [s for s in spans
                if s.trace_id == span.trace_id and s.attributes.get("url.path") == "/adopted"]
    assert len(requests) == 2, [s.name for s in spans if s.trace_id == span.trace_id]
    assert json.loads(summary.read_text())["adopted_connections"]["adopted"] == 1

"""HTTP request spans, upstream attribution and trace context from a real Envoy (real BPF, real clients)."""

from __future__ import annotations

import http.client
import os
import signal
import socket
import ssl
import time
from collections import Counter

import pytest

from otel_envoy.lab.lab import EnvoyLab
from otel_envoy.spans.model import SPAN_FLAGS_LOCAL, SPAN_FLAGS_REMOTE
from tests.support.daemon import DaemonProcess
from tests.support.keepalive import get_all, keep_alive
from tests.support.parallel import run_in_threads
from tests.support.traces import (
    Trace,
    connection_traces,
    group_traces,
    request_spans,
    upstream_requests_of,
)

pytestmark = pytest.mark.root

SERVER, CLIENT, ERROR = 2, 3, 2
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"


def _wait_conn(receiver, port: int, local_port: int, n_requests: int = 0, timeout: float = 15.0) -> Trace:
    def found(spans):
        trace = connection_traces(spans, local_port).get(port)
        return trace is not None and trace.root.attributes.get("envoy.connection.requests", 0) >= n_requests
    receiver.wait_for(found, timeout)
    return connection_traces(receiver.spans(), local_port)[port]


def _raw(port: int, payload: bytes, responses: int = 1, timeout: float = 5.0) -> tuple[int, bytes]:
    """Send raw bytes; read until ``responses`` complete responses (Content-Length ones) or EOF."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        local = s.getsockname()[1]
        s.sendall(payload)
        data = b""
        while _complete_responses(data) < responses:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    return local, data


def _complete_responses(data: bytes) -> int:
    n, pos = 0, 0
    while True:
        end = data.find(b"\r\n\r\n", pos)
        if end < 0:
            return n
        head = data[pos:end].lower()
        length = 0
        for line in head.split(b"\r\n"):
            if line.startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        if len(data) < end + 4 + length:
            return n
        n, pos = n + 1, end + 4 + length




def test_keep_alive_requests_each_get_a_span_with_their_upstream_request(lab, receiver, traced):
    port, statuses = keep_alive(lab.http_port, [
        ("GET", "/", {"User-Agent": "keepalive-test/1"}),
        ("GET", "/bytes/1234?secret=x", {"Authorization": "Bearer topsecret", "Cookie": "c=1"}),
        ("GET", "/status/404", {}),
    ])
    assert statuses == [200, 200, 404]
    trace = _wait_conn(receiver, port, lab.http_port, 3)
    trace.assert_nested()
    root = trace.root
    assert root.attributes["envoy.connection.requests"] == 3
    servers = request_spans(trace)
    assert [s.attributes["url.path"] for s in servers] == ["/", "/bytes/1234", "/status/404"]
    assert [s.attributes["http.response.status_code"] for s in servers] == [200, 200, 404]
    assert all(s.parent_span_id == root.span_id and s.name == "GET" for s in servers)
    assert all(s.flags == SPAN_FLAGS_LOCAL for s in trace.spans)  # every parent is one of ours
    first, second, third = servers
    assert first.attributes["user_agent.original"] == "keepalive-test/1"
    assert first.attributes["network.protocol.version"] == "1.1"
    assert second.attributes["http.response.body.size"] == 1234
    assert third.status_code != ERROR  # a 404 is not a server error
    for s in servers:
        (client,) = upstream_requests_of(trace.spans, s)
        assert client.attributes["url.path"] == s.attributes["url.path"]
        assert client.attributes["server.port"] == lab.backend_port
        assert s.start_ns <= client.start_ns <= client.end_ns <= s.end_ns
        assert client.attributes["http.response.status_code"] == s.attributes["http.response.status_code"]
    # header values other than the allowed ones never leave the daemon
    everything = repr([s.attributes for s in trace.spans]) + repr([s.events for s in trace.spans])
    assert "topsecret" not in everything and "c=1" not in everything and "secret=x" not in everything


def test_traceparent_puts_the_request_in_the_callers_trace(lab, receiver, traced):
    port, statuses = keep_alive(lab.http_port, [
        ("GET", "/", {"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01", "x-request-id": "req-e2e-1"})])
    assert statuses == [200]
    trace = _wait_conn(receiver, port, lab.http_port, 1)
    assert not request_spans(trace)  # the request span left the connection's trace ...
    receiver.wait_for(lambda spans: TRACE_ID in group_traces(spans), 15)
    app_trace = group_traces(receiver.spans())[TRACE_ID]
    (server,) = [s for s in app_trace.spans if s.kind == SERVER]
    assert server.parent_span_id == PARENT_ID  # ... for the caller's trace, under the caller's span
    assert server.flags == SPAN_FLAGS_REMOTE  # a parent in another process (OTLP SpanFlags: is_remote)
    assert server.attributes["otel_envoy.trace_context"] == "traceparent"
    assert server.attributes["http.request.header.x-request-id"] == ["req-e2e-1"]
    assert [(lk[0], lk[1]) for lk in server.links] == [(trace.trace_id, trace.root.span_id)]
    assert (TRACE_ID, server.span_id) in [(lk[0], lk[1]) for lk in trace.root.links]  # and back
    (client,) = upstream_requests_of(app_trace.spans, server)
    assert client.trace_id == TRACE_ID


def test_pipelined_requests_each_get_a_span(lab, receiver, traced):
    req = b"GET /bytes/%d HTTP/1.1\r\nHost: lab\r\n\r\n"
    port, data = _raw(lab.http_port, req % 11 + req % 22 + req % 33, responses=3)
    assert data.count(b"HTTP/1.1 200") == 3
    trace = _wait_conn(receiver, port, lab.http_port, 3)
    servers = request_spans(trace)
    assert [s.attributes["http.response.body.size"] for s in servers] == [11, 22, 33]
    for s in servers:
        (client,) = upstream_requests_of(trace.spans, s)
        assert client.attributes["url.path"] == s.attributes["url.path"]


def test_chunked_request_body_is_counted(lab, receiver, traced):
    body = b"5\r\nhello\r\n7\r\n, world\r\n0\r\n\r\n"
    head = b"POST / HTTP/1.1\r\nHost: lab\r\nTransfer-Encoding: chunked\r\n\r\n"
    port, data = _raw(lab.http_port, head + body)
    assert data.startswith(b"HTTP/1.1 ")
    trace = _wait_conn(receiver, port, lab.http_port, 1)
    (server,) = request_spans(trace)
    assert server.name == "POST" and server.attributes["http.request.body.size"] == 12


def test_a_chunked_response_larger_than_the_capture_leaves_later_requests_right(lab, receiver, traced):
    """Each 20 000-byte chunk is written whole, past the 4 096 bytes captured per syscall: the gaps hold the
    chunk framing. The response keeps its status, its body size is left out as unknown, and the requests
    after it on the same connection get their own responses (downstream and upstream)."""
    port, statuses = keep_alive(lab.http_port, [("GET", "/chunked/4/20000", {}), ("GET", "/status/404", {}),
                                                 ("GET", "/", {})])
    assert statuses == [200, 404, 200]
    trace = _wait_conn(receiver, port, lab.http_port, 3)
    servers = request_spans(trace)
    assert [(s.attributes["url.path"], s.attributes.get("http.response.status_code")) for s in servers] == [
        ("/chunked/4/20000", 200), ("/status/404", 404), ("/", 200)]
    big = servers[0]
    assert big.attributes["otel_envoy.partial"] == "response_body_not_captured"
    assert "http.response.body.size" not in big.attributes and big.status_code != ERROR
    assert servers[1].status_code != ERROR and servers[2].attributes["http.response.body.size"] > 0
    for s in servers:
        (client,) = upstream_requests_of(trace.spans, s)
        assert client.attributes["http.response.status_code"] == s.attributes["http.response.status_code"]
    assert big.end_ns - big.start_ns >= 15_000_000  # 4 chunks 5 ms apart: it ends with the last one


def test_malformed_request_line_is_a_span_error_and_tracing_goes_on(lab, receiver, traced):
    port, data = _raw(lab.http_port, b"GE\x01T / HTTP/1.1\r\nHost: lab\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 400")
    trace = _wait_conn(receiver, port, lab.http_port, 1)
    (server,) = request_spans(trace)
    assert server.status_code == ERROR and server.attributes["error.type"] == "malformed_request"
    assert server.attributes["http.response.status_code"] == 400
    port2, statuses = keep_alive(lab.http_port, [("GET", "/", {})])  # the daemon is alive and tracing
    assert statuses == [200]
    assert request_spans(_wait_conn(receiver, port2, lab.http_port, 1))


def test_concurrent_clients_every_upstream_request_pairs_with_its_downstream_request(lab, receiver, traced):
    clients, per_client = 20, 5

    def client(i: int) -> int:
        p, st = keep_alive(lab.http_port, [("GET", f"/bytes/{1000 + i * per_client + j}", {})
                                            for j in range(per_client)])
        assert st == [200] * per_client
        return p

    ports = run_in_threads(clients, client)
    receiver.wait_for(lambda spans: all(
        (t := connection_traces(spans, lab.http_port).get(p)) is not None
        and t.root.attributes.get("envoy.connection.requests") == per_client for p in ports), 30)
    traces = connection_traces(receiver.spans(), lab.http_port)
    paired = 0
    for p in ports:
        servers = request_spans(traces[p])
        assert len(servers) == per_client
        for s in servers:
            clients_ = upstream_requests_of(traces[p].spans, s)
            assert len(clients_) == 1, (s.attributes["url.path"], len(clients_))
            assert clients_[0].attributes["url.path"] == s.attributes["url.path"]
            paired += 1
    assert paired == clients * per_client


def test_dead_upstream_gives_an_error_span_and_a_failed_upstream_connection(receiver, tmp_path):
    with EnvoyLab(concurrency=1) as lab:
        os.kill(lab.backend_pid, signal.SIGKILL)
        time.sleep(0.3)
        daemon = DaemonProcess(["--pid", str(lab.pid), "--otlp-endpoint", receiver.grpc_endpoint,
                                "--otlp-protocol", "grpc"], tmp_path).start()
        try:
            port, statuses = keep_alive(lab.http_port, [("GET", "/", {})])
            assert statuses[0] >= 500
            trace = _wait_conn(receiver, port, lab.http_port, 1)
        finally:
            daemon.stop()
    (server,) = request_spans(trace)
    assert server.status_code == ERROR and server.attributes["http.response.status_code"] >= 500
    ups = [s for s in trace.spans if s.name == "envoy.upstream.connection"]
    assert ups and all(u.status_code == ERROR for u in ups)
    assert all(u.parent_span_id == server.span_id for u in ups)


def test_request_split_across_many_reads(lab, receiver, traced):
    """A request trickled a few bytes at a time: Envoy reads it in many reads; one span, whole path."""
    payload = (b"GET /bytes/77?q=1 HTTP/1.1\r\nHost: lab\r\nUser-Agent: trickle/1\r\n"
               b"X-Request-Id: trickle-1\r\n\r\n")
    with socket.create_connection(("127.0.0.1", lab.http_port), timeout=10) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        port = s.getsockname()[1]
        for i in range(0, len(payload), 3):
            s.sendall(payload[i:i + 3])
            time.sleep(0.01)
        data = b""
        while _complete_responses(data) < 1:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    assert data.startswith(b"HTTP/1.1 200")
    trace = _wait_conn(receiver, port, lab.http_port, 1)
    (server,) = request_spans(trace)
    a = server.attributes
    assert a["url.path"] == "/bytes/77" and a["user_agent.original"] == "trickle/1"
    assert a["http.request.header.x-request-id"] == ["trickle-1"]
    assert a["http.response.body.size"] == 77
    # the span starts at the first byte read, ~30 sends of 10 ms before the header block completed
    received = next(ts for ts, name, _ in server.events if name == "http.request.received")
    assert received - server.start_ns >= 200_000_000
    (client,) = upstream_requests_of(trace.spans, server)
    assert client.start_ns >= received


def _tls_keep_alive(port: int, ca: str, paths: list[str]) -> tuple[int, list[int]]:
    """HTTP/1.1 over TLS 1.3 (SNI a.example.com), several requests on one connection."""
    ctx = ssl.create_default_context(cafile=ca)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.set_alpn_protocols(["http/1.1"])
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    local_port = raw.getsockname()[1]
    conn.sock = ctx.wrap_socket(raw, server_hostname="a.example.com")
    return local_port, get_all(conn, paths)


def test_tls_connection_counts_records_and_holds_its_upstream_requests(lab, receiver, traced):
    """Without symbols the TLS request layer is ciphertext: the connection span counts its records, and
    the requests appear where Envoy writes them upstream in plaintext, under the connection whose read
    caused them (same worker thread, same event-loop round)."""
    paths = ["/bytes/100000", "/bytes/10", "/status/404"]
    port, statuses = _tls_keep_alive(lab.tls_port, str(lab.ca_path), paths)
    assert statuses == [200, 200, 404]

    def found(spans):
        t = connection_traces(spans, lab.tls_port).get(port)
        return t is not None and len([s for s in t.spans if s.kind == CLIENT and s.name == "GET"]) == 3
    receiver.wait_for(found, 15)
    trace = connection_traces(receiver.spans(), lab.tls_port)[port]
    trace.assert_nested()
    a = trace.root.attributes
    # 100000 response bytes need >= 7 full 16 KiB records; TLS 1.3 AEAD adds 1 + 16 bytes to each body
    assert a["envoy.tls.max_record_size_sent"] == 16384 + 1 + 16
    assert a["envoy.tls.application_data_records_sent"] >= 7 + 3
    assert a["envoy.tls.application_data_records_received"] >= 3  # Finished + 3 requests
    assert a["envoy.tls.records_received"] >= a["envoy.tls.application_data_records_received"] + 1
    assert 5 * a["envoy.tls.records_sent"] + 100000 <= a["envoy.connection.bytes_sent"]
    assert "envoy.tls.record_framing_lost" not in a
    ups = sorted((s for s in trace.spans if s.kind == CLIENT and s.name == "GET"), key=lambda s: s.start_ns)
    assert [s.attributes["url.path"] for s in ups] == paths
    assert [s.attributes["http.response.status_code"] for s in ups] == [200, 200, 404]
    for s in ups:  # one client: every read is unambiguous
        assert s.parent_span_id == trace.root.span_id
        assert s.attributes["otel_envoy.attribution"].startswith("tls_connection_")


def test_concurrent_tls_clients_each_hold_their_own_upstream_requests(lab, receiver, traced):
    n_clients, per_client = 10, 3

    def client(i: int) -> tuple[int, list[str]]:
        paths = [f"/bytes/{2000 + i * per_client + j}" for j in range(per_client)]
        p, st = _tls_keep_alive(lab.tls_port, str(lab.ca_path), paths)
        assert st == [200] * per_client
        return p, paths

    results = dict(run_in_threads(n_clients, client))

    def ups(trace: Trace) -> list:
        return [s for s in trace.spans if s.kind == CLIENT and s.name == "GET"]

    total = n_clients * per_client
    receiver.wait_for(lambda spans: sum(
        len(ups(t)) for p, t in connection_traces(spans, lab.tls_port).items() if p in results) >= total, 30)
    traces = connection_traces(receiver.spans(), lab.tls_port)
    owner = {path: p for p, paths in results.items() for path in paths}
    landed = {s.attributes["url.path"]: (p, s) for p in results for s in ups(traces[p])}
    assert sorted(landed) == sorted(owner)  # every request sits in one of the TLS connections' traces
    right: Counter[str] = Counter()
    made: Counter[str] = Counter()
    for path, (p, s) in landed.items():
        how = s.attributes["otel_envoy.attribution"]
        # tls_connection_connect: Envoy connected inside that connection's read; the others: the order of
        # reads and writes on the worker decided (pooled upstream connections)
        assert how in ("tls_connection_connect", "tls_connection_round", "tls_connection_latest_read"), how
        made[how] += 1
        right[how] += p == owner[path]
    print(f"TLS attribution: {sum(right.values())} of {total} upstream requests under their own connection, "
          + ", ".join(f"{how} {right[how]}/{n}" for how, n in sorted(made.items())))
    # Measured over 10 runs on 2026-12-05 (docs/spans.md): 277 of 300 right (92 %), per run 20 to 30 of 30;
    # tls_connection_connect 77 of 88, tls_connection_round 198 of 210. The bound is below the worst run seen.
    assert sum(right.values()) >= 0.6 * total, (right, made)

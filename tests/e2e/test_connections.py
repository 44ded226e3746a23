"""Connection traces from a real Envoy: plain, TLS 1.3, TLS 1.2, reset, burst (real BPF, real clients)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import pytest

from otel_envoy.export.otlp_json_decode import decode_request_json
from otel_envoy.lab import clients
from tests.support.traces import connection_traces

pytestmark = pytest.mark.root

SERVER, ERROR = 2, 2


def _wait_conn(receiver, port: int, local_port: int, timeout: float = 15.0):
    def found(spans):
        return port in connection_traces(spans, local_port)
    receiver.wait_for(found, timeout)
    return connection_traces(receiver.spans(), local_port)[port]


def test_plain_http_connection(lab, receiver, traced):
    res = clients.curl_plain(lab.http_port, "/")
    assert res.http_code == 200 and res.local_port
    trace = _wait_conn(receiver, res.local_port, lab.http_port)
    trace.assert_nested()
    root = trace.root
    a = root.attributes
    assert root.kind == SERVER
    assert a["network.transport"] == "tcp" and a["network.type"] == "ipv4"
    assert a["network.peer.address"] == "127.0.0.1" and a["network.peer.port"] == res.local_port
    assert a["network.local.address"] == "127.0.0.1" and a["network.local.port"] == lab.http_port
    assert a["process.pid"] == lab.pid
    assert a["thread.name"].startswith("wrk:worker_")
    assert a["thread.id"] in lab.worker_thread_ids()
    assert a["envoy.listener.name"] == "plain_http"
    assert a["envoy.connection.bytes_received"] > 50  # the request curl sent
    assert a["envoy.connection.bytes_sent"] > 50  # the response
    assert a["envoy.connection.close_initiator"] in ("peer", "envoy")
    assert "envoy.connection.still_open" not in a
    assert a["envoy.connection.socket_options"] == ["TCP_NODELAY"]  # kept by the kernel for the close record
    assert root.resource_attributes["service.name"] == "envoy-under-test"
    queue = trace.child("tcp.accept_queue")
    assert queue.start_ns == root.start_ns  # the root starts when the handshake completed
    assert queue.attributes["tcp.accept_queue.depth"] >= 1
    lf = trace.child("envoy.listener_filters")
    assert lf.attributes["envoy.listener_filters.peeked_bytes"] == 0  # no listener filter on this listener
    assert lf.start_ns == queue.end_ns  # both at the accept
    assert not trace.children("tls.handshake")
    assert root.status_code != ERROR


def test_tls13_connection_with_sni_and_alpn(lab, receiver, traced):
    res = clients.curl_tls(lab.tls_port, "a.example.com", alpn="h2", tls_version="1.3", ca=lab.ca_path)
    assert res.http_code == 200 and res.http_version == "2", res.stderr
    trace = _wait_conn(receiver, res.local_port, lab.tls_port)
    trace.assert_nested()
    root = trace.root
    assert root.attributes["envoy.listener.name"] == "tls_sni"
    assert root.attributes["tls.client.server_name"] == "a.example.com"
    lf = trace.child("envoy.listener_filters")
    assert lf.attributes["envoy.listener_filters.peeked_bytes"] >= 200  # tls_inspector peeked the ClientHello
    assert "otel_envoy.partial" not in lf.attributes  # the hand-off was seen (the fd's second epoll ADD) ...
    hs = trace.child("tls.handshake")
    assert lf.start_ns < lf.end_ns <= hs.end_ns  # ... after the peek, before the handshake ended
    h = hs.attributes
    assert h["tls.protocol.version"] == "1.3"
    assert h["tls.client.server_name"] == "a.example.com"
    assert h["tls.client.supported_alpn"][:2] == ["h2", "http/1.1"]
    assert h["tls.cipher"].startswith("TLS_")
    assert h["tls.established"] is True and h["tls.resumed"] is False
    assert len(h["tls.client.ja4"].split("_")) >= 3 and h["tls.client.ja4"].startswith("t13d")
    assert len(h["tls.client.ja3"]) == 32
    assert hs.status_code != ERROR
    # the handshake starts with the ClientHello the listener filter peeked, and ends after it
    assert lf.start_ns <= hs.start_ns <= lf.end_ns < hs.end_ns


def test_tls12_connection_with_openssl(lab, receiver, traced):
    res = clients.openssl_s_client(lab.tls_port, "b.example.com", alpn="http/1.1", tls_version="1.2")
    assert res.protocol == "TLSv1.2" and res.http_status == 200, res.stderr
    traces = receiver.wait_for(
        lambda spans: any(s.name == "tls.handshake" and s.attributes.get("tls.client.server_name")
                          == "b.example.com" and s.attributes.get("tls.protocol.version") == "1.2"
                          for s in spans), 15)
    hs = next(s for s in traces if s.name == "tls.handshake"
              and s.attributes.get("tls.client.server_name") == "b.example.com"
              and s.attributes.get("tls.protocol.version") == "1.2")
    h = hs.attributes
    assert h["tls.next_protocol"] == "http/1.1"  # visible in the TLS 1.2 ServerHello
    assert h["tls.cipher"].startswith("TLS_ECDHE_")
    assert h["tls.established"] is True
    assert h["tls.client.ja4"].startswith("t1")


def test_client_reset_marks_the_connection(lab, receiver, traced):
    res = clients.reset_client(lab.http_port)
    trace = _wait_conn(receiver, res.local_port, lab.http_port)
    root = trace.root
    assert root.status_code == ERROR
    names = [e[1] for e in root.events]
    assert "tcp.reset_received" in names
    assert root.attributes["envoy.connection.close_initiator"] == "peer"
    assert root.attributes["envoy.connection.bytes_received"] == res.sent


def test_burst_of_connections_each_get_a_trace(lab, receiver, traced):
    result = clients.burst(lab.http_port, 200, concurrency=20)
    assert result.all_ok, result.errors[:3]
    ports = set(result.local_ports)
    assert len(ports) == 200

    def all_seen(spans):
        return ports <= set(connection_traces(spans, lab.http_port))
    receiver.wait_for(all_seen, 30)
    traces = connection_traces(receiver.spans(), lab.http_port)
    depths = []
    for port in ports:
        t = traces[port]
        t.assert_nested()
        assert t.root.attributes["network.peer.port"] == port
        depths.append(t.child("tcp.accept_queue").attributes["tcp.accept_queue.depth"])
    assert min(depths) >= 1
    threads = {traces[p].root.attributes["thread.name"] for p in ports}
    assert threads <= {"wrk:worker_0", "wrk:worker_1"}


def test_a_burst_of_200_at_once_loses_no_handshake(lab, receiver, traced):
    """200 connections opened together: the handshake completions fire in softirq while the syscall
    programs run on the same CPUs. The connection-state program is a raw tracepoint (a guard of its own), so
    every connection has its accept-queue span and none is marked partial."""
    result = clients.burst(lab.http_port, 200, concurrency=200)
    assert result.all_ok, result.errors[:3]
    ports = set(result.local_ports)
    assert len(ports) == 200

    def all_seen(spans):
        return ports <= set(connection_traces(spans, lab.http_port))
    receiver.wait_for(all_seen, 30)
    traces = connection_traces(receiver.spans(), lab.http_port)
    partial = {p: traces[p].root.attributes["otel_envoy.partial"] for p in ports
               if "otel_envoy.partial" in traces[p].root.attributes}
    assert not partial, partial
    for port in ports:
        assert traces[port].child("tcp.accept_queue").attributes["tcp.accept_queue.depth"] >= 1


def test_output_file_holds_the_same_spans(lab, receiver, traced):
    _daemon, output = traced
    res = clients.curl_plain(lab.http_port, "/")
    _wait_conn(receiver, res.local_port, lab.http_port)
    grpc_ids = {s.span_id for s in receiver.spans()}
    # the file sink is flushed per batch; poll until our connection shows up there too
    import time
    deadline = time.monotonic() + 10
    while True:
        file_spans = [s for line in output.read_text().splitlines() if line
                      for s in decode_request_json(json.loads(line))]
        if res.local_port in connection_traces(file_spans, lab.http_port) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    file_ids = {s.span_id for s in file_spans}
    assert connection_traces(file_spans, lab.http_port)[res.local_port].root.span_id in grpc_ids
    assert len(file_ids & grpc_ids) >= 3


def test_still_open_connection_is_ended_at_shutdown(lab, receiver, tmp_path):
    from tests.support.daemon import DaemonProcess

    out = tmp_path / "open.jsonl"
    daemon = DaemonProcess(["--pid", str(lab.pid), "--output", str(out),
                            "--otlp-endpoint", receiver.http_endpoint, "--otlp-protocol", "http/protobuf"],
                           tmp_path).start()
    sock = socket.create_connection(("127.0.0.1", lab.http_port))
    sock.sendall(b"GET / HTTP/1.1\r\nHost: lab\r\n\r\n")
    sock.recv(4096)
    port = sock.getsockname()[1]
    try:
        assert daemon.stop() == 0, daemon.stderr()
    finally:
        sock.close()
    trace = _wait_conn(receiver, port, lab.http_port, timeout=10)
    assert trace.root.attributes["envoy.connection.still_open"] is True
    assert "envoy.connection.close_initiator" not in trace.root.attributes
    assert receiver.requests["http/protobuf"] >= 1
    spans = [s for line in out.read_text().splitlines() for s in decode_request_json(json.loads(line))]
    assert port in connection_traces(spans, lab.http_port)


def _recorded_tls_connection(lab, tmp_path, connect, detail: str = "summary"):
    """Record the daemon's kernel events (always_on, ``--tls-handshake-detail detail``) while ``connect()``
    makes one TLS connection; returns its events from its accept on, and its replayed trace (``connect``
    returns the connection's local port; None: the last one accepted). A first connection shows the daemon
    its listener is TLS (the kernel then decides that listener's connections whole, and summarizes their
    handshakes): ``connect()`` runs once the daemon has had the time to tell the kernel. The trace is the one
    a real OTLP receiver got from the live daemon; the recording, replayed, gives the same one."""
    from otel_envoy.events.decode import Decoder
    from otel_envoy.events.recording import RecordingReader
    from otel_envoy.events.types import AcceptEvent
    from tests.support.daemon import DaemonProcess
    from tests.support.otlp_receiver import OtlpReceiver

    tmp_path.mkdir(parents=True, exist_ok=True)
    events = tmp_path / "tls.events"
    with OtlpReceiver() as receiver:
        # a run (not `record`, which correlates nothing, so never learns that the listener is TLS)
        args = ["--pid", str(lab.pid), "--record", str(events), "--otlp-endpoint", receiver.grpc_endpoint,
                "--otlp-protocol", "grpc", "--sampler", "always_on", "--tls-handshake-detail", detail]
        daemon = DaemonProcess(args, tmp_path).start()
        try:
            first = clients.curl_tls(lab.tls_port, "a.example.com", alpn="http/1.1", ca=lab.ca_path)
            assert first.http_code == 200, first.stderr
            time.sleep(0.5)  # the ring is drained every 50 ms; the listener is handed over as it is found
            port = connect()
        finally:
            assert daemon.stop() == 0, daemon.stderr()
        received = receiver.spans()
    decoded = [Decoder().decode(raw) for kind, raw in RecordingReader(events) if kind == "kernel"]
    # a worker's (the main thread accepts the admin calls of the daemon's own adoption scan)
    accepts = [e for e in decoded if isinstance(e, AcceptEvent) and e.peer_port != first.local_port
               and e.comm.startswith(b"wrk:worker") and port in (None, e.peer_port)]
    assert len(accepts) == 1, accepts
    accept = accepts[0]
    mine = [e for e in decoded if getattr(e, "fd", None) == accept.fd and e.tgid == accept.tgid
            and e.ts_ns >= accept.ts_ns]
    out = tmp_path / "replayed.jsonl"
    proc = subprocess.run([sys.executable, "-m", "otel_envoy.cli", "replay", str(events), "--output",
                           str(out)], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    spans = [s for line in out.read_text().splitlines() for s in decode_request_json(json.loads(line))]
    live = connection_traces(received, lab.tls_port)[accept.peer_port]
    assert _comparable(connection_traces(spans, lab.tls_port)[accept.peer_port]) == _comparable(live)
    return mine, live


def _comparable(trace):
    """A TLS connection's spans by name with their attributes, without what differs between two connections
    of the same client (which worker; sizes that differ by a byte between two answers: a timing header) or
    between two runs (durations)."""
    skip = {"network.peer.port", "thread.id", "thread.name", "process.pid", "envoy.connection.bytes_sent",
            "envoy.connection.bytes_received", "envoy.tls.max_record_size_sent",
            "envoy.tls.max_record_size_received"}
    spans = (trace.root, *trace.children("tls.handshake"), *trace.children("tcp.accept_queue"),
             *trace.children("envoy.listener_filters"))
    return {span.name: {k: v for k, v in span.attributes.items() if k not in skip and "duration" not in k}
            for span in spans}


def _reads_and_close(mine):
    from otel_envoy.events.types import CloseEvent, DataEvent

    close = next(e for e in mine if isinstance(e, CloseEvent))
    reads = [e for e in mine if isinstance(e, DataEvent) and e.direction == 0 and e.ts_ns <= close.ts_ns]
    return reads, close


def _handshake_summary(mine):
    """The one handshake summary among a connection's events (EV_CONNECTION_KEPT, KEEP_CONN_SAMPLED)."""
    from otel_envoy.correlate.kept_connections import KEEP_CONN_SAMPLED
    from otel_envoy.events.types import ConnectionKeptEvent

    (summary,) = [e for e in mine if isinstance(e, ConnectionKeptEvent)]
    assert summary.reason == KEEP_CONN_SAMPLED, summary
    return summary


def test_a_traced_tls_handshake_is_one_record_at_its_end(lab, tmp_path):
    """By default (``--tls-handshake-detail summary``) a traced TLS connection's handshake is one kernel
    record when it ends (bpf/conn_keep.bpf.h, CONN_HS_SUMMARY): its accept, then that record holding the
    ClientHello the listener filter peeked and the server's hello flight, then only the reads after the
    handshake (without bytes). The kernel walks every transfer's TLS records all the same, and the spans
    are what the per-transfer records give (the same connection with ``--tls-handshake-detail full``)."""
    from otel_envoy.correlate.kept_connections import KEPT_OPEN
    from otel_envoy.events.types import DataEvent

    def connect():
        res = clients.curl_tls(lab.tls_port, "a.example.com", alpn="h2", tls_version="1.3", ca=lab.ca_path)
        assert res.http_code == 200 and res.local_port, res.stderr
        return res.local_port

    traces = {}
    for detail in ("summary", "full"):
        mine, traces[detail] = _recorded_tls_connection(lab, tmp_path / detail, connect, detail)
        reads, close = _reads_and_close(mine)
        if detail == "summary":
            summary = _handshake_summary(mine)
            assert summary.close_flags & KEPT_OPEN and summary.hello_peeked and summary.hs_end_ns, summary
            assert summary.hello[:1] == b"\x16" and summary.flight[:1] == b"\x16", summary
            assert not [e for e in reads if e.data], reads  # no handshake bytes in a data record
            assert all(e.ts_ns > summary.ts_ns for e in mine if isinstance(e, DataEvent)), mine
        assert close.tls_records_rx >= 4  # ClientHello, ChangeCipherSpec, Finished, request: all walked
        assert traces[detail].root.attributes["envoy.tls.records_received"] == close.tls_records_rx

    summarized, full = _comparable(traces["summary"]), _comparable(traces["full"])
    assert summarized == full, {name: {k: (summarized[name].get(k), full[name].get(k))
                                       for k in summarized[name].keys() | full[name].keys()
                                       if summarized[name].get(k) != full[name].get(k)} for name in full}


@pytest.mark.parametrize("detail", ["summary", "full"])
def test_tls13_handshake_reads_user_space_does_not_need_are_counted_not_sent(lab, tmp_path, detail):
    """tls_inspector peeks the whole ClientHello, so BoringSSL's read of it for real is quiet, as is the TLS
    1.3 client's ChangeCipherSpec: the kernel walks and counts their records, sends no record of them, and
    the handshake span is whole (kernel side: tls_handshake.bpf.h, quiet_record). With handshake summaries
    the peek is in the summary, not a data record."""
    def connect():
        res = clients.curl_tls(lab.tls_port, "a.example.com", alpn="h2", tls_version="1.3", ca=lab.ca_path)
        assert res.http_code == 200 and res.local_port, res.stderr
        return res.local_port

    mine, trace = _recorded_tls_connection(lab, tmp_path, connect, detail)
    reads, close = _reads_and_close(mine)
    hello_reads = [e for e in reads if e.data[:1] == b"\x16"]
    if detail == "summary":
        assert not hello_reads and _handshake_summary(mine).hello_peeked, reads
        peeked = _handshake_summary(mine).hello_ret
    else:
        assert len(hello_reads) == 1 and hello_reads[0].flags & 1, reads  # the peek only (DATA_FLAG_PEEK)
        peeked = hello_reads[0].ret
    assert not [e for e in reads if e.data[:1] == b"\x14"], reads  # no ChangeCipherSpec read
    assert close.tls_records_rx >= 4  # ClientHello, ChangeCipherSpec, Finished, request: all walked
    assert close.bytes_rx > peeked  # and their bytes counted
    hs = trace.child("tls.handshake")
    assert hs.attributes["tls.established"] is True and hs.attributes["tls.protocol.version"] == "1.3"
    assert hs.attributes["tls.client.server_name"] == "a.example.com"
    assert "otel_envoy.partial" not in trace.root.attributes
    assert trace.root.attributes["envoy.tls.records_received"] == close.tls_records_rx


@pytest.mark.parametrize("detail", ["summary", "full"])
def test_a_hello_retry_request_s_second_client_hello_is_sent(lab, tmp_path, detail):
    """The client's first key share (P-521) is not one Envoy takes: it answers with a HelloRetryRequest and
    the client sends a second ClientHello, which no peek held. That one is reported (the first, quiet, was
    parsed from the peek), the ChangeCipherSpec is not, and the handshake span is whole. With handshake
    summaries, the summary holds the first ClientHello and the HelloRetryRequest; the span is as whole."""
    def connect():
        res = clients.openssl_s_client(lab.tls_port, "a.example.com", alpn="http/1.1", tls_version="1.3",
                                       groups="P-521:X25519")
        assert res.returncode == 0 and "HTTP/1.1 200" in res.stdout, res.stderr
        return None

    mine, trace = _recorded_tls_connection(lab, tmp_path, connect, detail)
    reads, close = _reads_and_close(mine)
    hello_reads = [e for e in reads if e.data[:1] == b"\x16"]
    if detail == "summary":
        assert not hello_reads and _handshake_summary(mine).hello_peeked, reads
    else:
        assert [bool(e.flags & 1) for e in hello_reads] == [True, False], reads  # the peek, the second hello
    assert not [e for e in reads if e.data[:1] == b"\x14"], reads
    assert close.tls_records_rx >= 5  # two ClientHellos, ChangeCipherSpec, Finished, request
    hs = trace.child("tls.handshake")
    assert hs.attributes["tls.established"] is True and hs.attributes["tls.protocol.version"] == "1.3"
    assert hs.status_code != ERROR and "otel_envoy.partial" not in trace.root.attributes
    assert trace.root.attributes["envoy.tls.records_received"] == close.tls_records_rx

"""Requests sampled in the kernel (--sampler), on a real Envoy proxying to a real backend (real BPF)."""

from __future__ import annotations

import http.client
import json
from pathlib import Path

import pytest

from otel_envoy.lab.lab import EnvoyLab
from otel_envoy.sampling import DEFAULT_CPU_BUDGET
from otel_envoy.spans.model import SpanRecord
from tests.support.daemon import DaemonProcess
from tests.support.h2load import h2load
from tests.support.keepalive import get_all
from tests.support.otlp_receiver import OtlpReceiver
from tests.support.parallel import run_in_threads

pytestmark = pytest.mark.root

SERVER, CLIENT = 2, 3
CONNECTIONS, PER_CONNECTION = 4, 100


@pytest.fixture(scope="module")
def lab():
    with EnvoyLab(concurrency=1) as lab:
        yield lab


def _keep_alive(port: int, paths: list[str]) -> list[int]:
    return get_all(http.client.HTTPConnection("127.0.0.1", port, timeout=10), paths)


def _traced_run(lab: EnvoyLab, workdir: Path, sampler: list[str]) -> tuple[list[SpanRecord], dict, list[str]]:
    """The daemon with ``sampler`` flags, exporting over OTLP/gRPC to a real receiver, while 4 keep-alive
    clients send 100 requests each (distinct paths): what the receiver got, the summary, the paths."""
    summary = workdir / "summary.json"
    with OtlpReceiver() as receiver:
        daemon = DaemonProcess(["--pid", str(lab.pid), "--request-detail", "summary",
                                "--otlp-endpoint", receiver.grpc_endpoint,
                                "--otlp-protocol", "grpc", "--summary-json", str(summary), "--no-offcpu",
                                *sampler], workdir).start()
        paths = [[f"/bytes/{1000 + c * PER_CONNECTION + i}" for i in range(PER_CONNECTION)]
                 for c in range(CONNECTIONS)]
        results = run_in_threads(CONNECTIONS, lambda c: _keep_alive(lab.http_port, paths[c]))
        assert all(st == [200] * PER_CONNECTION for st in results)
        assert daemon.stop() == 0, daemon.stderr()  # the daemon exports everything before it exits
        spans = receiver.spans()
    return spans, json.loads(summary.read_text()), [p for ps in paths for p in ps]


def test_a_ratio_traces_that_share_of_requests_whole_and_counts_the_rest(lab, tmp_path) -> None:
    spans, summary, paths = _traced_run(lab, tmp_path, ["--sampler", "traceidratio", "--sampler-arg", "0.3"])
    counts = summary["sampler"]["requests"]
    decided = len(paths)  # every request, a connection's first one too
    assert counts["sampled"] + counts["not_sampled"] == decided
    assert 0.18 * decided < counts["sampled"] < 0.42 * decided  # binomial(400, 0.3): mean 120, sd 9
    servers = [s for s in spans if s.kind == SERVER and s.name != "envoy.downstream.connection"
               and s.attributes.get("url.path", "").startswith("/bytes/")]
    clients = [s for s in spans if s.kind == CLIENT and s.name != "envoy.upstream.connection"]
    assert len(servers) == counts["sampled"]
    # every traced request is whole (its response, its upstream request under it), and nothing else is there
    assert all(s.attributes["http.response.status_code"] == 200 for s in servers)
    by_parent = {c.parent_span_id: c for c in clients}
    assert len(clients) == len(servers)
    for s in servers:
        up = by_parent[s.span_id]
        assert up.attributes["url.path"] == s.attributes["url.path"]
        assert up.attributes["http.response.status_code"] == 200
    assert not [c for c in clients
                if "downstream_request_not_found" in c.attributes.get("otel_envoy.partial", [])]
    assert len([s for s in spans if s.name == "envoy.downstream.connection"]) >= CONNECTIONS


def test_always_off_traces_no_request_but_keeps_the_connections(lab, tmp_path) -> None:
    spans, summary, _ = _traced_run(lab, tmp_path, ["--sampler", "always_off"])
    assert summary["sampler"]["name"] == "always_off"
    assert not [s for s in spans if s.name == "GET"]
    assert len([s for s in spans if s.name == "envoy.downstream.connection"]) >= CONNECTIONS


def test_always_on_traces_every_request(lab, tmp_path) -> None:
    spans, summary, paths = _traced_run(lab, tmp_path, ["--sampler", "always_on"])
    sampler = summary["sampler"]
    assert (sampler["name"], sampler["ratio"]) == ("always_on", 1.0)
    assert sampler["cpu_budget"]["budget"] == DEFAULT_CPU_BUDGET
    assert sampler["requests"] == {"sampled": len(paths), "not_sampled": 0,  # within budget
                                   "parent_sampled": 0, "parent_not_sampled": 0}
    servers = {s.attributes.get("url.path") for s in spans if s.kind == SERVER and s.name == "GET"}
    assert servers >= set(paths)


def _send(port: int, requests: list[tuple[str, dict[str, str]]]) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        for path, headers in requests:
            conn.request("GET", path, headers=headers)
            resp = conn.getresponse()
            resp.read()
            assert resp.status == 200
    finally:
        conn.close()


def test_by_default_a_traceparent_decides_and_one_percent_of_the_rest_is_traced(lab, tmp_path) -> None:
    """The default sampler (parentbased_traceidratio, 0.01) decided in the kernel: every request whose
    traceparent says sampled is traced in the caller's trace, none whose traceparent says not sampled, and
    an invalid traceparent counts as none (its request is decided by the ratio, as a root)."""
    def tp(i: int, flags: str) -> str:
        return f"00-{i + 1:032x}-{i + 7:016x}-{flags}"

    invalid = ["00-" + "0" * 32 + "-00f067aa0ba902b7-01",  # all-zero trace id
               "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",  # upper case
               "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",  # version ff
               "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra"]  # version 00 with more
    requests: list[tuple[str, dict[str, str]]] = []
    for i in range(300):
        if i % 3 == 0:
            requests.append((f"/bytes/{2000 + i}", {"traceparent": tp(i, "01"), "tracestate": "k=v"}))
        elif i % 3 == 1:
            requests.append((f"/bytes/{2000 + i}", {"TraceParent": tp(i, "00")}))
        else:
            requests.append((f"/bytes/{2000 + i}", {"x-n": str(i)}))
    requests += [(f"/bytes/{3000 + i}", {"traceparent": invalid[i % len(invalid)]}) for i in range(100)]
    summary = tmp_path / "summary.json"
    with OtlpReceiver() as receiver:
        daemon = DaemonProcess(["--pid", str(lab.pid), "--request-detail", "summary",
                                "--otlp-endpoint", receiver.grpc_endpoint,
                                "--otlp-protocol", "grpc", "--summary-json", str(summary), "--no-offcpu"],
                               tmp_path, env={"OTEL_TRACES_SAMPLER": ""}).start()
        run_in_threads(4, lambda c: _send(lab.http_port, requests[c::4]))
        assert daemon.stop() == 0, daemon.stderr()
        spans = receiver.spans()
    sampler = json.loads(summary.read_text())["sampler"]
    assert (sampler["name"], sampler["ratio"]) == ("parentbased_traceidratio", 0.01)
    counts = sampler["requests"]
    assert (counts["parent_sampled"], counts["parent_not_sampled"]) == (100, 100)
    assert counts["sampled"] + counts["not_sampled"] == 200  # no traceparent, or an invalid one
    assert counts["sampled"] <= 12  # binomial(200, 0.01): mean 2
    servers = {s.attributes["url.path"]: s for s in spans if s.kind == SERVER and s.name == "GET"}
    for i in range(0, 300, 3):  # sampled parents: all traced, in the caller's trace, tracestate kept
        span = servers[f"/bytes/{2000 + i}"]
        assert (span.trace_id, span.parent_span_id) == (f"{i + 1:032x}", f"{i + 7:016x}")
        assert span.trace_state == "k=v"
    group = {p: (int(p.rsplit("/", 1)[1]) - 2000) % 3 for p in servers if p.startswith("/bytes/2")}
    assert not [p for p, g in group.items() if g == 1]  # not sampled by their parent: none traced
    roots = [s for p, s in servers.items() if p.startswith("/bytes/3") or group.get(p) == 2]
    assert len(roots) == counts["sampled"]
    assert all(s.parent_span_id != "00f067aa0ba902b7" for s in roots)  # the invalid parent is not used


def test_a_cpu_budget_lowers_the_share_traced_under_load_and_counts_the_rest(tmp_path) -> None:
    """Saturating keep-alive load (h2load) with every request to be traced and a budget of 5 % of a CPU:
    the daemon halves the share traced each second it is over, and what it did not trace is counted."""
    import shutil
    import subprocess

    with EnvoyLab(concurrency=1, direct_response=True) as lab:
        output, summary = tmp_path / "spans.jsonl", tmp_path / "summary.json"
        daemon = DaemonProcess(["--pid", str(lab.pid), "--request-detail", "summary",
                                "--output", str(output), "--summary-json",
                                str(summary), "--no-offcpu", "--cpu-budget", "0.05"], tmp_path).start()
        exe = shutil.which("h2load")  # a duration run (-D), which tests.support.h2load does not do
        assert exe, "h2load (nghttp2-client) is needed"
        proc = subprocess.run([exe, "--h1", "-c", "8", "-n", "200000", "-D", "6",
                               f"http://127.0.0.1:{lab.http_port}/"],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert daemon.stop() == 0, daemon.stderr()
    s = json.loads(summary.read_text())["sampler"]
    budget, counts = s["cpu_budget"], s["requests"]
    assert budget["budget"] == 0.05 and budget["changes"] >= 2 and budget["ratio_lowest"] <= 0.25
    assert budget["highest_share"] > 0.05  # it was over, which is why it adapted
    assert counts["not_sampled"] > counts["sampled"] > 0


def test_tls_connections_are_sampled_whole_once_their_listener_is_known(lab, tmp_path) -> None:
    """The kernel cannot see a TLS connection's requests, so on a listener a TLS connection came through
    it decides whole connections with the ratio: one not traced sends no record at all; one traced is
    whole (handshake included)."""
    import time

    from otel_envoy.lab import clients

    summary = tmp_path / "summary.json"
    with OtlpReceiver() as receiver:
        daemon = DaemonProcess(["--pid", str(lab.pid), "--request-detail", "summary",
                                "--otlp-endpoint", receiver.grpc_endpoint,
                                "--otlp-protocol", "grpc", "--summary-json", str(summary), "--no-offcpu",
                                "--sampler", "traceidratio", "--sampler-arg", "0.25",
                                "--record", str(tmp_path / "run.events")], tmp_path).start()
        first = clients.curl_tls(lab.tls_port, "a.example.com", alpn="http/1.1", ca=lab.ca_path)
        assert first.http_code == 200, first.stderr
        time.sleep(1.0)  # the daemon hands the listener to the kernel within 0.25 s of seeing it is TLS
        h2load(f"https://127.0.0.1:{lab.tls_port}/", 400, 4, ["Connection: close"], all_succeeded=True)
        assert daemon.stop() == 0, daemon.stderr()
        spans = receiver.spans()
    counts = json.loads(summary.read_text())["sampler"]["tls_connections"]
    assert counts["traced"] + counts["not_traced"] == 400
    assert 0.15 * 400 < counts["traced"] < 0.35 * 400  # binomial(400, 0.25) over client ports: mean 100
    tls_conns = [s for s in spans if s.name == "envoy.downstream.connection"
                 and s.attributes.get("network.local.port") == lab.tls_port]
    assert len(tls_conns) == 1 + counts["traced"]  # the first one (before the kernel knew) and the traced
    handshakes = {s.parent_span_id for s in spans if s.name == "tls.handshake"}
    assert all(c.span_id in handshakes for c in tls_conns)  # each traced connection is whole
    # Nothing of a connection not traced reached the ring: every record naming a peer of the TLS listener
    # names one whose accept was recorded (h2load resets each connection after its answer: those resets
    # used to come through, one record per connection not traced).
    accepted, named, listener_resets = _tls_peer_ports(tmp_path / "run.events", lab.tls_port)
    assert len(accepted) >= 1 + counts["traced"]
    assert named and named <= accepted, sorted(named - accepted)[:10]
    # A reset the listening socket itself sent names no peer (the tracepoint gives the listener's
    # addresses); the daemon counts those apart, as belonging to no connection.
    correlator = json.loads(summary.read_text())["correlator"]
    assert correlator.get("tcp_resets_sent_by_listener", 0) == listener_resets


def _tls_peer_ports(recording: Path, tls_port: int) -> tuple[set[int], set[int], int]:
    """From a recording: the peer ports of its recorded accepts (the TLS listener's, and the daemon's own
    admin calls), the peer ports the TCP state, retransmit and reset records of the TLS listener's
    connections name, and how many resets the listening socket itself sent (records naming no peer)."""
    from otel_envoy.events.decode import Decoder
    from otel_envoy.events.recording import RecordingReader
    from otel_envoy.events.types import AcceptEvent, SockStateEvent, TcpEvent

    decoder = Decoder()
    events = [decoder.decode(raw) for kind, raw in RecordingReader(recording) if kind == "kernel"]
    accepted = {e.peer_port for e in events if isinstance(e, AcceptEvent)}
    on_listener = [e for e in events if isinstance(e, SockStateEvent | TcpEvent) and e.sport == tls_port]
    listener_resets = [e for e in on_listener if e.dport == 0]
    # only a reset the listening socket sent (TCP_LISTEN) names no peer
    assert all(isinstance(e, TcpEvent) and e.state == 10 for e in listener_resets), listener_resets
    named = {e.dport for e in on_listener if e.dport != 0}
    return accepted, named, len(listener_resets)


def _sampled_whole_run(lab: EnvoyLab, workdir: Path, drive) -> tuple[dict, list[SpanRecord], list]:
    """The daemon with a 0.5 ratio (OTLP/gRPC to a real receiver, its event stream recorded) while
    ``drive()`` runs: the summary, the spans received and the recorded kernel events."""
    from otel_envoy.events.decode import Decoder
    from otel_envoy.events.recording import RecordingReader

    summary, recording = workdir / "summary.json", workdir / "run.events"
    with OtlpReceiver() as receiver:
        daemon = DaemonProcess(["--pid", str(lab.pid), "--summary-json", str(summary), "--no-offcpu",
                                "--otlp-endpoint", receiver.grpc_endpoint, "--otlp-protocol", "grpc",
                                "--sampler", "traceidratio", "--sampler-arg", "0.5", "--cpu-budget", "0",
                                "--record", str(recording)], workdir).start()
        drive()
        assert daemon.stop() == 0, daemon.stderr()
        spans = receiver.spans()
    decoder = Decoder()
    events = [decoder.decode(raw) for kind, raw in RecordingReader(recording) if kind == "kernel"]
    return json.loads(summary.read_text()), spans, events


def _assert_decided_whole(report: dict, spans: list[SpanRecord], events: list, kind: str, port: int,
                          connections: int) -> list[SpanRecord]:
    """``connections`` connections to ``port`` were decided whole (``kind``): about half traced, each one
    not traced sent nothing between its accept and its close (marked ``sampled_out``), made no span and was
    counted; returns the connection spans of the traced ones."""
    from otel_envoy.events.types import AcceptEvent, CloseEvent, DataEvent

    counts = report["sampler"][f"{kind}_connections"]
    assert counts["traced"] + counts["not_traced"] == connections
    assert 0.2 * connections < counts["traced"] < 0.8 * connections  # binomial(40, 0.5) over random draws
    assert report["correlator"]["connections_sampled_out"] == counts["not_traced"]
    assert report["accounting"]["connections"]["holds"]
    conns = [s for s in spans if s.name == "envoy.downstream.connection"
             and s.attributes.get("network.local.port") == port]
    assert len(conns) == counts["traced"]
    transfers: dict[tuple[int, int], int] = {}  # per open fd: its connection's non-peek data records
    marked = 0
    for e in sorted((e for e in events if isinstance(e, AcceptEvent | CloseEvent | DataEvent)),
                    key=lambda e: e.ts_ns):
        key = (e.tgid, e.fd)
        if isinstance(e, AcceptEvent):
            transfers[key] = 0
        elif isinstance(e, DataEvent):
            if not e.flags & 1 and key in transfers:  # a listener filter's peek may come before the decision
                transfers[key] += 1
        elif e.sampled_out:
            marked += 1
            assert transfers.pop(key, 0) == 0, e  # nothing between its accept and its close
    assert marked == counts["not_traced"]
    return conns


def test_h2c_connections_are_sampled_whole_at_their_preface(lab, tmp_path) -> None:
    """HTTP/2 with prior knowledge: the kernel cannot decide its requests one by one (HPACK-coded headers,
    which user space decodes only if it sees every header block of the connection), so it decides the
    whole connection with the ratio at the client preface. One not traced sends nothing between its accept
    and its close, which comes marked: no span of it, counted; one traced has every request a span."""
    import shutil
    import subprocess

    connections, per_connection = 40, 5

    def drive() -> None:
        exe = shutil.which("h2load")
        assert exe, "h2load (nghttp2-client) is needed"
        n = connections * per_connection
        proc = subprocess.run([exe, "-c", str(connections), "-n", str(n), "-m", "1",
                               f"http://127.0.0.1:{lab.http_port}/h2c"], capture_output=True, text=True,
                              timeout=60)
        assert proc.returncode == 0 and f"{n} done" in proc.stdout, proc.stdout + proc.stderr

    report, spans, events = _sampled_whole_run(lab, tmp_path, drive)
    conns = _assert_decided_whole(report, spans, events, "h2c", lab.http_port, connections)
    assert all(s.attributes.get("envoy.connection.requests") == per_connection for s in conns)
    requests = [s for s in spans if s.kind == SERVER and s.attributes.get("url.path") == "/h2c"]
    assert len(requests) == per_connection * len(conns)


def test_connections_that_speak_no_http_are_sampled_whole_at_their_first_bytes(lab, tmp_path) -> None:
    """First bytes that are no HTTP/1.x method, no HTTP/2 preface and no TLS record (a database protocol
    through tcp_proxy; here bytes Envoy's HTTP listener rejects): the kernel cannot decide requests in them,
    so it decides the connection whole with the ratio, as an h2c one."""
    import socket

    connections = 40

    def drive() -> None:
        for _ in range(connections):
            with socket.create_connection(("127.0.0.1", lab.http_port), timeout=10) as sock:
                sock.sendall(b"\x00\x01\x02 this is no HTTP\r\n\r\n")
                assert sock.recv(4096).startswith(b"HTTP/1.1 400")  # then we close (Envoy would wait 1 s)

    report, spans, events = _sampled_whole_run(lab, tmp_path, drive)
    _assert_decided_whole(report, spans, events, "other", lab.http_port, connections)
    assert report["sampler"]["h2c_connections"] == {"traced": 0, "not_traced": 0}


def test_a_protocol_whose_server_speaks_first_is_sampled_whole_at_its_first_write(tmp_path) -> None:
    """A server-first protocol (an SMTP- or MySQL-like greeting) through Envoy's tcp_proxy: Envoy's first
    transfer on the downstream connection is a write, so no HTTP/1.x request can be in it; the kernel decides
    the connection whole with the ratio there."""
    import socket
    import socketserver
    import threading

    from otel_envoy.lab.envoy_config import free_ports, static_cluster, tcp_proxy_listener

    class Greeter(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            self.request.sendall(b"220 greeter ready\r\n")
            self.request.recv(64)  # QUIT
            self.request.sendall(b"221 bye\r\n")

    connections = 40
    with socketserver.ThreadingTCPServer(("127.0.0.1", 0), Greeter) as greeter:
        threading.Thread(target=greeter.serve_forever, daemon=True).start()
        (tcp_port,) = free_ports(1)
        with EnvoyLab(concurrency=1, extra_clusters=[static_cluster("greeter", greeter.server_address[1])],
                      extra_listeners=[tcp_proxy_listener("tcp_greeter", tcp_port, "greeter")]) as lab:

            def drive() -> None:
                for _ in range(connections):
                    with socket.create_connection(("127.0.0.1", tcp_port), timeout=10) as sock:
                        assert sock.recv(64).startswith(b"220 "), "no greeting through tcp_proxy"
                        sock.sendall(b"QUIT\r\n")
                        assert sock.recv(64).startswith(b"221 ")

            report, spans, events = _sampled_whole_run(lab, tmp_path, drive)
        greeter.shutdown()
    _assert_decided_whole(report, spans, events, "other", tcp_port, connections)

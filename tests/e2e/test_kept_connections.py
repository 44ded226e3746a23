"""Connections the sampler leaves out are traced all the same when something goes wrong with them (issue 13:
"anomalies are always kept"): a TLS connection whose handshake the server refused or the client gave up, a
slow handshake, a reset, a long wait in the accept queue. Real Envoy, real TLS clients driven flight by
flight over real sockets, a real OTLP receiver; the ratio is 0, so nothing else of the TLS listener is
traced after its first connection."""

from __future__ import annotations

import json
import os
import signal
import ssl
import time
from collections import Counter

import pytest

from otel_envoy.lab import clients
from otel_envoy.lab.lab import EnvoyLab
from otel_envoy.spans.model import STATUS_CODE_ERROR, SpanRecord
from tests.support.daemon import DaemonProcess
from tests.support.otlp_receiver import OtlpReceiver
from tests.support.tls_steps import SteppedTlsClient

pytestmark = pytest.mark.root

SNI = "a.example.com"
FINE, REFUSED, GAVE_UP, SLOW, RESET, QUEUED = 20, 3, 3, 2, 2, 2
SLOW_HANDSHAKE_S, SLOW_ACCEPT_S = 0.3, 0.15


@pytest.fixture(scope="module")
def lab():
    with EnvoyLab(concurrency=1) as lab:
        yield lab


def _client(lab: EnvoyLab, context: ssl.SSLContext | None = None) -> SteppedTlsClient:
    return SteppedTlsClient(lab.tls_port, SNI, lab.ca_path, context=context)


def _refused(lab: EnvoyLab, times: int) -> None:
    """``times`` clients offering only a cipher Envoy's defaults no longer accept: the server's alert."""
    old = ssl.create_default_context(cafile=str(lab.ca_path))
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    old.set_ciphers("AES128-SHA")
    for _ in range(times):
        c = _client(lab, old)
        c.send_hello()
        with pytest.raises(ssl.SSLError):
            c.read_server_flight()
        c.close()


def _drive(lab: EnvoyLab) -> None:
    """The clients, one kind after the other."""
    for _ in range(FINE):  # whole handshakes and a request each: left out, and nothing wrong with them
        c = _client(lab)
        c.handshake()
        assert c.get().startswith(b"HTTP/1.1 200"), "a fine connection was not answered"
        c.close()
    _refused(lab, REFUSED)
    for _ in range(GAVE_UP):  # the client reads the server's hello flight and goes away
        c = _client(lab)
        c.send_hello()
        c.read_server_flight()
        c.close()
    for _ in range(SLOW):  # the client's Finished comes late
        c = _client(lab)
        c.handshake(pause_s=SLOW_HANDSHAKE_S + 0.2)
        assert c.get().startswith(b"HTTP/1.1 200")
        c.close()
    for _ in range(RESET):  # a reset after the answer: Envoy's next read fails with ECONNRESET
        c = _client(lab)
        c.handshake()
        assert c.get().startswith(b"HTTP/1.1 200")
        c.reset()
    os.kill(lab.pid, signal.SIGSTOP)  # the worker cannot accept: the kernel's accept queue holds them
    try:
        _wait_stopped(lab.pid)
        queued = [_client(lab) for _ in range(QUEUED)]
        time.sleep(SLOW_ACCEPT_S + 0.2)
    finally:
        os.kill(lab.pid, signal.SIGCONT)
    for c in queued:
        c.handshake()
        assert c.get().startswith(b"HTTP/1.1 200")
        c.close()
    time.sleep(0.5)  # the last closes


def _wait_stopped(pid: int) -> None:
    """Until every thread of ``pid`` is stopped (SIGSTOP takes effect asynchronously)."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        states = []
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/stat") as f:
                states.append(f.read().rsplit(")", 1)[1].split()[0])
        if all(state in "tT" for state in states):
            return
        time.sleep(0.005)
    raise AssertionError(f"process {pid} did not stop")


def _children(spans: list[SpanRecord], name: str) -> dict[str, SpanRecord]:
    return {s.parent_span_id: s for s in spans if s.name == name}


def test_failed_slow_reset_and_queued_connections_are_kept_when_the_sampler_leaves_them_out(lab, tmp_path):
    summary = tmp_path / "summary.json"
    with OtlpReceiver() as receiver:
        daemon = DaemonProcess(["--pid", str(lab.pid), "--summary-json", str(summary), "--no-offcpu",
                                "--otlp-endpoint", receiver.grpc_endpoint, "--otlp-protocol", "grpc",
                                "--sampler", "traceidratio", "--sampler-arg", "0", "--cpu-budget", "0",
                                "--keep-slow-handshake-ms", str(SLOW_HANDSHAKE_S * 1000),
                                "--keep-slow-accept-ms", str(SLOW_ACCEPT_S * 1000)], tmp_path).start()
        first = clients.curl_tls(lab.tls_port, SNI, alpn="http/1.1", ca=lab.ca_path)
        assert first.http_code == 200, first.stderr  # traced whole: the daemon learns the listener is TLS
        time.sleep(1.0)  # and hands it to the kernel within 0.25 s
        _drive(lab)
        assert daemon.stop() == 0, daemon.stderr()
        spans = receiver.spans()
    report = json.loads(summary.read_text())
    sampler = report["sampler"]
    left_out = FINE + REFUSED + GAVE_UP + SLOW + RESET + QUEUED
    assert sampler["tls_connections"] == {"traced": 0, "not_traced": left_out}
    assert sampler["kept_connections"] == {
        "without_handshake_bytes": 0, "tls_handshake_failed": REFUSED + GAVE_UP, "reset": RESET,
        "tls_handshake_slow": SLOW, "accept_queue_slow": QUEUED}
    conns = [s for s in spans if s.name == "envoy.downstream.connection"
             and s.attributes.get("network.local.port") == lab.tls_port]
    kept = Counter(s.attributes.get("otel_envoy.kept") for s in conns)
    assert kept == {None: 1, "tls_handshake_failed": REFUSED + GAVE_UP, "reset": RESET,
                    "tls_handshake_slow": SLOW, "accept_queue_slow": QUEUED}, kept
    handshakes, queues = _children(spans, "tls.handshake"), _children(spans, "tcp.accept_queue")
    for conn in conns:
        reason = conn.attributes.get("otel_envoy.kept")
        tls = handshakes[conn.span_id]  # every kept connection has its handshake, from the bytes held
        assert tls.attributes["tls.client.server_name"] == SNI, tls.attributes
        took = (tls.end_ns - tls.start_ns) / 1e9
        if reason == "tls_handshake_failed":
            assert tls.status_code == STATUS_CODE_ERROR and tls.attributes["tls.established"] is False
        else:
            assert tls.attributes["tls.established"] is True, (reason, tls.attributes, tls.status_message)
            assert tls.attributes["tls.protocol.version"] == "1.3"
        if reason == "tls_handshake_slow":
            assert took >= SLOW_HANDSHAKE_S, took
        if reason == "accept_queue_slow":
            waited = queues[conn.span_id]
            assert (waited.end_ns - waited.start_ns) / 1e9 >= SLOW_ACCEPT_S
    failed = [handshakes[c.span_id] for c in conns
              if c.attributes.get("otel_envoy.kept") == "tls_handshake_failed"]
    messages = Counter("handshake_failure" in t.status_message for t in failed)
    assert messages == {True: REFUSED, False: GAVE_UP}, [t.status_message for t in failed]
    assert sum(1 for t in failed if "closed during the TLS handshake" in t.status_message) == GAVE_UP


#: the client preface and an empty SETTINGS frame
H2C_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


def test_an_h2c_connection_sampled_out_at_its_preface_is_kept_when_it_is_reset(lab, tmp_path):
    """h2c is decided whole at its preface, after its accept was reported: one the sampler left out and
    that then hits a reset is reported at its close all the same (no transfer of it was), marked kept;
    the others end without a span."""
    import socket
    import struct

    summary = tmp_path / "summary.json"
    with OtlpReceiver() as receiver:
        daemon = DaemonProcess(["--pid", str(lab.pid), "--summary-json", str(summary), "--no-offcpu",
                                "--otlp-endpoint", receiver.grpc_endpoint, "--otlp-protocol", "grpc",
                                "--sampler", "traceidratio", "--sampler-arg", "0", "--cpu-budget", "0"],
                               tmp_path).start()
        ports = {}
        for how in ("close", "close", "close", "reset", "reset"):
            s = socket.create_connection(("127.0.0.1", lab.http_port), timeout=10)
            s.sendall(H2C_PREFACE)
            assert s.recv(9)[3] == 4, "Envoy answers with its SETTINGS"
            ports.setdefault(how, []).append(s.getsockname()[1])
            if how == "reset":
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            else:  # an orderly end: unread bytes at the close would make the kernel send a reset
                s.shutdown(socket.SHUT_WR)
                while s.recv(4096):
                    pass
            s.close()
        time.sleep(0.5)
        assert daemon.stop() == 0, daemon.stderr()
        spans = receiver.spans()
    report = json.loads(summary.read_text())
    assert report["sampler"]["h2c_connections"] == {"traced": 0, "not_traced": 5}
    assert report["sampler"]["kept_connections"]["reset"] == 2
    assert report["correlator"]["connections_sampled_out"] == 3
    conns = [s for s in spans if s.name == "envoy.downstream.connection"
             and s.attributes.get("network.local.port") == lab.http_port]
    assert sorted(s.attributes["network.peer.port"] for s in conns) == sorted(ports["reset"])
    for conn in conns:
        assert conn.attributes["otel_envoy.kept"] == "reset"
        assert conn.attributes["otel_envoy.partial"] == ["transfers_not_reported"]
        assert conn.attributes["envoy.connection.bytes_received"] == len(H2C_PREFACE)


def test_kept_requests_and_connections_are_sent_within_the_keep_rate_and_the_rest_counted(lab, tmp_path):
    """A flood of failures (refused handshakes, 5xx answers) is traced up to --keep-rate a second; what
    the rate refused is counted, and the request metrics still count every 5xx."""
    import http.client

    rate, handshakes, errors = 3, 12, 12
    summary = tmp_path / "summary.json"
    with OtlpReceiver() as receiver:
        daemon = DaemonProcess(["--pid", str(lab.pid), "--summary-json", str(summary), "--no-offcpu",
                                "--otlp-endpoint", receiver.grpc_endpoint, "--otlp-protocol", "grpc",
                                "--sampler", "traceidratio", "--sampler-arg", "0", "--cpu-budget", "0",
                                "--keep-rate", str(rate)], tmp_path).start()
        first = clients.curl_tls(lab.tls_port, SNI, alpn="http/1.1", ca=lab.ca_path)
        assert first.http_code == 200, first.stderr
        time.sleep(1.5)  # the listener is handed to the kernel; the bucket is full (one second's worth)
        started = time.monotonic()
        _refused(lab, handshakes)
        conn = http.client.HTTPConnection("127.0.0.1", lab.http_port, timeout=10)
        for _ in range(errors):
            conn.request("GET", "/status/503")
            resp = conn.getresponse()
            resp.read()
            assert resp.status == 503
        conn.close()
        took = time.monotonic() - started
        time.sleep(0.5)
        assert daemon.stop() == 0, daemon.stderr()
        spans = receiver.spans()
    report = json.loads(summary.read_text())
    over = report["sampler"]["kept_over_rate"]
    kept_conns = report["sampler"]["kept_connections"]["tls_handshake_failed"]
    kept_requests = sum(1 for s in spans if s.attributes.get("otel_envoy.kept") == "server_error")
    assert kept_conns + over["connections"] == handshakes
    assert kept_requests + over["requests"] == errors
    sent = kept_conns + kept_requests
    assert rate <= sent <= rate + rate * took + 1, (sent, took)  # a full bucket, then the rate
    assert report["http_requests"]["by_status"]["503"] == errors  # the metrics count them all


def test_a_flood_of_5xx_past_the_cpu_budget_lowers_the_keep_rate_and_counts_the_rest(lab, tmp_path):
    """Every answer a 5xx, at saturation, with the ratio at 0 (nothing sampled, so the budget cannot lower
    it): the kept records alone take the daemon past a small budget, and the budget lowers their rate; what
    it refused is counted, and the metrics still count every request."""
    from tests.support.h2load import h2load

    requests = 150_000
    summary = tmp_path / "summary.json"
    with OtlpReceiver() as receiver:
        daemon = DaemonProcess(["--pid", str(lab.pid), "--summary-json", str(summary), "--no-offcpu",
                                "--otlp-endpoint", receiver.grpc_endpoint, "--otlp-protocol", "grpc",
                                "--sampler", "traceidratio", "--sampler-arg", "0", "--cpu-budget", "0.02"],
                               tmp_path).start()
        h2load(f"http://127.0.0.1:{lab.http_port}/status/503", requests, 8)
        time.sleep(0.5)
        assert daemon.stop() == 0, daemon.stderr()
        spans = receiver.spans()
    report = json.loads(summary.read_text())
    sampler = report["sampler"]
    budget = sampler["cpu_budget"]
    assert 0 < budget["keep_rate_lowest"] < requests, budget  # lowered: the rate was in force
    over = sampler["kept_over_rate"]["requests"]
    assert over > 0 and sampler["kept_records_sent"] + over == requests, sampler
    kept = sum(1 for s in spans if s.attributes.get("otel_envoy.kept") == "server_error")
    assert kept == sampler["kept_records_sent"]  # every kept record sent became a span the receiver got
    assert report["http_requests"]["by_status"]["503"] == requests  # the metrics count every one

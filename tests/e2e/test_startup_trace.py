"""Envoys that start after the daemon (``--comm envoy``): each start's trace, with both workers' sockets,
and accepts per worker against Envoy's own counters; then a restart, traced as well."""

from __future__ import annotations

import re
import threading
import time
from typing import Any

import pytest

from otel_envoy.lab import clients
from otel_envoy.lab.lab import EnvoyLab
from otel_envoy.spans.model import SpanRecord
from tests.support.daemon import DaemonProcess
from tests.support.h2load import h2load
from tests.support.otlp_receiver import OtlpReceiver

pytestmark = pytest.mark.root

ACCEPTED = "envoy.worker.connections.accepted"
LISTENER_CX = r"^listener\.(plain_http|tls_sni)\.(worker_\d+\.)?downstream_cx_total$"


def _startup(spans: list[SpanRecord], pid: int) -> tuple[SpanRecord, list[SpanRecord]]:
    """The envoy.startup root span of ``pid`` and its socket spans."""
    roots = [s for s in spans if s.name == "envoy.startup" and s.attributes.get("process.pid") == pid]
    assert len(roots) == 1, [s.name for s in spans if "envoy.startup" in s.name]
    root = roots[0]
    return root, [s for s in spans if s.trace_id == root.trace_id and s.parent_span_id == root.span_id]


def _check_startup(spans: list[SpanRecord], started: dict[str, Any]) -> None:
    """The start of an Envoy (``started``: its pid, ports and worker thread names): the plaintext listener
    has one SO_REUSEPORT socket per worker, the TLS one a socket and its duplicate, each taken by a
    different worker, in the order bind, listen, registration; everything inside the root span, which
    starts at the exec."""
    root, sockets = _startup(spans, started["pid"])
    workers = started["workers"]  # {"wrk:worker_0", "wrk:worker_1"}
    assert len(workers) == 2
    by_port: dict[int, list[SpanRecord]] = {}
    for s in sockets:
        assert s.name == "envoy.listen_socket"
        assert root.start_ns <= s.start_ns <= s.end_ns <= root.end_ns
        steps = [e[1] for e in s.events]
        assert steps.index("listen") < steps.index("epoll registration"), steps
        assert s.attributes["thread.name"] == "envoy"  # the main thread sets every socket up
        by_port.setdefault(int(s.attributes["server.port"]), []).append(s)
    plain, tls = by_port[started["http_port"]], by_port[started["tls_port"]]
    assert len(plain) == 2 and all(s.attributes["envoy.listen_socket.reuse_port"] is True for s in plain)
    assert all([e[1] for e in s.events][:3] == ["setsockopt SO_REUSEPORT", "bind", "listen"] for s in plain)
    assert {s.attributes["envoy.listen_socket.accepted_by"][0] for s in plain} == workers
    assert len(tls) == 2
    original = [s for s in tls if "envoy.listen_socket.duplicate_of" not in s.attributes]
    copies = [s for s in tls if "envoy.listen_socket.duplicate_of" in s.attributes]
    assert len(original) == 1 and len(copies) == 1
    copied = copies[0].attributes["envoy.listen_socket.duplicate_of"]
    assert copied == original[0].attributes["envoy.listen_socket.fd"]
    assert copies[0].events[0][1] == "dup"
    assert {s.attributes["envoy.listen_socket.accepted_by"][0] for s in tls} == workers
    assert root.attributes["envoy.startup.workers"] == 2
    assert root.attributes["envoy.startup.reuse_port_sockets"] == 2
    assert root.attributes["envoy.startup.duplicated_sockets"] == 1
    assert 0 < root.attributes["envoy.startup.first_listen_ns"] <= root.attributes["envoy.startup.ready_ns"]


def test_envoy_started_after_the_daemon_yields_its_startup_trace(tmp_path) -> None:
    """The daemon waits for processes named envoy; an Envoy with two workers then starts: its startup
    trace shows both workers' sockets (SO_REUSEPORT on one listener, dup on the other), and the per-worker
    accept metric equals Envoy's per-worker counters and sums to each listener's downstream_cx_total. The
    Envoy is then stopped and started again: the new process is traced within 2 s of its start, and the
    daemon goes on."""
    receiver = OtlpReceiver().start()
    daemon = DaemonProcess(["--comm", "envoy", "--otlp-endpoint", receiver.grpc_endpoint, "--otlp-protocol",
                            "grpc", "--metrics-interval", "1"], tmp_path).start()
    first = EnvoyLab(concurrency=2, direct_response=True, tls_reuse_port=False)
    second = EnvoyLab(concurrency=2, direct_response=True)
    try:
        first.start()
        loads = [threading.Thread(target=h2load, args=(f"http://127.0.0.1:{first.http_port}/", 300, 6,
                                                        ["Connection: close"]))]
        for t in loads:
            t.start()
        for _ in range(20):
            assert clients.curl_tls(first.tls_port, "a.example.com", ca=first.ca_path).http_code == 200
        for t in loads:
            t.join()
        stats = first.stats(LISTENER_CX)
        envoy: dict[tuple[int, int], int] = {}  # (port, worker) -> accepted
        totals = {first.http_port: stats["listener.plain_http.downstream_cx_total"],
                  first.tls_port: stats["listener.tls_sni.downstream_cx_total"]}
        for name, value in stats.items():
            m = re.match(r"listener\.(\w+)\.worker_(\d+)\.", name)
            if m and value:
                port = first.http_port if m.group(1) == "plain_http" else first.tls_port
                envoy[(port, int(m.group(2)))] = value
        assert totals == {first.http_port: 300, first.tls_port: 20}  # Connection: close

        def ours() -> dict[tuple[int, int], int]:
            out: dict[tuple[int, int], int] = {}
            for p in receiver.latest_metric_points(ACCEPTED).values():
                port = p.attributes.get("server.port")
                if p.attributes.get("process.pid") == first.pid and port in totals:
                    key = (int(port), int(str(p.attributes["thread.name"]).rsplit("_", 1)[-1]))  # type: ignore[arg-type]
                    out[key] = out.get(key, 0) + int(p.value)
            return out

        receiver.wait_for_metrics(lambda _p: sum(ours().values()) >= sum(totals.values()), timeout=30)
        accepted = ours()
        first_pid = first.pid
        first_started = {"pid": first.pid, "http_port": first.http_port, "tls_port": first.tls_port,
                         "workers": set(first.worker_threads())}
        receiver.wait_for(lambda s: any(x.name == "envoy.startup" and x.attributes.get("process.pid")
                                        == first_pid for x in s), timeout=15)
        first.stop()

        second.start()
        second_pid, second_http_port = second.pid, second.http_port
        assert clients.curl_tls(second.tls_port, "a.example.com", ca=second.ca_path).http_code == 200
        asked = time.monotonic()  # its connection's span comes when it closed (plus the export's delay)
        receiver.wait_for(lambda s: any(x.name == "envoy.downstream.connection" and x.attributes.get(
            "process.pid") == second.pid for x in s), timeout=15)
        traced_after = time.monotonic() - asked
        receiver.wait_for(lambda s: any(x.name == "envoy.startup" and x.attributes.get("process.pid")
                                        == second.pid for x in s), timeout=15)
        assert daemon.proc.poll() is None, daemon.stderr()  # the daemon outlived the first Envoy
    finally:
        code = daemon.stop()
        first.stop()
        second.stop()
        receiver.stop()
    assert code == 0, daemon.stderr()
    spans = receiver.spans()

    assert accepted == envoy, (accepted, envoy)
    for port, total in totals.items():
        assert sum(n for (p, _w), n in accepted.items() if p == port) == total
    assert len({w for (_p, w) in accepted}) == 2  # both workers took connections

    _check_startup(spans, first_started)
    shutdown = [s for s in spans
                if s.name == "envoy.shutdown" and s.attributes.get("process.pid") == first_pid]
    assert len(shutdown) == 1 and shutdown[0].attributes.get("envoy.startup.exited") is True
    # the restarted Envoy: its own startup trace, and its connection traced (within 2 s of its start)
    root, sockets = _startup(spans, second_pid)
    assert len([s for s in sockets if s.attributes["server.port"] == second_http_port]) == 2
    conns = [s for s in spans if s.name == "envoy.downstream.connection"
             and s.attributes.get("process.pid") == second_pid]
    assert conns, "the restarted Envoy's connection was not traced"
    assert root.start_ns < min(c.start_ns for c in conns)
    assert traced_after < 2.0, traced_after

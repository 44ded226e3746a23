"""Requests the sampler left out are traced all the same when they fail or are slow: 5xx answers,
requests whose connection closed before an answer, slow answers (real Envoy, real BPF, real clients at
saturation, a real OTLP/gRPC receiver)."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time

import pytest

from otel_envoy.lab.lab import EnvoyLab
from tests.support.daemon import DaemonProcess
from tests.support.h2load import h2load
from tests.support.otlp_receiver import OtlpReceiver
from tests.support.traces import upstream_requests_of

pytestmark = pytest.mark.root

SERVER = 2
ERRORS, SLOW, CLOSED = 300, 4, 3
FIVE_XX_NAME = "http.plain_http.downstream_rq_5xx"
FIVE_XX = r"^http\.plain_http\.downstream_rq_5xx$"


def _slow(port: int, path: str) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", path)
    resp = conn.getresponse()
    resp.read()
    assert resp.status == 200
    conn.close()


def _closed_early(port: int, path: str) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: lab\r\nUser-Agent: impatient\r\n\r\n".encode())
        time.sleep(0.3)  # Envoy is waiting for the backend: the client gives up first


def test_errors_slow_and_abandoned_requests_are_kept_whatever_the_sampler(tmp_path) -> None:
    summary = tmp_path / "summary.json"
    with EnvoyLab(concurrency=2) as lab, OtlpReceiver() as receiver:
        daemon = DaemonProcess(["--pid", str(lab.pid), "--request-detail", "summary",
                                "--otlp-endpoint", receiver.grpc_endpoint,
                                "--otlp-protocol", "grpc", "--summary-json", str(summary),
                                "--keep-slow-ms", "400"], tmp_path, env={"OTEL_TRACES_SAMPLER": ""}).start()
        before = lab.stats(FIVE_XX).get(FIVE_XX_NAME, 0)
        base = f"http://127.0.0.1:{lab.http_port}"
        others = [threading.Thread(target=h2load, args=(f"{base}/status/503", ERRORS, 4))]
        others += [threading.Thread(target=_slow, args=(lab.http_port, f"/delay/{600 + i}"))
                   for i in range(SLOW)]
        others += [threading.Thread(target=_closed_early, args=(lab.http_port, f"/delay/{3000 + i}"))
                   for i in range(CLOSED)]
        for t in others:
            t.start()
        h2load(f"{base}/", 4000, 32)  # the load the rest hides in: 1 % of it is traced
        for t in others:
            t.join()
        errors = lab.stats(FIVE_XX)[FIVE_XX_NAME] - before
        time.sleep(3.5)  # the abandoned requests' connections close when Envoy gives up on them
        assert daemon.stop() == 0, daemon.stderr()
        spans = receiver.spans()
    assert errors == ERRORS
    servers = [s for s in spans if s.kind == SERVER and s.name != "envoy.downstream.connection"]
    by_path: dict[str, list] = {}
    for s in servers:
        by_path.setdefault(s.attributes.get("url.path", ""), []).append(s)
    # every 5xx is a span: the sampled ones as usual, every other one kept for its status
    failed = by_path["/status/503"]
    assert len(failed) == ERRORS
    assert all(s.attributes["http.response.status_code"] == 503 for s in failed)
    kept = [s for s in failed if s.attributes.get("otel_envoy.kept") == "server_error"]
    assert len(kept) >= ERRORS * 0.9  # ~1 % were sampled anyway
    assert all(s.status_code == 2 and s.attributes["http.request.method"] == "GET" for s in kept)
    # kept spans sit in their connection's trace, under the connection span
    connections = {s.span_id: s for s in spans if s.name == "envoy.downstream.connection"}
    assert all(s.parent_span_id in connections for s in kept)
    # ... with the upstream request Envoy wrote for them (it waited for the kept record: request summaries)
    for s in kept:
        (upstream,) = upstream_requests_of(spans, s)
        assert upstream.attributes["url.path"] == "/status/503" and upstream.trace_id == s.trace_id
    for i in range(SLOW):
        (slow,) = by_path[f"/delay/{600 + i}"]
        assert [u.attributes["url.path"] for u in upstream_requests_of(spans, slow)] == [f"/delay/{600 + i}"]
    for i in range(SLOW):
        (slow,) = by_path[f"/delay/{600 + i}"]
        assert slow.attributes.get("otel_envoy.kept", "slow") == "slow"
        assert slow.end_ns - slow.start_ns >= 400e6
    for i in range(CLOSED):
        (closed,) = by_path[f"/delay/{3000 + i}"]
        assert closed.attributes.get("otel_envoy.kept", "closed_before_response") == "closed_before_response"
        assert "http.response.status_code" not in closed.attributes
        assert closed.attributes.get("user_agent.original", "impatient") == "impatient"
    # the rest of the load was sampled, and the metrics still counted every request
    plain = by_path.get("/", [])
    s = json.loads(summary.read_text())
    assert len(plain) <= 0.05 * 4000
    assert s["http_requests"]["by_status"]["503"] == ERRORS
    assert s["http_requests"]["by_status"]["200"] >= 4000 + SLOW

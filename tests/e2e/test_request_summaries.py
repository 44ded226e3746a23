"""Request summaries, the default: a sampled plaintext HTTP/1.x request is one kernel record, not its reads
and writes (real Envoy, real BPF, real clients, a real OTLP/gRPC receiver).

Its span has the request line, the kept headers of its first bytes, its traceparent (and the tracestate
line after it) wherever it is in the first 512 bytes, its status and times; the upstream request Envoy
wrote for it (reported before it) waits and becomes its child. At saturation every request is a span
while the kernel sends one record per request."""

from __future__ import annotations

import json
import time

import pytest

from otel_envoy.lab.lab import EnvoyLab
from tests.support.daemon import DaemonProcess
from tests.support.h2load import h2load
from tests.support.keepalive import keep_alive
from tests.support.otlp_receiver import OtlpReceiver
from tests.support.traces import connection_traces, request_spans, upstream_requests_of

pytestmark = pytest.mark.root

SERVER, CLIENT = 2, 3
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
SATURATION_REQUESTS = 30000
RQ_TOTAL = r"^http\.plain_http\.downstream_rq_total$"


def test_each_request_is_one_record_with_its_upstream_request_and_traceparent(tmp_path) -> None:
    summary = tmp_path / "summary.json"
    padding = "x" * 150  # puts the traceparent past the first bytes the kernel keeps (128)
    with EnvoyLab(concurrency=1) as lab, OtlpReceiver() as receiver:
        daemon = DaemonProcess(["--pid", str(lab.pid), "--otlp-endpoint", receiver.grpc_endpoint,
                                "--otlp-protocol", "grpc", "--summary-json", str(summary),
                                "--request-detail", "summary"], tmp_path).start()
        port, statuses = keep_alive(lab.http_port, [
            ("GET", "/", {"User-Agent": "summary-test/1"}),
            ("GET", "/bytes/1234?secret=x", {"Authorization": "Bearer topsecret", "Cookie": "c=1",
                                             "X-Padding": padding,
                                             "traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01",
                                             "tracestate": "vendor=opaque,k=v"}),
            ("GET", "/status/503", {}),
        ])
        assert statuses == [200, 200, 503]

        def found(spans) -> bool:
            trace = connection_traces(spans, lab.http_port).get(port)
            return trace is not None and trace.root.attributes.get("envoy.connection.requests", 0) >= 3
        receiver.wait_for(found, 15)
        time.sleep(1.0)  # the upstream connection's span
        assert daemon.stop() == 0, daemon.stderr()
        spans = receiver.spans()
    counts = json.loads(summary.read_text())
    assert counts["correlator"]["request_summaries"] == 3, counts["correlator"]
    conn = connection_traces(spans, lab.http_port)[port]
    servers = request_spans(conn) + [s for s in spans if s.kind == SERVER and s.trace_id == TRACE_ID]
    servers.sort(key=lambda s: s.start_ns)
    assert [s.attributes["url.path"] for s in servers] == ["/", "/bytes/1234", "/status/503"]
    assert [s.attributes["http.response.status_code"] for s in servers] == [200, 200, 503]
    assert all(s.attributes["otel_envoy.request_detail"] == "summary" for s in servers)
    assert all("otel_envoy.kept" not in s.attributes for s in servers)  # sampled, not kept
    first, second, third = servers
    assert first.attributes["user_agent.original"] == "summary-test/1"
    assert first.parent_span_id == conn.root.span_id and third.parent_span_id == conn.root.span_id
    # the traceparent past the kept bytes still parents the span (the kernel found it and sent it)
    assert (second.trace_id, second.parent_span_id) == (TRACE_ID, PARENT_ID)
    assert second.attributes["otel_envoy.trace_context"] == "traceparent"
    assert second.trace_state == "vendor=opaque,k=v"  # the tracestate line after it, kept with it
    assert third.status_code == 2 and third.attributes["error.type"] == "503"
    assert first.end_ns > first.start_ns
    # each request's upstream request, written before the kernel reported the request, is its child
    for server in servers:
        upstream = upstream_requests_of(spans, server)
        assert len(upstream) == 1, (server.attributes, [s.attributes for s in spans if s.kind == CLIENT])
        assert upstream[0].trace_id == server.trace_id
        assert upstream[0].attributes["url.path"] == server.attributes["url.path"]
        assert server.start_ns <= upstream[0].start_ns <= upstream[0].end_ns <= server.end_ns
    text = json.dumps([s.attributes for s in spans])
    assert "topsecret" not in text and "c=1" not in text and "secret=x" not in text


def test_at_saturation_every_request_is_a_span_from_one_record(tmp_path) -> None:
    summary = tmp_path / "summary.json"
    with EnvoyLab(concurrency=1, direct_response=True) as lab, OtlpReceiver() as receiver:
        daemon = DaemonProcess(["--pid", str(lab.pid), "--otlp-endpoint", receiver.grpc_endpoint,
                                "--otlp-protocol", "grpc", "--summary-json", str(summary),
                                "--cpu-budget", "0", "--request-detail", "summary"], tmp_path).start()
        before = lab.stats(RQ_TOTAL)
        h2load(f"http://127.0.0.1:{lab.http_port}/saturated", SATURATION_REQUESTS, 16, all_succeeded=True)
        total = lab.stats(RQ_TOTAL)["http.plain_http.downstream_rq_total"] - \
            before["http.plain_http.downstream_rq_total"]
        receiver.wait_for(lambda spans: sum(
            s.attributes.get("url.path") == "/saturated" for s in spans) >= SATURATION_REQUESTS, 60)
        assert daemon.stop() == 0, daemon.stderr()
        spans = receiver.spans()
    counts = json.loads(summary.read_text())
    assert total == SATURATION_REQUESTS
    requests = [s for s in spans if s.kind == SERVER and s.attributes.get("url.path") == "/saturated"]
    assert len(requests) == SATURATION_REQUESTS
    assert all(s.attributes["otel_envoy.request_detail"] == "summary" for s in requests)
    # most are made from their connection's first request's template (spans/request_summaries.py) and
    # encoded from its pieces: each is still whole, its own, under its own connection
    assert len({s.span_id for s in requests}) == SATURATION_REQUESTS
    assert all(s.attributes["http.response.status_code"] == 200 and s.name == "GET" for s in requests)
    assert all([e[1] for e in s.events] == ["http.request.received", "http.response.first_byte"]
               and s.start_ns == s.events[0][0] <= s.events[1][0] == s.end_ns for s in requests)
    conns = connection_traces(spans, lab.http_port)
    assert len(conns) == 16 and sum(len(request_spans(t)) for t in conns.values()) == SATURATION_REQUESTS
    assert all(r.parent_span_id == t.root.span_id and r.attributes["client.port"] == port
               for port, t in conns.items() for r in request_spans(t))
    for trace in conns.values():  # each span's own round: later requests of a connection in later rounds
        rounds = [r.attributes["envoy.event_loop.round"] for r in request_spans(trace)]
        assert rounds == sorted(rounds) and len(set(rounds)) == len(rounds), rounds[:20]
    assert counts["drops"] == {}, counts["drops"]
    # one record per request: the requests' records, plus the 16 connections' and a few rounds'
    assert counts["counts"]["events"] < SATURATION_REQUESTS * 1.05, counts["counts"]

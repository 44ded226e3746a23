"""RequestSpanBuilder (spans/requests.py): where the request spans of one proxied request go, by the trace
context on the downstream and the upstream request.
"""

from __future__ import annotations

import pytest

from otel_envoy.correlate.records import ConnectionRecord, RequestRecord, TcpConnect, UpstreamRecord
from otel_envoy.protocols.http import HttpExchange, HttpMessage
from otel_envoy.protocols.tracecontext import trace_context
from otel_envoy.spans.clock import MonotonicClock
from otel_envoy.spans.connection import ConnectionSpanBuilder
from otel_envoy.spans.requests import RequestSpanBuilder
from tests.support.correlation import OFFSET, RESOURCE
from tests.support.events import LISTEN_FD, LPORT, PEER, TGID, TID

CLIENT_B3 = "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1"
CLIENT_TP = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
ENVOY_TP = "00-49fd87ded2f9503d30abce705d98e55e-27ab0fe9fa7fdb29-01"  # a trace Envoy's tracer started
ENVOY_CHILD_TP = "00-4bf92f3577b34da6a3ce929d0e0e4736-b031a366acd1a2e9-01"  # Envoy's span, client's trace


def _request_spans(down_headers: dict[str, str], up_headers: dict[str, str]) -> tuple:
    """Our SERVER and CLIENT span of one proxied GET /hello (request headers as given)."""
    conn = ConnectionRecord(TGID, 30, TID, "wrk:worker_0", LISTEN_FD, PEER, 40000, LPORT, 1_000,
                            trace_id="1" * 32, span_id="2" * 16)
    down = HttpMessage(2_000, 2_100, method="GET", path="/hello", version="1.1", headers=down_headers)
    up_req = HttpMessage(3_000, 3_100, method="GET", path="/hello", version="1.1", headers=up_headers)
    up_req.response = HttpMessage(4_000, 4_100, status=200, version="1.1", body_bytes=2)
    resp = HttpMessage(5_000, 5_100, status=200, version="1.1", body_bytes=2)
    up = UpstreamRecord(TGID, 31, TID, "wrk:worker_0", "127.0.0.1", 8080, "3" * 32, "4" * 16,
                        TcpConnect(2_500, 0, "5" * 16))
    rr = RequestRecord(conn, down, "6" * 16, trace_context(down_headers))
    up.cause.request = rr
    rr.upstream.append((up, up_req, "7" * 16))
    builder = RequestSpanBuilder(ConnectionSpanBuilder(RESOURCE, MonotonicClock(OFFSET)))
    server, client = builder.downstream(rr, HttpExchange(down, resp))
    return conn, server, client


def _links(span) -> list[tuple[str, str, str]]:
    return [(t, s, a["otel_envoy.link"]) for t, s, a in span.links]


def test_upstream_request_in_envoys_other_trace_links_to_its_downstream_request() -> None:
    """A b3 client in front of Envoy's W3C-only OpenTelemetry tracer: Envoy starts a trace of its own and
    sends its traceparent upstream (the b3 header passes through). The request span stays in the client's
    trace, the upstream request span in Envoy's; each links to the other, so neither half is lost."""
    conn, server, client = _request_spans({"b3": CLIENT_B3}, {"b3": CLIENT_B3, "traceparent": ENVOY_TP})
    assert f"{server.trace_id}-{server.parent_span_id}-1" == CLIENT_B3
    assert f"00-{client.trace_id}-{client.parent_span_id}-01" == ENVOY_TP
    assert _links(server) == [(conn.trace_id, conn.span_id, "downstream_connection"),
                              (client.trace_id, client.span_id, "upstream_request")]
    # the upstream connection this request opened sits under it, in the client's trace
    assert _links(client) == [(server.trace_id, "4" * 16, "upstream_connection"),
                              (server.trace_id, server.span_id, "downstream_request")]


@pytest.mark.parametrize(("down", "up", "parent"), [
    ({"traceparent": CLIENT_TP}, {"traceparent": ENVOY_CHILD_TP}, "b031a366acd1a2e9"),  # Envoy continued it
    ({"traceparent": CLIENT_TP}, {"traceparent": CLIENT_TP}, "6" * 16),  # no tracer: passed through
    ({}, {}, "6" * 16),  # no trace context anywhere: the connection's trace
])
def test_upstream_request_in_the_same_trace_gets_no_request_links(down: dict[str, str], up: dict[str, str],
                                                                  parent: str) -> None:
    _, server, client = _request_spans(down, up)
    assert client.trace_id == server.trace_id and client.parent_span_id == parent
    assert "upstream_request" not in [k for _, _, k in _links(server)]
    assert "downstream_request" not in [k for _, _, k in _links(client)]

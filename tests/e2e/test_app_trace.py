"""Our spans in one trace with Envoy's own OpenTelemetry tracer and an OpenTelemetry-instrumented app.

The lab's Envoy runs its OpenTelemetry tracer (every request sampled, service ``envoy-lab``) in front of
``tests/support/traced_app.py`` (aiohttp + the OpenTelemetry Python SDK, service ``traced-app``); both export
to the same OTLP receiver as the daemon (service ``envoy-under-test``). One keep-alive client connection
sends three requests:

* A: ``traceparent: 00-T-P-01`` -- Envoy continues the client's trace;
* B: no trace header -- Envoy's tracer starts a trace;
* C: a single ``b3`` header -- Envoy's OpenTelemetry tracer reads W3C only: it starts a trace of its own
  (and forwards the b3 header untouched).

What Envoy 1.40's tracer does (asserted below): one span per request, named ``ingress``, kind SERVER,
scope ``envoy``, Zipkin-style string tags (``http.method``, ``http.url``, ``http.status_code``,
``upstream_cluster``, ``guid:x-request-id``...). Its parent is the client's traceparent span when there is
one, else it is a root. Upstream it sends ``traceparent: 00-<its trace>-<its own span id>-01`` and the UUID
``x-request-id`` it generated; it makes no child (egress) span. So the app's SERVER span is a child of
Envoy's ``ingress`` span, and so is our upstream request span (it sits under the trace context it carried);
our downstream request span sits under the client's span (A, C) or under Envoy's span (B: the trace context
Envoy put upstream).
"""

from __future__ import annotations

import http.client
import sys
import time
import uuid
from dataclasses import dataclass

import pytest

from otel_envoy.lab.lab import EnvoyLab
from otel_envoy.spans.model import SPAN_KIND_CLIENT, SPAN_KIND_INTERNAL, SPAN_KIND_SERVER, SpanRecord
from tests.support.daemon import DaemonProcess
from tests.support.otlp_receiver import OtlpReceiver
from tests.support.traces import Trace, connection_traces, format_traces, group_traces, service_of

pytestmark = pytest.mark.root

DAEMON, ENVOY, APP = "envoy-under-test", "envoy-lab", "traced-app"
TRACE_A, PARENT_A = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
TRACE_C, PARENT_C = "80f198ee56343ba864fe8b2a57d3eff7", "e457b5a2e4d86bd1"
B3_C = f"{TRACE_C}-{PARENT_C}-1"
LINK = "otel_envoy.link"


@pytest.fixture(scope="module")
def app_receiver():
    with OtlpReceiver() as rx:
        yield rx


@pytest.fixture(scope="module")
def app_lab(app_receiver):
    """Envoy with its OpenTelemetry tracer in front of the traced app, both exporting to ``app_receiver``."""
    app = [sys.executable, "-m", "tests.support.traced_app", "--port", "{port}",
           "--otlp-endpoint", f"127.0.0.1:{app_receiver.grpc_port}"]
    with EnvoyLab(concurrency=1, otel_collector_port=app_receiver.grpc_port, otel_service_name=ENVOY,
                  backend_command=app) as lab:
        yield lab


@pytest.fixture(scope="module")
def app_daemon(app_lab, app_receiver, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("daemon-app-trace")
    daemon = DaemonProcess(
        ["--pid", str(app_lab.pid), "--envoy-admin", app_lab.admin_url, "--otlp-endpoint",
         app_receiver.grpc_endpoint, "--otlp-protocol", "grpc"], workdir,
        env={"OTEL_SERVICE_NAME": DAEMON},
    ).start()
    time.sleep(0.2)
    yield daemon
    daemon.stop()


@dataclass
class Hop:
    """One request as the five spans it became (ours, Envoy's, the app's)."""

    server: SpanRecord  # ours: the downstream request (SERVER)
    client: SpanRecord  # ours: the request Envoy wrote upstream (CLIENT)
    envoy: SpanRecord  # Envoy's tracer: "ingress"
    app: SpanRecord  # the app's SERVER span
    work: SpanRecord  # the app's INTERNAL child


@dataclass
class Exchange:
    spans: list[SpanRecord]
    conn: Trace  # our downstream connection's trace
    a: Hop
    b: Hop
    c: Hop

    def dump(self, *trace_ids: str) -> None:
        """Print the traces (pytest shows it when the test fails)."""
        print(format_traces(self.spans, [self.conn.trace_id, *trace_ids]))


def _ours(s: SpanRecord, kind: int) -> bool:
    return service_of(s) == DAEMON and s.kind == kind and s.name == "GET"


def _complete(spans: list[SpanRecord], lab: EnvoyLab, port: int) -> bool:
    conn = connection_traces(spans, lab.http_port).get(port)
    if conn is None or conn.root.attributes.get("envoy.connection.requests") != 3:
        return False
    count = {
        "server": sum(_ours(s, SPAN_KIND_SERVER) for s in spans),
        "client": sum(_ours(s, SPAN_KIND_CLIENT) for s in spans),
        "envoy": sum(service_of(s) == ENVOY for s in spans),
        "app": sum(service_of(s) == APP and s.kind == SPAN_KIND_SERVER for s in spans),
        "work": sum(service_of(s) == APP and s.name == "app.work" for s in spans),
    }
    return all(n >= 3 for n in count.values())


def _hop(spans: list[SpanRecord], server: SpanRecord) -> Hop:
    """The rest of a request's spans, found from our downstream request span: our upstream request span is in
    its trace, or (in another) linked from it; Envoy's span is that one's parent; the app's, Envoy's child."""
    linked = {sid for _, sid, attrs in server.links if attrs.get(LINK) == "upstream_request"}
    (client,) = [s for s in spans if _ours(s, SPAN_KIND_CLIENT)
                 and (s.span_id in linked or (not linked and s.trace_id == server.trace_id))]
    (envoy,) = [s for s in spans if service_of(s) == ENVOY and s.span_id == client.parent_span_id]
    (app,) = [s for s in spans if service_of(s) == APP and s.kind == SPAN_KIND_SERVER
              and s.parent_span_id == envoy.span_id]
    (work,) = [s for s in spans if service_of(s) == APP and s.parent_span_id == app.span_id]
    return Hop(server, client, envoy, app, work)


@pytest.fixture(scope="module")
def exchange(app_lab, app_receiver, app_daemon) -> Exchange:
    """A, B and C over one keep-alive connection, and every span they made."""
    conn = http.client.HTTPConnection("127.0.0.1", app_lab.http_port, timeout=10)
    try:
        statuses = []
        for headers in ({"traceparent": f"00-{TRACE_A}-{PARENT_A}-01"}, {}, {"b3": B3_C}):
            conn.request("GET", "/hello", headers=headers)
            resp = conn.getresponse()
            assert resp.read() == b"hello from traced app\n"
            statuses.append(resp.status)
        port = conn.sock.getsockname()[1]
    finally:
        conn.close()
    assert statuses == [200, 200, 200]
    try:
        spans = app_receiver.wait_for(lambda s: _complete(s, app_lab, port), 20)
    except TimeoutError:
        print(format_traces(app_receiver.spans()))
        raise
    time.sleep(0.5)  # anything late (a duplicate would fail the unique lookups below)
    spans = app_receiver.spans()
    trace = connection_traces(spans, app_lab.http_port)[port]
    requests = [sid for _, sid, attrs in trace.root.links if attrs.get(LINK) == "request"]
    by_id = {s.span_id: s for s in spans}
    try:
        a, b, c = (_hop(spans, by_id[sid]) for sid in requests)
    except (ValueError, KeyError):
        print(format_traces(spans))
        raise
    return Exchange(spans, trace, a, b, c)


def _assert_envoy_span(hop: Hop, lab: EnvoyLab) -> None:
    """Envoy's span: "ingress", SERVER, and its x-request-id is what the app received and what we captured."""
    e = hop.envoy
    assert (e.name, e.kind, e.scope_name) == ("ingress", SPAN_KIND_SERVER, "envoy")
    assert e.attributes["http.method"] == "GET" and e.attributes["http.status_code"] == "200"
    assert e.attributes["http.url"] == f"http://127.0.0.1:{lab.http_port}/hello"
    assert e.attributes["upstream_cluster"] == "backend"
    request_id = e.attributes["guid:x-request-id"]
    uuid.UUID(request_id)  # Envoy generated it (the client sent none)
    assert hop.app.attributes["http.request.header.x-request-id"] == request_id
    assert hop.client.attributes["http.request.header.x-request-id"] == [request_id]
    assert "http.request.header.x-request-id" not in hop.server.attributes  # the client sent none ...
    assert hop.server.attributes["envoy.request_id"] == request_id  # ... the one Envoy used is on its span


def _assert_app_under_envoy(hop: Hop) -> None:
    """The app continued the traceparent Envoy sent: its own span id as the parent. Our upstream request span
    carried that same traceparent, so it sits beside the app's span, under Envoy's."""
    e, app, client = hop.envoy, hop.app, hop.client
    assert app.attributes["app.received.traceparent"] == f"00-{e.trace_id}-{e.span_id}-01"
    assert (app.name, app.trace_id, app.parent_span_id) == ("GET /hello", e.trace_id, e.span_id)
    assert (hop.work.name, hop.work.kind, hop.work.trace_id) == ("app.work", SPAN_KIND_INTERNAL, e.trace_id)
    assert (client.trace_id, client.parent_span_id) == (e.trace_id, e.span_id)
    assert client.attributes["url.path"] == "/hello" and client.attributes["http.response.status_code"] == 200
    # our two spans share one clock: the upstream request lies inside the downstream one
    assert hop.server.start_ns <= client.start_ns <= client.end_ns <= hop.server.end_ns


def _assert_linked_to_connection(hop: Hop, conn: Trace) -> None:
    s = hop.server
    assert s.trace_id != conn.trace_id
    assert [(t, sid) for t, sid, attrs in s.links if attrs.get(LINK) == "downstream_connection"] == [
        (conn.trace_id, conn.root.span_id)]


def test_client_traceparent_envoy_app_and_our_spans_share_the_clients_trace(exchange, app_lab):
    a = exchange.a
    exchange.dump(TRACE_A)
    _assert_envoy_span(a, app_lab)
    # Envoy continued the client's trace: a child of the client's span, with a span id of its own
    assert (a.envoy.trace_id, a.envoy.parent_span_id) == (TRACE_A, PARENT_A)
    # our request span: the client's trace, under the client's span (beside Envoy's)
    assert (a.server.trace_id, a.server.parent_span_id) == (TRACE_A, PARENT_A)
    assert a.server.attributes["otel_envoy.trace_context"] == "traceparent"
    _assert_app_under_envoy(a)
    _assert_linked_to_connection(a, exchange.conn)
    # in the client's trace, everything descends from the client's span (nothing else is a top)
    trace = group_traces(exchange.spans)[TRACE_A]
    ids = {s.span_id for s in trace.spans}
    tops = {(service_of(s), s.name) for s in trace.spans if s.parent_span_id not in ids}
    assert tops == {(DAEMON, "GET"), (ENVOY, "ingress")}
    assert all(s.parent_span_id == PARENT_A for s in trace.spans if s.parent_span_id not in ids)


def test_no_trace_header_our_spans_join_the_trace_envoy_started(exchange, app_lab):
    b = exchange.b
    exchange.dump(b.envoy.trace_id)
    _assert_envoy_span(b, app_lab)
    assert b.envoy.parent_span_id is None  # Envoy started this trace
    assert b.envoy.trace_id not in (TRACE_A, TRACE_C, exchange.conn.trace_id)
    # our request span joined it, under Envoy's span: the trace context Envoy put on the upstream request
    assert (b.server.trace_id, b.server.parent_span_id) == (b.envoy.trace_id, b.envoy.span_id)
    assert b.server.attributes["otel_envoy.trace_context"] == "envoy:traceparent"  # Envoy's, not the client's
    _assert_app_under_envoy(b)
    _assert_linked_to_connection(b, exchange.conn)
    # one trace, one root (Envoy's), five spans from three services
    trace = group_traces(exchange.spans)[b.envoy.trace_id]
    assert trace.root is b.envoy
    ids = {s.span_id for s in trace.spans}
    assert all(s.parent_span_id in ids for s in trace.spans if s is not b.envoy)
    assert sorted((service_of(s), s.name) for s in trace.spans) == sorted([
        (ENVOY, "ingress"), (DAEMON, "GET"), (DAEMON, "GET"), (APP, "GET /hello"), (APP, "app.work")])


def test_b3_client_our_request_stays_in_its_trace_and_links_to_the_trace_envoy_started(exchange, app_lab):
    c = exchange.c
    exchange.dump(TRACE_C, c.envoy.trace_id)
    _assert_envoy_span(c, app_lab)
    # Envoy's OpenTelemetry tracer does not read b3: a trace of its own; the b3 header goes upstream untouched
    assert c.envoy.parent_span_id is None and c.envoy.trace_id != TRACE_C
    assert c.app.attributes["app.received.b3"] == B3_C
    # our request span: the client's b3 trace, under the client's span
    assert (c.server.trace_id, c.server.parent_span_id) == (TRACE_C, PARENT_C)
    assert c.server.attributes["otel_envoy.trace_context"] == "b3"
    _assert_app_under_envoy(c)  # our upstream request span: in Envoy's trace, beside the app's span
    # the two halves link to each other
    assert (c.client.trace_id, c.client.span_id, {LINK: "upstream_request"}) in c.server.links
    assert (TRACE_C, c.server.span_id, {LINK: "downstream_request"}) in c.client.links
    _assert_linked_to_connection(c, exchange.conn)
    assert [s.span_id for s in group_traces(exchange.spans)[TRACE_C].spans] == [c.server.span_id]


def test_the_downstream_connection_trace_links_to_every_request(exchange, app_lab):
    exchange.dump()
    conn = exchange.conn
    conn.assert_nested()
    assert conn.root.attributes["envoy.connection.requests"] == 3
    assert conn.root.attributes["envoy.listener.name"] == "plain_http"
    # no request span stayed in the connection's trace: each went to its own trace, linked from here
    assert not [s for s in conn.spans if s.name == "GET"]
    assert [(t, sid) for t, sid, attrs in conn.root.links if attrs.get(LINK) == "request"] == [
        (hop.server.trace_id, hop.server.span_id) for hop in (exchange.a, exchange.b, exchange.c)]
    assert [hop.server.trace_id for hop in (exchange.a, exchange.b, exchange.c)] == [
        TRACE_A, exchange.b.envoy.trace_id, TRACE_C]
    # the three requests were three distinct Envoy traces
    assert len({hop.envoy.trace_id for hop in (exchange.a, exchange.b, exchange.c)}) == 3

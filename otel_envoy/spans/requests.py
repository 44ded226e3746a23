"""Requests and upstream connections -> spans.

Trace shapes (a contract, like the connection spans'):

  a downstream request without trace context, in its connection's trace:
    envoy.downstream.connection
      GET                          (SERVER: first request byte read -> last response byte written)
        envoy.upstream.connection  (CLIENT: connect -> close, when this request made Envoy connect)
          tcp.connect              (SYN_SENT -> ESTABLISHED)
        GET                        (CLIENT: the request Envoy wrote upstream -> last response byte read)

  with traceparent / b3 / x-b3-* / x-request-id on the request, the same request subtree lives in *that*
  trace (parent: the span the header names) and links to the connection span, which links back. When only
  the upstream request carries trace context (Envoy's own tracer started the trace), the request subtree
  joins Envoy's trace; an upstream request span always sits under the trace context it carried. When that
  is another trace than its downstream request's (a b3 client in front of Envoy's W3C-only OpenTelemetry
  tracer, which starts a trace of its own), the two spans link to each other.

HTTP semantic conventions: span name is the method, attributes http.request.method, url.path,
http.response.status_code, http.request.body.size, http.response.body.size, network.protocol.version,
user_agent.original, http.request.header.x-request-id. SERVER spans are errors for 5xx and parse errors,
CLIENT spans for 4xx/5xx, connect failures and missing responses.
"""

from __future__ import annotations

from ..correlate.addresses import network_type
from ..correlate.records import RequestRecord, UpstreamRecord, upstream_context
from ..protocols.http import HttpExchange, HttpMessage
from ..protocols.tracecontext import TraceContext
from .connection import ConnectionSpanBuilder
from .model import (
    SPAN_FLAGS_REMOTE,
    SPAN_KIND_CLIENT,
    SPAN_KIND_INTERNAL,
    SPAN_KIND_SERVER,
    STATUS_CODE_ERROR,
    STATUS_CODE_UNSET,
    SpanRecord,
)

__all__ = ["ROUND_KEY", "RequestSpanBuilder", "upstream_placement"]

ROUND_KEY = "envoy.event_loop.round"

_LINK_CONNECTION = {"otel_envoy.link": "downstream_connection"}
_LINK_UPSTREAM = {"otel_envoy.link": "upstream_connection"}
_LINK_DOWNSTREAM_REQUEST = {"otel_envoy.link": "downstream_request"}
_LINK_UPSTREAM_REQUEST = {"otel_envoy.link": "upstream_request"}


def upstream_placement(up: UpstreamRecord) -> tuple[str, str | None]:
    """``(trace id, parent span id)`` of an upstream connection's span: under the request that caused it."""
    if up.cause.request is not None:
        trace_id, _, _ = up.cause.request.placement()
        return trace_id, up.cause.request.span_id
    if up.cause.conn is not None:  # TLS downstream: the request is encrypted, the connection is the cause
        return up.cause.conn.trace_id, up.cause.conn.span_id
    return up.trace_id, None


def _same_span(a: TraceContext, b: TraceContext | None) -> bool:
    return b is not None and a.trace_id == b.trace_id and a.parent_span_id == b.parent_span_id


def _http_attributes(req: HttpMessage, resp: HttpMessage | None) -> dict[str, object]:
    attrs: dict[str, object] = {"network.protocol.name": "http"}
    if req.method:
        attrs["http.request.method"] = req.method
    if req.path is not None:
        attrs["url.path"] = req.path
    if req.version:
        attrs["network.protocol.version"] = req.version
    ua = req.headers.get("user-agent")
    if ua:
        attrs["user_agent.original"] = ua
    rid = req.headers.get("x-request-id")
    if rid:
        attrs["http.request.header.x-request-id"] = [rid]
    if req.summary:  # one kernel record: the request line, first headers, traceparent, status and times
        attrs["otel_envoy.request_detail"] = "summary"
        if resp is not None and resp.status is not None:
            attrs["http.response.status_code"] = resp.status
        return attrs
    partial = ["records_lost"] if req.records_lost else []
    if req.capture_gap:  # not captured: part of its chunked body (its size unknown), or all of it
        partial.append("request_body_not_captured" if req.method else "request_not_captured")
    else:
        attrs["http.request.body.size"] = req.body_bytes
    if resp is not None:
        if resp.status is not None:
            attrs["http.response.status_code"] = resp.status
        if resp.capture_gap:
            partial.append("response_not_captured" if resp.status is None else "response_body_not_captured")
        else:
            attrs["http.response.body.size"] = resp.body_bytes
    if partial:
        attrs["otel_envoy.partial"] = partial[0] if len(partial) == 1 else partial
    return attrs


def _envoy_request_id(rr: RequestRecord) -> str | None:
    """The request id Envoy used for a downstream request (its access log's ``%REQ(X-REQUEST-ID)%``): what it
    put on the upstream requests the request caused (generated when the client sent none, or replaced an
    untrusted one), else the client's own ``x-request-id``; None when neither is seen."""
    for _up, up_req, _span_id in rr.upstream:
        rid = up_req.headers.get("x-request-id")
        if rid:
            return rid
    return rr.request.headers.get("x-request-id")


def _events(req: HttpMessage, resp: HttpMessage | None, offset: int, sent: bool) -> list:
    events = []
    if req.end_ns is not None:
        events.append((req.end_ns + offset, "http.request.sent" if sent else "http.request.received", {}))
    if resp is not None:
        events.append((resp.start_ns + offset, "http.response.first_byte", {}))
    return events


def _status(req: HttpMessage, resp: HttpMessage | None, client: bool) -> tuple[int, str, str | None]:
    """(status code, message, error.type)."""
    if req.error:
        return STATUS_CODE_ERROR, req.error, "malformed_request"
    if resp is None:
        if req.records_lost:  # its response may have come: the records that would say so were lost
            return STATUS_CODE_UNSET, "", None
        return STATUS_CODE_ERROR, "no response", "no_response"
    if resp.error:
        return STATUS_CODE_ERROR, resp.error, "malformed_response"
    code = resp.status or 0
    if code >= 500 or (client and code >= 400):
        return STATUS_CODE_ERROR, "", str(code)
    return STATUS_CODE_UNSET, "", None


class RequestSpanBuilder:
    """Builds request and upstream-connection spans; shares resource, scope and clock with the connection
    builder."""

    def __init__(self, base: ConnectionSpanBuilder) -> None:
        self.clock = base.clock
        self.connection_builder = base
        self._tail_for = base.tail_for  # a process's resource and the other trailing fields

    def downstream(self, rr: RequestRecord, exchange: HttpExchange) -> list[SpanRecord]:
        """The request span and the spans of the upstream requests it caused."""
        offset = self.clock.offset_ns
        conn = rr.conn
        req, resp = exchange.request, exchange.response
        trace_id, parent, source = rr.placement()
        start = req.start_ns
        end = max(start, resp.end_ns if resp is not None and resp.end_ns is not None else req.end_ns or start)
        attrs = _http_attributes(req, resp)
        attrs["url.scheme"] = "https" if conn.http.source else "http"
        attrs["client.address"] = conn.peer_address
        attrs["client.port"] = conn.peer_port
        attrs["thread.id"] = req.tid
        attrs["thread.name"] = conn.thread_name
        attrs["otel_envoy.trace_context"] = source
        if rr.kept:
            attrs["otel_envoy.kept"] = rr.kept
        if conn.http.source:  # how the request was known: "uprobe" (TLS plaintext); unset: syscall bytes
            attrs["otel_envoy.request_source"] = conn.http.source
        request_id = _envoy_request_id(rr)
        if request_id:
            attrs["envoy.request_id"] = request_id
        if conn.listener_name:
            attrs["envoy.listener.name"] = conn.listener_name
        code, message, error_type = _status(req, resp, client=False)
        if error_type:
            attrs["error.type"] = error_type
        attrs[ROUND_KEY] = req.headers_round or req.round  # last: what a request summary's span varies in
        links = [] if trace_id == conn.trace_id else [(conn.trace_id, conn.span_id, _LINK_CONNECTION)]
        spans = [SpanRecord(trace_id, rr.span_id, parent, req.method or "HTTP", SPAN_KIND_SERVER,
                            start + offset, end + offset, attrs, _events(req, resp, offset, sent=False),
                            links, code, message, *self._tail_for(conn.tgid))]
        if rr.context is not None and source == rr.context.source and rr.context.trace_state:
            spans[0].trace_state = rr.context.trace_state  # the caller's vendors' state goes on with it
        if parent is not None and source != "connection":  # a parent named by a header: another process's
            spans[0].flags = SPAN_FLAGS_REMOTE
        for up, up_req, span_id in rr.upstream:
            client = self.upstream_request(up, up_req, up_req.response, span_id,
                                           default_parent=(trace_id, rr.span_id), forwarded=rr.context)
            if client.trace_id != trace_id:  # Envoy's tracer did not continue the request's trace
                client.links.append((trace_id, rr.span_id, _LINK_DOWNSTREAM_REQUEST))
                spans[0].links.append((client.trace_id, span_id, _LINK_UPSTREAM_REQUEST))
            spans.append(client)
        return spans

    def upstream_request(self, up: UpstreamRecord, req: HttpMessage, resp: HttpMessage | None, span_id: str,
                         default_parent: tuple[str, str | None] | None = None,
                         own_trace_id: str = "", forwarded: TraceContext | None = None) -> SpanRecord:
        """A request Envoy wrote upstream: under the trace context it carried (unless that is just
        ``forwarded``, the downstream request's own, passed through by an Envoy without a tracer), else
        ``default_parent``, else its upstream connection's span (when that is a trace of its own), else a
        root in ``own_trace_id``."""
        offset = self.clock.offset_ns
        ctx = upstream_context(req)
        up_trace, _ = upstream_placement(up)
        remote_parent = ctx is not None and not _same_span(ctx, forwarded)
        if ctx is not None and remote_parent:
            trace_id = f"{ctx.trace_id:032x}"
            parent = f"{ctx.parent_span_id:016x}" if ctx.parent_span_id is not None else None
        elif default_parent is not None:
            trace_id, parent = default_parent
        elif up.cause.request is None:  # a connection of its own: the request is its child
            trace_id, parent = up_trace, up.span_id
        else:  # the connection sits in another request's trace: this one gets a trace of its own
            trace_id, parent = own_trace_id or up.trace_id, None
        start = req.start_ns
        end = max(start, resp.end_ns if resp is not None and resp.end_ns is not None else req.end_ns or start)
        attrs = _http_attributes(req, resp)
        attrs["server.address"] = up.peer_address
        attrs["server.port"] = up.peer_port
        attrs["network.peer.address"] = up.peer_address
        attrs["network.peer.port"] = up.peer_port
        attrs["thread.id"] = req.tid
        attrs["envoy.event_loop.round"] = req.headers_round or req.round
        code, message, error_type = _status(req, resp, client=True)
        if error_type:
            attrs["error.type"] = error_type
        links = [] if parent == up.span_id else [(up_trace, up.span_id, _LINK_UPSTREAM)]
        span = SpanRecord(trace_id, span_id, parent, req.method or "HTTP", SPAN_KIND_CLIENT, start + offset,
                          end + offset, attrs, _events(req, resp, offset, sent=True), links, code, message,
                          *self._tail_for(up.tgid))
        if remote_parent and parent is not None:  # Envoy's tracer's span, named by the header it sent
            span.flags = SPAN_FLAGS_REMOTE
        return span

    def unpaired_upstream_request(self, up: UpstreamRecord, exchange: HttpExchange,
                                  ids: tuple[str, str, str | None, str]) -> list[SpanRecord]:
        """An upstream request no downstream request could be found for. ``ids``: its trace and span id,
        the parent (a TLS downstream connection whose read caused it: the request itself is encrypted
        there), or None (then a trace of its own), and how that connection was found."""
        trace_id, span_id, parent, how = ids
        if parent is not None:
            span = self.upstream_request(up, exchange.request, exchange.response, span_id,
                                         default_parent=(trace_id, parent))
            span.attributes["otel_envoy.attribution"] = how
        else:
            span = self.upstream_request(up, exchange.request, exchange.response, span_id,
                                         own_trace_id=trace_id)
            span.attributes["otel_envoy.partial"] = ["downstream_request_not_found"]
        return [span]

    def upstream_connection(self, up: UpstreamRecord) -> list[SpanRecord]:
        """envoy.upstream.connection (connect -> close) and its tcp.connect child."""
        offset = self.clock.offset_ns
        trace_id, parent = upstream_placement(up)
        start = min(up.connect.ns, up.connect.syn_sent_ns or up.connect.ns)
        end = max(up.end_ns, start)
        attrs: dict[str, object] = {
            "network.transport": "tcp",
            "network.type": network_type(up.peer_address),
            "network.peer.address": up.peer_address,
            "network.peer.port": up.peer_port,
            "server.address": up.peer_address,
            "server.port": up.peer_port,
            "process.pid": up.tgid,
            "thread.id": up.tid,
            "thread.name": up.thread_name,
            "envoy.connection.fd": up.fd,
            "envoy.connection.bytes_received": up.traffic.bytes_received,
            "envoy.connection.bytes_sent": up.traffic.bytes_sent,
            "envoy.upstream.requests": up.http.requests,
        }
        if up.local_address:
            attrs["network.local.address"] = up.local_address
            attrs["network.local.port"] = up.local_port
        if up.end_reason:
            attrs["envoy.connection.end_reason"] = up.end_reason
        if up.still_open:
            attrs["envoy.connection.still_open"] = True
        else:
            initiator = up.close_initiator()
            if initiator:
                attrs["envoy.connection.close_initiator"] = initiator
        code, message = STATUS_CODE_UNSET, ""
        resets = [m for m in up.tcp.marks if m.name == "tcp.reset_received"]
        if up.connect.failed_ns is not None and up.tcp.established_ns is None:
            code, message = STATUS_CODE_ERROR, "connect failed"
            attrs["error.type"] = "connect_failed"
        elif resets and up.tcp.peer_fin_ns is None and up.tcp.envoy_fin_ns is None:
            code, message = STATUS_CODE_ERROR, "connection reset by peer"
        events = [(m.ts_ns + offset, m.name, {"tcp.state": m.state} if m.state else {}) for m in up.tcp.marks]
        tail = self._tail_for(up.tgid)
        spans = [SpanRecord(trace_id, up.span_id, parent, "envoy.upstream.connection", SPAN_KIND_CLIENT,
                            start + offset, end + offset, attrs, events, [], code, message, *tail)]
        if up.connect.syn_sent_ns is not None:
            done = up.tcp.established_ns if up.tcp.established_ns is not None else up.connect.failed_ns
            connect_code = STATUS_CODE_UNSET if up.tcp.established_ns is not None else STATUS_CODE_ERROR
            spans.append(SpanRecord(
                trace_id, up.connect.span_id, up.span_id,
                "tcp.connect", SPAN_KIND_INTERNAL, up.connect.syn_sent_ns + offset,
                max(done if done is not None else end, up.connect.syn_sent_ns) + offset, {}, [], [],
                connect_code, "" if connect_code == STATUS_CODE_UNSET else "no SYN-ACK before close",
                *tail))
        return spans

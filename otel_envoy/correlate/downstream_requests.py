"""Requests on downstream connections: RequestRecords from a connection's HTTP parser, out when they end.

Each request whose header block was read becomes a RequestRecord at once (the attribution needs it to pair
the upstream request Envoy writes for it); it leaves through ``on_request`` when its response ended, or
when its connection did.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

from ..events.layout import load_layout
from ..events.types import DataEvent, RequestKeptEvent
from ..protocols.http import HttpExchange, HttpMessage
from ..protocols.http1 import Http1Exchanges
from ..protocols.http2 import Http2Exchanges
from ..protocols.request_head import RequestHead, parse_request_head, trace_context_headers
from ..protocols.tracecontext import trace_context
from .attribution import UpstreamAttribution
from .http_feed import feed_http
from .identity import IdSource
from .records import MAX_REQUEST_LINKS, ConnectionRecord, RequestRecord

__all__ = ["DownstreamRequests", "OnRequest"]

OnRequest = Callable[[RequestRecord, HttpExchange], None]

#: enum keep_reason (events.h) -> otel_envoy.kept
KEEP_REASONS = {value: name.removeprefix("KEEP_").lower().replace("closed", "closed_before_response")
                for name, value in load_layout().enums["keep_reason"].items()}
#: Distinct request heads (the kernel's first 128 bytes) whose parse is remembered: clients repeat theirs
#: (the same request line, Host and User-Agent), and httptools takes ~3.4 us per head (docs/overhead.md).
PARSED_HEADS_MAX = 4096


class DownstreamRequests:
    """Feeds downstream connections' parsers and turns what they parse into RequestRecords."""

    def __init__(self, attribution: UpstreamAttribution, ids: IdSource, stats: Counter[str],
                 on_request: OnRequest | None) -> None:
        self.attribution = attribution
        self._new_span_id = ids.span_id
        self.stats = stats
        self.on_request = on_request
        self._parsed_heads: dict[bytes, RequestHead] = {}  # shared results: never changed after the parse

    def on_data(self, conn: ConnectionRecord, ev: DataEvent) -> None:
        """A read or write of ``conn``, which has a parser (``conn.http.parser``)."""
        http = conn.http
        parser = http.parser
        assert parser is not None
        feed_http(parser, ev)
        if parser.upgraded and isinstance(parser, Http1Exchanges) and parser.h2c_request is not None:
            h2 = Http2Exchanges.from_upgrade(parser)  # 101 to h2c: the rest of the connection is HTTP/2
            if h2 is not None:
                http.parser = parser = h2
                self.stats["h2c_upgrades"] += 1
        for msg in parser.take_new_requests():
            rr = RequestRecord(conn, msg, self._new_span_id(), trace_context(msg.headers),
                               active_round=msg.headers_round)
            http.pending[id(msg)] = rr
            http.count += 1
            self.attribution.note_request(rr, ev.tid)
        if parser.completed:
            for exchange in parser.take_completed():
                self._request_done(conn, exchange)
            if isinstance(parser, Http1Exchanges):
                # HTTP/1 pipelining: Envoy starts on the next buffered request only after this response
                for rr in http.pending.values():
                    rr.active_round = max(rr.active_round, ev.round)

    def on_kept(self, conn: ConnectionRecord, ev: RequestKeptEvent) -> None:
        """A request of ``conn`` the kernel reported as one record: sampled (a request summary), or not
        sampled but kept. A request span from its first bytes, traceparent, status and times, with the
        upstream request it caused when that one waited for it (request summaries); a kept one says why it
        was kept."""
        head = self._head_of(bytes(ev.head[:max(0, min(ev.head_len, len(ev.head)))]))
        headers = head.headers
        if ev.context_len and ("traceparent" not in headers or "tracestate" not in headers):  # past the head
            found = trace_context_headers(bytes(ev.context[:ev.context_len]))
            if found:
                headers = {**found, **headers}
        summary = bool(ev.sampled)
        request = HttpMessage(start_ns=ev.start_ns, end_ns=ev.start_ns, method=head.method or None,
                              path=head.path, version=head.version, headers=headers, tid=ev.tid,
                              round=ev.round, headers_round=ev.round, summary=summary,
                              error=None if head.complete or summary else "headers_not_captured")
        response = None
        if ev.status:
            response = HttpMessage(start_ns=ev.ts_ns, end_ns=ev.ts_ns, status=ev.status, version=head.version,
                                   tid=ev.tid, round=ev.round, summary=summary)
            request.response = response
        rr = RequestRecord(conn, request, self._new_span_id(), trace_context(headers),
                           kept="" if summary else KEEP_REASONS.get(ev.reason, str(ev.reason)))
        conn.http.count += 1
        self.stats["request_summaries" if summary else f"kept_{rr.kept}"] += 1
        self.attribution.summary_reported(rr, ev.tid, ev.start_ns, ev.ts_ns)  # its upstream request
        trace_id, _, _ = rr.placement()
        if trace_id != conn.trace_id and len(conn.http.links) < MAX_REQUEST_LINKS:
            conn.http.links.append((trace_id, rr.span_id))
        if self.on_request is not None:
            self.on_request(rr, HttpExchange(request, response))

    def _head_of(self, data: bytes) -> RequestHead:
        """The parse of a request's first bytes, remembered for up to PARSED_HEADS_MAX distinct ones."""
        head = self._parsed_heads.get(data)
        if head is None:
            if len(self._parsed_heads) >= PARSED_HEADS_MAX:
                self._parsed_heads.clear()
            head = self._parsed_heads[data] = parse_request_head(data)
        return head

    def ended(self, conn: ConnectionRecord, exchanges: list[HttpExchange]) -> None:
        """Exchanges of ``conn`` its parser ended early (records were lost): they become request spans."""
        for exchange in exchanges:
            self._request_done(conn, exchange)

    def end(self, conn: ConnectionRecord, ts_ns: int) -> None:
        """The connection ended: what is still in flight becomes request spans now."""
        http = conn.http
        if http.parser is not None:
            for exchange in http.parser.finish(ts_ns):
                self._request_done(conn, exchange)
        http.pending.clear()

    def _request_done(self, conn: ConnectionRecord, exchange: HttpExchange) -> None:
        msg = exchange.request
        http = conn.http
        rr = http.pending.pop(id(msg), None)
        if rr is None:  # never reached a complete header block (malformed): a record of its own
            rr = RequestRecord(conn, msg, self._new_span_id(), trace_context(msg.headers))
            http.count += 1
        self.attribution.request_done(rr)
        trace_id, _, _ = rr.placement()
        if trace_id != conn.trace_id and len(http.links) < MAX_REQUEST_LINKS:
            http.links.append((trace_id, rr.span_id))
        if self.on_request is not None:
            self.on_request(rr, exchange)

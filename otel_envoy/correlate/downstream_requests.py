"""Requests on downstream connections: RequestRecords from a connection's HTTP parser, out when they end.

Each request whose header block was read becomes a RequestRecord at once (the attribution needs it to pair
the upstream request Envoy writes for it); it leaves through ``on_request`` when its response ended, or
when its connection did.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import NamedTuple

from ..events.layout import load_layout
from ..events.types import DataEvent, RequestKeptEvent
from ..protocols.http import HttpExchange, HttpMessage
from ..protocols.http1 import Http1Exchanges
from ..protocols.http2 import Http2Exchanges
from ..protocols.request_head import RequestHead, parse_request_head, trace_context_headers
from ..protocols.tracecontext import TraceContext, trace_context
from .attribution import UpstreamAttribution
from .http_feed import feed_http
from .identity import IdSource
from .records import MAX_REQUEST_LINKS, ConnectionRecord, RequestRecord

__all__ = ["DownstreamRequests", "KeptHead", "OnRequest", "OnSummary"]

OnRequest = Callable[[RequestRecord, HttpExchange], None]


class KeptHead(NamedTuple):
    """The first bytes of a request reported as one record, parsed (remembered: never changed)."""

    head: RequestHead
    context: TraceContext | None  # from the head's headers
    context_beyond: bool  # the kernel's context bytes may add a traceparent or tracestate the head lacks


#: A request summary no upstream request waits for: (connection, head, span id, record).
OnSummary = Callable[[ConnectionRecord, KeptHead, str, RequestKeptEvent], None]

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
        self._parsed_heads: dict[bytes, KeptHead] = {}  # shared results: never changed after the parse
        self.on_summary: OnSummary | None = None
        self._parked_by_thread = attribution.parked.by_thread
        self._random_bits = ids.random_bits
        self.summaries_uncounted = 0

    def count_summaries(self) -> None:
        """Add the summaries on_summary took since the last call to ``stats["request_summaries"]`` (a plain
        int per request instead of a Counter update; called at every expiry pass and at the end)."""
        if self.summaries_uncounted:
            self.stats["request_summaries"] += self.summaries_uncounted
            self.summaries_uncounted = 0

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
        was kept. A summary no upstream request waits for goes to ``on_summary`` when that is set."""
        data = ev.head[:ev.head_len]
        head = self._parsed_heads.get(data) or self._parse_head(data)
        span_id = f"{self._random_bits(64) or 1:016x}"  # IdSource.span_id, without a call per request
        http = conn.http
        if (ev.sampled and self.on_summary is not None and not (ev.context_len and head.context_beyond)
                and not self._parked_by_thread.get(ev.tid)):  # no upstream request waits on its thread
            http.count += 1
            self.summaries_uncounted += 1  # into stats["request_summaries"] at count_summaries()
            ctx = head.context
            if ctx is not None and len(http.links) < MAX_REQUEST_LINKS:
                trace_id = f"{ctx.trace_id:032x}"
                if trace_id != conn.trace_id:
                    http.links.append((trace_id, span_id))
            self.on_summary(conn, head, span_id, ev)
            return
        rr, exchange = self.kept_exchange(conn, ev, head, span_id)
        http.count += 1
        self.stats["request_summaries" if rr.request.summary else f"kept_{rr.kept}"] += 1
        self.attribution.summary_reported(rr, ev.tid, ev.start_ns, ev.ts_ns)  # its upstream request
        trace_id, _, _ = rr.placement()
        if trace_id != conn.trace_id and len(http.links) < MAX_REQUEST_LINKS:
            http.links.append((trace_id, rr.span_id))
        if self.on_request is not None:
            self.on_request(rr, exchange)

    @staticmethod
    def kept_exchange(conn: ConnectionRecord, ev: RequestKeptEvent, head: KeptHead, span_id: str
                      ) -> tuple[RequestRecord, HttpExchange]:
        """The request record and exchange of a request reported as one record (nothing is counted)."""
        headers = head.head.headers
        context = head.context
        if ev.context_len and head.context_beyond:  # its traceparent or tracestate came past the head
            found = trace_context_headers(bytes(ev.context[:ev.context_len]))
            if found:
                headers = {**found, **headers}
                context = trace_context(headers)
        summary = bool(ev.sampled)
        request = HttpMessage(start_ns=ev.start_ns, end_ns=ev.start_ns, method=head.head.method or None,
                              path=head.head.path, version=head.head.version, headers=headers, tid=ev.tid,
                              round=ev.round, headers_round=ev.round, summary=summary,
                              error=None if head.head.complete or summary else "headers_not_captured")
        response = None
        if ev.status:
            response = HttpMessage(start_ns=ev.ts_ns, end_ns=ev.ts_ns, status=ev.status,
                                   version=head.head.version, tid=ev.tid, round=ev.round, summary=summary)
            request.response = response
        rr = RequestRecord(conn, request, span_id, context,
                           kept="" if summary else KEEP_REASONS.get(ev.reason, str(ev.reason)))
        return rr, HttpExchange(request, response)

    def _parse_head(self, data: bytes) -> KeptHead:
        """Parse a request's first bytes, and remember the parse (up to PARSED_HEADS_MAX distinct ones)."""
        if len(self._parsed_heads) >= PARSED_HEADS_MAX:
            self._parsed_heads.clear()
        parsed = parse_request_head(data)
        head = self._parsed_heads[data] = KeptHead(
            parsed, trace_context(parsed.headers),
            "traceparent" not in parsed.headers or "tracestate" not in parsed.headers)
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

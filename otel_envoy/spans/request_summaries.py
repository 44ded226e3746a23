"""Request summaries -> request spans, from what a connection's earlier summaries' spans share.

A keep-alive client repeats itself: the same request line and headers, the same status, on the same Envoy
thread. Their spans differ only in ids, times and the event-loop round. The first summary of each (head,
status, thread, listener name) on a connection is built by :meth:`RequestSpanBuilder.downstream` like any
request; what its span shares with the next ones (every attribute but the round, name, trace placement,
links, status, flags) is kept on the connection as a :class:`SummaryShape`, and the next ones are built from
it: one SpanRecord naming the shape's :class:`SpanTemplate`, whose shared part the encoders write once.

Only summaries no upstream request waited for come here (DownstreamRequests.on_summary): their span is the
request's only one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..correlate.downstream_requests import KeptHead
from ..correlate.records import ConnectionRecord, RequestRecord
from ..events.types import RequestKeptEvent
from ..protocols.http import HttpExchange
from .model import SPAN_KIND_SERVER, AttributeBlock, LinkRecord, SpanRecord, SpanTemplate
from .requests import ROUND_KEY, RequestSpanBuilder

__all__ = ["SHAPES_MAX", "SummaryShape", "SummarySpans"]

#: Shapes remembered per connection (cleared when full): one per distinct request and answer it sees.
SHAPES_MAX = 64

#: Makes the request record and exchange of a summary (DownstreamRequests.kept_exchange).
MakeExchange = Callable[[ConnectionRecord, RequestKeptEvent, KeptHead, str],
                        tuple[RequestRecord, HttpExchange]]

_NO_ATTRIBUTES: dict = {}  # the events' (read-only: shared)


@dataclass(slots=True)
class SummaryShape:
    """What the spans of a connection's summaries with the same head, status and thread share."""

    head: KeptHead  # its id is in the shape's key: held, so that id is not reused
    template: SpanTemplate  # its attributes but the round, as an AttributeBlock
    name: str
    trace_id: str
    parent: str | None
    links: tuple[LinkRecord, ...]
    status_code: int
    status_message: str
    trace_state: str
    flags: int
    answered: bool  # a status was read: the span has the response's first-byte event


class SummarySpans:
    """Builds request summaries' spans, from shapes after the first of each kind."""

    def __init__(self, builder: RequestSpanBuilder, make_exchange: MakeExchange) -> None:
        self.builder = builder
        self.clock = builder.clock
        base = builder.connection_builder
        # ConnectionSpanBuilder.tail_for, read inline per span: a process's resource and scope
        self._tails, self._span_tail = base.tails, base.span_tail
        self._make_exchange = make_exchange

    def spans(self, conn: ConnectionRecord, head: KeptHead, span_id: str, ev: RequestKeptEvent
              ) -> list[SpanRecord]:
        """The span of one request summary (no upstream request waited for it)."""
        key = (id(head), ev.status, ev.tid, conn.listener_name)
        shapes = conn.http.summary_shapes
        shape = shapes.get(key)
        if shape is None:
            return self._first(conn, head, span_id, ev, key)
        offset = self.clock.offset_ns
        start = ev.start_ns + offset
        if shape.answered:
            answered = ev.ts_ns + offset
            end = answered if answered > start else start
            events = [(start, "http.request.received", _NO_ATTRIBUTES),
                      (answered, "http.response.first_byte", _NO_ATTRIBUTES)]
        else:
            end = start
            events = [(start, "http.request.received", _NO_ATTRIBUTES)]
        template = shape.template
        attrs = template.block.items.copy()
        attrs[ROUND_KEY] = ev.round  # the one key after the block's
        resource, scope_name, scope_version, _, _, schema_url = self._tails.get(conn.tgid) or self._span_tail
        return [SpanRecord(shape.trace_id, span_id, shape.parent, shape.name, SPAN_KIND_SERVER, start, end,
                           attrs, events, list(shape.links) if shape.links else [], shape.status_code,
                           shape.status_message,
                           resource, scope_name, scope_version, shape.trace_state, shape.flags, schema_url,
                           template)]

    def _first(self, conn: ConnectionRecord, head: KeptHead, span_id: str, ev: RequestKeptEvent,
               key: tuple) -> list[SpanRecord]:
        rr, exchange = self._make_exchange(conn, ev, head, span_id)
        spans = self.builder.downstream(rr, exchange)
        span = spans[0]
        attrs = dict(span.attributes)
        if len(spans) == 1 and next(reversed(attrs)) == ROUND_KEY:
            del attrs[ROUND_KEY]
            shapes = conn.http.summary_shapes
            if len(shapes) >= SHAPES_MAX:
                shapes.clear()
            shapes[key] = SummaryShape(
                head, SpanTemplate(AttributeBlock(attrs), ROUND_KEY), span.name, span.trace_id,
                span.parent_span_id, tuple(span.links), span.status_code, span.status_message,
                span.trace_state, span.flags, exchange.response is not None)
        return spans

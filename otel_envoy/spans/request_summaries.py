"""Request summaries -> request spans, from what a connection's earlier summaries' spans share.

A keep-alive client repeats itself: the same request line and headers, the same status, on the same Envoy
thread. Their spans differ only in ids, times and the event-loop round. The first summary of each (head,
status, thread, listener name) on a connection is built by :meth:`RequestSpanBuilder.downstream` like any
request; what its span shares with the next ones (every attribute but the round, name, trace placement,
links, status, flags) is kept on the connection as a :class:`SummaryShape`, and the next ones are built from
it: one :class:`TemplatedSpan` naming the shape's :class:`SpanTemplate`, whose shared part the encoders
write once.

Only summaries no upstream request waited for come here (DownstreamRequests.on_summary): their span is the
request's only one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from ..correlate.downstream_requests import KeptHead
from ..correlate.records import ConnectionRecord, RequestRecord
from ..events.types import RequestKeptEvent
from ..protocols.http import HttpExchange
from .model import AttributeBlock, SpanRecord, SpanTemplate, TemplatedSpan
from .requests import ROUND_KEY, RequestSpanBuilder

__all__ = ["SHAPES_MAX", "SummaryShape", "SummarySpans"]

#: Shapes remembered per connection (cleared when full): one per distinct request and answer it sees.
SHAPES_MAX = 64

#: Makes the request record and exchange of a summary (DownstreamRequests.kept_exchange).
MakeExchange = Callable[[ConnectionRecord, RequestKeptEvent, KeptHead, str],
                        tuple[RequestRecord, HttpExchange]]
#: The events of a summary's span, without and with an answer (what the shape's spans are given times for).
_EVENTS = {False: ["http.request.received"], True: ["http.request.received", "http.response.first_byte"]}


@dataclass(slots=True)
class SummaryShape:
    """What the spans of a connection's summaries with the same head, status and thread share."""

    head: KeptHead  # its id is in the shape's key: held, so that id is not reused
    template: SpanTemplate  # everything but the round and the times
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
              ) -> list[SpanRecord | TemplatedSpan]:
        """The span of one request summary (no upstream request waited for it)."""
        key = (id(head), ev.status, ev.tid, conn.listener_name)
        shape = conn.http.summary_shapes.get(key)
        if shape is None:
            return self._first(conn, head, span_id, ev, key)
        offset = self.clock.offset_ns
        start = ev.start_ns + offset
        if shape.answered:  # events: the request received at its start, the answer's first byte
            answered = ev.ts_ns + offset
            end = answered if answered > start else start
            times: tuple[int, ...] = (start, answered)
        else:
            end = start
            times = (start,)
        resource, scope_name, scope_version, _, _, schema_url = self._tails.get(conn.tgid) or self._span_tail
        return [TemplatedSpan(shape.template, span_id, start, end, ev.round, times, resource, scope_name,
                              scope_version, schema_url)]

    def _first(self, conn: ConnectionRecord, head: KeptHead, span_id: str, ev: RequestKeptEvent,
               key: tuple) -> list[SpanRecord | TemplatedSpan]:
        rr, exchange = self._make_exchange(conn, ev, head, span_id)
        spans = self.builder.downstream(rr, exchange)
        span = spans[0]
        attrs = dict(span.attributes)
        answered = exchange.response is not None
        if (len(spans) == 1 and next(reversed(attrs)) == ROUND_KEY
                and [name for _t, name, _a in span.events] == _EVENTS[answered]
                and not any(a for _t, _n, a in span.events)):
            prototype = replace(span, attributes=dict(attrs), events=list(span.events),
                                links=list(span.links))
            del attrs[ROUND_KEY]
            shapes = conn.http.summary_shapes
            if len(shapes) >= SHAPES_MAX:
                shapes.clear()
            template = SpanTemplate(AttributeBlock(attrs), ROUND_KEY, prototype)
            shapes[key] = SummaryShape(head, template, answered)
        return spans

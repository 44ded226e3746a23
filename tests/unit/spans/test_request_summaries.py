"""Request summaries' spans built from what a connection's earlier ones share (spans/request_summaries.py)
are the spans the longer way (RequestSpanBuilder.downstream) builds, and encode to the same OTLP."""

from __future__ import annotations

import dataclasses

from opentelemetry.sdk.resources import Resource

from otel_envoy.event_pipeline import EventPipeline
from otel_envoy.events.types import RequestKeptEvent
from otel_envoy.export.otlp_json import encode_request_json
from otel_envoy.export.otlp_proto import encode_request_proto
from otel_envoy.export.sinks import span_ids_valid
from otel_envoy.export.span_queue import SpanPipeline
from otel_envoy.spans.clock import MonotonicClock
from otel_envoy.spans.model import AttributeBlock, SpanRecord, SpanTemplate, TemplatedSpan
from tests.support.events import TGID, TID, C, accept, established
from tests.support.replay import CollectingSink

FD, PORT = 30, 40000
PARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def _summary(ts: int, head: bytes, status: int = 200, tid: int = TID, round_: int = 1) -> RequestKeptEvent:
    return RequestKeptEvent(ts, C["EV_REQUEST_KEPT"], TGID, tid, round_, ts - 500, FD, 10, status, 1, 0,
                            len(head), head.ljust(128, b"\0"), 1, 0, b"\0" * 64)


PLAIN = b"GET /a%20%d HTTP/1.1\r\nHost: x\r\nUser-Agent: h2load %s\r\n\r\n"  # '%': text, not a format
TRACED = b"GET /b HTTP/1.1\r\ntraceparent: " + PARENT.encode() + b"\r\n\r\n"
STORY = [_summary(10_000, PLAIN, round_=2), _summary(20_000, PLAIN, round_=3),
         _summary(30_000, PLAIN, round_=4),
         _summary(40_000, PLAIN, 503, round_=5), _summary(50_000, PLAIN, 503, round_=6),
         _summary(60_000, TRACED, round_=7), _summary(70_000, TRACED, round_=8),
         _summary(80_000, PLAIN, tid=TID + 1, round_=9),
         _summary(85_000, PLAIN, 0, round_=10), _summary(86_000, PLAIN, 0, round_=11)]  # no status read


def _spans(shapes: bool) -> tuple[EventPipeline, list[SpanRecord | TemplatedSpan], dict[str, str]]:
    sink = CollectingSink()
    pipeline = EventPipeline(SpanPipeline([sink]), Resource.create({"service.name": "t"}), MonotonicClock(7))
    if not shapes:  # every summary the longer way
        pipeline.correlator.downstream.requests.on_summary = None
    pipeline.on_context({"type": "listen_sockets", "sockets": [[TGID, 10, "0.0.0.0", 8080]]})
    for ev in [established(1_000, PORT), accept(2_000, FD, PORT), *STORY]:
        pipeline.correlator.handle(ev)
    pipeline.finish(90_000)
    pipeline.spans_out.shutdown(5.0)
    spans = [s for s in sink.spans if isinstance(s, SpanRecord | TemplatedSpan)]
    conn = next(s for s in spans if s.name == "envoy.downstream.connection")
    return (pipeline, [s for s in spans if "url.path" in s.attributes],
            {conn.trace_id: "conn-trace", conn.span_id: "conn-span"})


def _comparable(span: SpanRecord | TemplatedSpan, conn_ids: dict[str, str]) -> tuple:
    parent = conn_ids.get(span.parent_span_id or "", span.parent_span_id)
    links = [(conn_ids.get(t, t), conn_ids.get(s, s), a) for t, s, a in span.links]
    return (conn_ids.get(span.trace_id, span.trace_id), parent, span.name, span.start_ns, span.end_ns,
            list(span.attributes.items()), span.events, links, span.status_code, span.status_message,
            span.trace_state, span.flags, span.resource_attributes)


def test_summary_spans_are_the_longer_way_s_spans() -> None:
    fast_pipeline, fast, fast_ids = _spans(shapes=True)
    slow_pipeline, slow, slow_ids = _spans(shapes=False)
    assert len(fast) == len(slow) == len(STORY)
    assert [_comparable(s, fast_ids) for s in fast] == [_comparable(s, slow_ids) for s in slow]
    # the first of each (head, status, thread) goes the longer way; the ones after it share its template
    templated = [type(s) is TemplatedSpan for s in fast]
    assert templated == [False, True, True, False, True, False, True, False, False, True]
    assert all(type(s) is SpanRecord for s in slow)
    assert all(type(s.attributes) is dict for s in fast)  # plain dicts to every reader
    assert fast[5].trace_id == "0af7651916cd43dd8448eb211c80319c"
    assert fast[6].parent_span_id == "b7ad6b7169203331"
    assert fast_pipeline.counts["requests"] == slow_pipeline.counts["requests"] == len(STORY)
    sink = fast_pipeline.spans_out.sinks[0]
    conn_span = next(s for s in sink.spans if s.name == "envoy.downstream.connection")
    assert conn_span.attributes["envoy.connection.requests"] == len(STORY)
    assert len(conn_span.links) == 2  # the traced requests link back


def test_templated_spans_encode_as_the_same_spans_without_their_template() -> None:
    _pipeline, fast, _ids = _spans(shapes=True)
    templated = [s for s in fast if type(s) is TemplatedSpan]
    assert len(templated) == 5 and len(templated[-1].events) == 1
    for span in fast:
        plain = span.as_record() if type(span) is TemplatedSpan else span
        assert type(plain) is SpanRecord
        for _ in range(2):  # the template's text is made once, then reused
            assert encode_request_json([span]) == encode_request_json([plain])
            assert encode_request_proto([span]) == encode_request_proto([plain])
    one = templated[1]
    for changed in (  # what the template's pieces do not fit: written key by key
            _templated_like(one, varying="not an int"), _templated_like(one, varying=2**64),
            _templated_like(one, end_ns=0)):
        plain = changed.as_record()
        assert encode_request_json([changed]) == encode_request_json([plain])
        assert encode_request_proto([changed]) == encode_request_proto([plain])
    assert encode_request_json([_templated_like(one, varying="not an int")]) != encode_request_json([one])
    template = templated[0].template
    assert set(template.encoded) == {"json", "proto"}  # each made once
    assert all(pieces for pieces, _n in template.encoded.values())  # both encodings found their places


def _templated_like(span: TemplatedSpan, **changes: object) -> TemplatedSpan:
    fields = {name: getattr(span, name) for name in TemplatedSpan.__slots__}
    fields.update(changes)
    return TemplatedSpan(**fields)  # type: ignore[arg-type]


def test_templated_spans_ids_are_checked_the_shared_ones_once() -> None:
    _pipeline, fast, _ids = _spans(shapes=True)
    templated = [s for s in fast if type(s) is TemplatedSpan]
    assert all(span_ids_valid(s) for s in templated)
    assert templated[0].template.encoded["ids_valid"] is True
    assert not span_ids_valid(_templated_like(templated[0], span_id="b7ad6b71"))  # its length is checked
    bad = dataclasses.replace(templated[1].template.prototype, parent_span_id="not-hex-at-all!")
    template = SpanTemplate(AttributeBlock({}), "round", bad)
    assert not span_ids_valid(_templated_like(templated[1], template=template))
    assert template.encoded["ids_valid"] is False  # the template's verdict, kept
    assert not span_ids_valid(_templated_like(templated[2], template=template))

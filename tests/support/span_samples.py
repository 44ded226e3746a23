"""Spans described twice, as SDK spans and as records, that exercise every field the encoders write.

:func:`sample_spans` are SDK ``ReadableSpan`` objects (for the SDK's encoder, the oracle; their records come
from :func:`tests.support.sdk_oracle.records_from_sdk_spans`); :func:`sample_records` are records shaped like
the SDK's spans, so SDK spans made from them encode to the same bytes.
"""

from __future__ import annotations

import json
from typing import Any

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanContext, SpanKind, TraceFlags, TraceState
from opentelemetry.trace.status import Status, StatusCode

from otel_envoy.spans.model import SpanRecord
from tests.support.sdk_oracle import records_from_sdk_spans

__all__ = ["BATCH_TRACE", "RESOURCE", "SHARED_RESOURCE", "T0", "TRACE_A", "TRACE_B", "batch_records",
           "check_batch_records", "record", "sample_records", "sample_spans", "sdk_span"]

T0 = 1_700_000_000_123_456_789
TRACE_A = 0x0AF7651916CD43DD8448EB211C80319C
TRACE_B = 0x00000000000000000000000000000001
RESOURCE = Resource.create({"service.name": "envoy", "host.name": "node-1", "process.pid": 4242})
OTHER_RESOURCE = Resource({"service.name": "other"}, schema_url="https://opentelemetry.io/schemas/1.21.0")
SCOPE = InstrumentationScope("otel-envoy", "0.1.0")
OTHER_SCOPE = InstrumentationScope("otel-envoy.extra", "9.9", "https://example.com/schema")


def _ctx(trace_id: int, span_id: int, remote: bool = False, state: TraceState | None = None) -> SpanContext:
    return SpanContext(trace_id, span_id, remote, TraceFlags(TraceFlags.SAMPLED), state)


def sdk_span(
    name: str,
    span_id: int,
    parent: SpanContext | None,
    *,
    trace_id: int = TRACE_A,
    kind: SpanKind = SpanKind.INTERNAL,
    attributes: dict[str, Any] | None = None,
    events: list[Event] | None = None,
    links: list[Link] | None = None,
    status: Status | None = None,
    start: int = 0,
    end: int = 1000,
    resource: Resource = RESOURCE,
    scope: InstrumentationScope | None = SCOPE,
    state: TraceState | None = None,
) -> ReadableSpan:
    """A finished SDK span of trace ``trace_id`` (times relative to :data:`T0`)."""
    return ReadableSpan(
        name=name,
        context=_ctx(trace_id, span_id, state=state),
        parent=parent,
        resource=resource,
        attributes=attributes or {},
        events=events or [],
        links=links or [],
        kind=kind,
        status=status or Status(StatusCode.UNSET),
        start_time=T0 + start,
        end_time=T0 + end,
        instrumentation_scope=scope,
    )


def sample_spans() -> list[ReadableSpan]:
    """A batch exercising every field the encoder writes."""
    root_ctx = _ctx(TRACE_A, 0x1111111111111111)
    remote_parent = _ctx(TRACE_B, 0x00000000000000FF, remote=True)
    return [
        sdk_span(
            "envoy.connection",
            0x1111111111111111,
            None,
            kind=SpanKind.SERVER,
            attributes={
                "network.peer.address": "10.1.2.3",
                "network.peer.port": 51234,
                "envoy.listener.name": "ingress_https",
                "unicode": 'héllo ☃ "quoted" \\ back\nslash\t\u0001',
                "bool.true": True,
                "bool.false": False,
                "int.neg": -42,
                "int.max": 2**63 - 1,
                "int.min": -(2**63),
                "zero": 0,
                "double": 3.25,
                "double.neg": -1e-300,
                "double.big": 1.5e300,
                "arr.str": ("a", "b", ""),
                "arr.int": (1, -2, 3),
                "arr.float": (0.5, 1.0),
                "arr.bool": (True, False),
                "empty.str": "",
            },
            status=Status(StatusCode.OK),
            start=0,
            end=12_500_000,
            state=TraceState([("vendor", "value"), ("other", "x")]),
        ),
        sdk_span(
            "tls.handshake",
            0x2222222222222222,
            root_ctx,
            attributes={"tls.protocol.version": "1.3", "tls.resumed": False},
            events=[
                Event("tls.client_hello", {"size": 517, "sni": "example.com"}, timestamp=T0 + 1_600_000),
                Event("tls.server_hello", None, timestamp=T0 + 2_500_000),
            ],
            links=[
                Link(_ctx(TRACE_B, 0x3333333333333333, remote=True), {"link.reason": "follows"}),
                Link(_ctx(TRACE_B, 0x4444444444444444), None),
            ],
            status=Status(StatusCode.ERROR, "certificate expired"),
            start=1_500_000,
            end=4_200_000,
        ),
        sdk_span("client.call", 0x5555555555555555, remote_parent, kind=SpanKind.CLIENT, trace_id=TRACE_B),
        sdk_span("produce", 0x6666666666666666, None, kind=SpanKind.PRODUCER,
                 status=Status(StatusCode.ERROR)),
        sdk_span("consume", 0x7777777777777777, None, kind=SpanKind.CONSUMER, scope=OTHER_SCOPE),
        sdk_span("other.resource", 0x8888888888888888, None, resource=OTHER_RESOURCE),
        # Equal but distinct Resource / scope objects must land in the same groups as the originals.
        sdk_span(
            "equal.copies",
            0x9999999999999999,
            root_ctx,
            resource=Resource(dict(RESOURCE.attributes)),
            scope=InstrumentationScope("otel-envoy", "0.1.0"),
        ),
        sdk_span("no.scope", 0xAAAAAAAAAAAAAAAA, None, scope=None),
    ]


SHARED_RESOURCE = {"service.name": "envoy", "host.name": "node-1", "process.pid": 4242}
LONG = "x" * 200  # lengths above 127 bytes take two-byte varints
VERY_LONG = "é" * 9000  # ... and above 16383 bytes, three


def record(name: str, span_id: int, parent: int | None = None, **kw: Any) -> SpanRecord:
    """A record of trace :data:`TRACE_A` in the shared resource and otel-envoy's scope; ``kw`` overrides."""
    fields: dict[str, Any] = {
        "trace_id": f"{TRACE_A:032x}",
        "span_id": f"{span_id:016x}",
        "parent_span_id": f"{parent:016x}" if parent is not None else None,
        "name": name,
        "kind": 1,
        "start_ns": T0,
        "end_ns": T0 + 1000,
        "resource_attributes": SHARED_RESOURCE,
        "scope_name": "otel-envoy",
        "scope_version": "0.1.0",
        "flags": 0x100,
    }
    fields.update(kw)
    return SpanRecord(**fields)


def sample_records() -> list[SpanRecord]:
    """Records shaped like the SDK's spans (so SDK spans made from them encode to the same bytes)."""
    return [
        record(
            "envoy.downstream.connection",
            0x1111111111111111,
            kind=2,
            end_ns=T0 + 12_500_000,
            attributes={
                "network.peer.address": "10.1.2.3",
                "network.peer.port": 51234,
                "unicode": 'héllo ☃ "quoted" \\ back\nslash\t\u0001',
                "long": LONG,
                "very.long": VERY_LONG,
                "bool.true": True,
                "bool.false": False,
                "int.zero": 0,
                "int.127": 127,
                "int.128": 128,
                "int.16383": 16383,
                "int.16384": 16384,
                "int.2097151": 2**21 - 1,
                "int.2097152": 2**21,
                "int.max": 2**63 - 1,
                "int.neg": -42,
                "int.min": -(2**63),
                "double": 3.25,
                "double.neg": -1e-300,
                "list.str": ["TCP_NODELAY", "", LONG],
                "list.int": [1, -2, 300],
                "list.mixed": [True, 0.5, "s", [1, ["deep"]]],
                "list.empty": [],
                "bytes": b"\x00\xff",
                "kvlist": {"a": 1, "b": {"c": "d"}},
                "k" * 150: "a key longer than 127 bytes",
            },
            events=[
                (T0 + 100, "tcp.retransmit", {"tcp.state": 1}),
                (T0 + 200, "tcp.reset_received", {}),
            ],
            status_code=2,
            status_message="connection reset by peer",
            trace_state="vendor=value,other=x",
        ),
        record("tcp.accept_queue", 0x2222222222222222, 0x1111111111111111, attributes={"depth": 1}),
        record("tls.handshake", 0x3333333333333333, 0x1111111111111111, status_code=2),
        record("remote.child", 0x4444444444444444, 0x00000000000000FF, flags=0x300, status_code=1),
        record("no.times", 0x5555555555555555, start_ns=0, end_ns=0, kind=5),
        # An equal copy of the shared resource dict groups with it; other resources and scopes do not.
        record("equal.resource", 0x6666666666666666, resource_attributes=dict(SHARED_RESOURCE)),
        record(
            "other.resource",
            0x7777777777777777,
            resource_attributes={"service.name": "other"},
            resource_schema_url="https://opentelemetry.io/schemas/1.21.0",
        ),
        record("other.scope", 0x8888888888888888, scope_name="otel-envoy.extra", scope_version=""),
        record("no.scope", 0x9999999999999999, scope_name="", scope_version="", resource_attributes={}),
    ]


# --------------------------------------------------------------------------------------------- batches

BATCH_RESOURCE = Resource.create({"service.name": "otel-envoy-test"})
BATCH_T0 = 1_700_000_000_000_000_000
BATCH_TRACE = 0xABCDEF0123456789ABCDEF0123456789


def _batch_spans(n: int, trace_id: int = BATCH_TRACE, first_id: int = 1) -> list[ReadableSpan]:
    """A root span plus ``n - 1`` children, with events, links and a mix of statuses."""
    root_ctx = SpanContext(trace_id, first_id, False, TraceFlags(1))
    spans = []
    for i in range(n):
        span_id = first_id + i
        spans.append(
            ReadableSpan(
                name="envoy.connection" if i == 0 else f"child.{i}",
                context=SpanContext(trace_id, span_id, False, TraceFlags(1)),
                parent=None if i == 0 else root_ctx,
                resource=BATCH_RESOURCE,
                attributes={
                    "index": i,
                    "network.peer.address": "10.0.0.1",
                    "tls.resumed": i % 2 == 0,
                    "ratio": i / 4,
                    "names": ("a", "b"),
                },
                events=[Event("evt", {"n": i}, timestamp=BATCH_T0 + i * 1000 + 500)],
                links=[Link(SpanContext(trace_id, first_id, False, TraceFlags(1)), {"why": "x"})]
                if i
                else [],
                kind=SpanKind.SERVER if i == 0 else SpanKind.INTERNAL,
                status=Status(StatusCode.ERROR, "boom") if i == 2 else Status(StatusCode.UNSET),
                start_time=BATCH_T0 + i * 1000,
                end_time=BATCH_T0 + i * 1000 + 900,
                instrumentation_scope=SCOPE,
            )
        )
    return spans


def batch_records(n: int, trace_id: int = BATCH_TRACE, first_id: int = 1) -> list[SpanRecord]:
    """A root span plus ``n - 1`` children, with events, links and a mix of statuses; the records share
    one resource dict, as the span builder's do."""
    return records_from_sdk_spans(_batch_spans(n, trace_id, first_id))


def check_batch_records(records: list[SpanRecord], n: int) -> None:
    """``records`` are the spans of ``batch_records(n)``, intact."""
    by_name = {r.name: r for r in records}
    assert len(by_name) == n
    root = by_name["envoy.connection"]
    assert root.trace_id == f"{BATCH_TRACE:032x}"
    assert root.span_id == "0000000000000001"
    assert root.parent_span_id is None
    assert root.kind == 2
    assert root.resource_attributes["service.name"] == "otel-envoy-test"
    child = by_name["child.2"]
    assert child.parent_span_id == "0000000000000001"
    assert child.attributes == {
        "index": 2,
        "network.peer.address": "10.0.0.1",
        "tls.resumed": True,
        "ratio": 0.5,
        "names": ["a", "b"],
    }
    assert child.status_code == 2 and child.status_message == "boom"
    assert child.events == [(BATCH_T0 + 2500, "evt", {"n": 2})]
    assert child.links == [(f"{BATCH_TRACE:032x}", "0000000000000001", {"why": "x"})]
    assert child.start_ns == BATCH_T0 + 2000 and child.end_ns == BATCH_T0 + 2900


def special_values_record() -> SpanRecord:
    """A record whose attributes JSON and int64 cannot hold as they are: NaN, -inf, integers beyond 64 bits,
    None."""
    return record("special", 1, attributes={"nan": float("nan"), "inf": float("-inf"), "huge": 2**70,
                                            "neg.huge": -(2**64), "none": None})


def strict_json_loads(text: str) -> Any:
    """json.loads that fails on NaN/Infinity tokens (standard JSON has none)."""
    def reject(token: str) -> Any:
        raise AssertionError(f"non-standard JSON token {token}")

    return json.loads(text, parse_constant=reject)

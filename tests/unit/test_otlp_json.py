"""OTLP/JSON and protobuf encoders: must match the SDK's protobuf encoding, modulo OTLP/JSON's hex ids.

SDK ``ReadableSpan`` objects and :class:`SpanRecord` objects (what the span builder makes) must encode to the
same JSON text and the same protobuf bytes as the SDK's encoder gives for the same spans.
"""

from __future__ import annotations

import base64
import json
import math
from typing import Any

import pytest
from google.protobuf import json_format
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanContext, SpanKind, TraceFlags, TraceState
from opentelemetry.trace.status import Status, StatusCode

from otel_envoy.export.otlp_json import (
    decode_request_json,
    encode_request,
    encode_request_json,
    encode_value,
)
from otel_envoy.export.records import SpanRecord, encode_request_proto, records_from_proto, to_readable_spans

T0 = 1_700_000_000_123_456_789
TRACE_A = 0x0AF7651916CD43DD8448EB211C80319C
TRACE_B = 0x00000000000000000000000000000001
RESOURCE = Resource.create({"service.name": "envoy", "host.name": "node-1", "process.pid": 4242})
OTHER_RESOURCE = Resource({"service.name": "other"}, schema_url="https://opentelemetry.io/schemas/1.21.0")
SCOPE = InstrumentationScope("otel-envoy", "0.1.0")
OTHER_SCOPE = InstrumentationScope("otel-envoy.extra", "9.9", "https://example.com/schema")


def _ctx(trace_id: int, span_id: int, remote: bool = False, state: TraceState | None = None) -> SpanContext:
    return SpanContext(trace_id, span_id, remote, TraceFlags(TraceFlags.SAMPLED), state)


def _span(
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
        _span(
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
        _span(
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
        _span("client.call", 0x5555555555555555, remote_parent, kind=SpanKind.CLIENT, trace_id=TRACE_B),
        _span("produce", 0x6666666666666666, None, kind=SpanKind.PRODUCER, status=Status(StatusCode.ERROR)),
        _span("consume", 0x7777777777777777, None, kind=SpanKind.CONSUMER, scope=OTHER_SCOPE),
        _span("other.resource", 0x8888888888888888, None, resource=OTHER_RESOURCE),
        # Equal but distinct Resource / scope objects must land in the same groups as the originals.
        _span(
            "equal.copies",
            0x9999999999999999,
            root_ctx,
            resource=Resource(dict(RESOURCE.attributes)),
            scope=InstrumentationScope("otel-envoy", "0.1.0"),
        ),
        _span("no.scope", 0xAAAAAAAAAAAAAAAA, None, scope=None),
    ]


def _hex_to_b64(value: str) -> str:
    return base64.b64encode(bytes.fromhex(value)).decode("ascii")


def to_protobuf_json(obj: dict[str, Any]) -> dict[str, Any]:
    """OTLP/JSON -> protobuf JSON: ids go from hex to base64 (the documented OTLP/JSON difference)."""
    obj = json.loads(json.dumps(obj))
    for rs in obj["resourceSpans"]:
        for ss in rs["scopeSpans"]:
            for span in ss["spans"]:
                for key in ("traceId", "spanId", "parentSpanId"):
                    if key in span:
                        span[key] = _hex_to_b64(span[key])
                for link in span.get("links", []):
                    link["traceId"] = _hex_to_b64(link["traceId"])
                    link["spanId"] = _hex_to_b64(link["spanId"])
    return obj


def _parse(obj: dict[str, Any]) -> ExportTraceServiceRequest:
    return json_format.Parse(json.dumps(to_protobuf_json(obj)), ExportTraceServiceRequest())


def _assert_same(ours: ExportTraceServiceRequest, sdk: ExportTraceServiceRequest) -> None:
    if ours != sdk:  # show a readable diff
        assert json_format.MessageToDict(ours) == json_format.MessageToDict(sdk)
    assert ours == sdk
    assert ours.SerializeToString(deterministic=True) == sdk.SerializeToString(deterministic=True)


def _strict_loads(text: str) -> Any:
    def reject(token: str) -> Any:
        raise AssertionError(f"non-standard JSON token {token}")

    return json.loads(text, parse_constant=reject)


def test_json_string_matches_sdk_protobuf_encoding() -> None:
    spans = sample_spans()
    _assert_same(_parse(_strict_loads(encode_request_json(spans))), encode_spans(spans))


def test_dict_matches_sdk_protobuf_encoding() -> None:
    spans = sample_spans()
    _assert_same(_parse(encode_request(spans)), encode_spans(spans))


def test_json_string_and_dict_paths_agree() -> None:
    spans = sample_spans()
    assert _strict_loads(encode_request_json(spans)) == encode_request(spans)


def test_each_span_alone_matches_sdk() -> None:
    for span in sample_spans():
        _assert_same(_parse(_strict_loads(encode_request_json([span]))), encode_spans([span]))


def test_otlp_json_conventions() -> None:
    spans = sample_spans()
    obj = _strict_loads(encode_request_json(spans))
    resource_spans = obj["resourceSpans"]
    assert len(resource_spans) == 2  # RESOURCE (and its equal copy) + OTHER_RESOURCE
    assert resource_spans[1]["schemaUrl"] == "https://opentelemetry.io/schemas/1.21.0"
    scopes = [ss["scope"] for ss in resource_spans[0]["scopeSpans"]]
    assert scopes == [
        {"name": "otel-envoy", "version": "0.1.0"},
        {"name": "otel-envoy.extra", "version": "9.9"},
        {},
    ]
    first = resource_spans[0]["scopeSpans"][0]["spans"]
    root, tls = first[0], first[1]
    assert root["traceId"] == "0af7651916cd43dd8448eb211c80319c"
    assert root["spanId"] == "1111111111111111"
    assert "parentSpanId" not in root
    assert tls["parentSpanId"] == "1111111111111111"
    assert root["kind"] == 2 and tls["kind"] == 1
    assert root["startTimeUnixNano"] == str(T0)
    assert isinstance(root["endTimeUnixNano"], str)
    assert root["traceState"] == "vendor=value,other=x"
    attrs = {kv["key"]: kv["value"] for kv in root["attributes"]}
    assert attrs["network.peer.port"] == {"intValue": "51234"}
    assert attrs["int.min"] == {"intValue": str(-(2**63))}
    assert attrs["bool.true"] == {"boolValue": True}
    assert attrs["double"] == {"doubleValue": 3.25}
    assert attrs["arr.int"] == {
        "arrayValue": {"values": [{"intValue": "1"}, {"intValue": "-2"}, {"intValue": "3"}]}
    }
    assert root["status"] == {"code": 1}
    assert tls["status"] == {"code": 2, "message": "certificate expired"}
    assert tls["events"][0] == {
        "timeUnixNano": str(T0 + 1_600_000),
        "name": "tls.client_hello",
        "attributes": [
            {"key": "size", "value": {"intValue": "517"}},
            {"key": "sni", "value": {"stringValue": "example.com"}},
        ],
    }
    assert tls["links"][0]["traceId"] == f"{TRACE_B:032x}"
    assert tls["links"][0]["spanId"] == "3333333333333333"
    kinds = {s["name"]: s["kind"] for rs in resource_spans for ss in rs["scopeSpans"] for s in ss["spans"]}
    assert kinds["client.call"] == 3 and kinds["produce"] == 4 and kinds["consume"] == 5
    # Output is one line (JSON-lines friendly) and pure ASCII.
    text = encode_request_json(spans)
    assert "\n" not in text and text.isascii()


def test_special_values() -> None:
    assert encode_value(float("nan")) == {"doubleValue": "NaN"}
    assert encode_value(float("inf")) == {"doubleValue": "Infinity"}
    assert encode_value(float("-inf")) == {"doubleValue": "-Infinity"}
    assert encode_value(2**64) == {"stringValue": str(2**64)}  # not representable as int64
    assert encode_value(b"\x00\xff") == {"bytesValue": "AP8="}
    assert encode_value({"a": 1}) == {"kvlistValue": {"values": [{"key": "a", "value": {"intValue": "1"}}]}}
    assert encode_value(None) == {}
    assert encode_value([]) == {"arrayValue": {"values": []}}

    span = _span("special", 1, None, attributes={"nan": float("nan"), "inf": float("-inf"), "huge": 2**70})
    obj = _strict_loads(encode_request_json([span]))  # still strict JSON
    (rec,) = decode_request_json(obj)
    assert math.isnan(rec.attributes["nan"])
    assert rec.attributes["inf"] == float("-inf")
    assert rec.attributes["huge"] == str(2**70)


def test_empty_batch() -> None:
    assert encode_request([]) == {"resourceSpans": []}
    assert json.loads(encode_request_json([])) == {"resourceSpans": []}
    assert decode_request_json({"resourceSpans": []}) == []


def _normalise(records: list[SpanRecord]) -> list[SpanRecord]:
    return sorted(records, key=lambda r: (r.trace_id, r.span_id))


def test_decode_matches_records_from_proto() -> None:
    spans = sample_spans()
    from_json = decode_request_json(json.loads(encode_request_json(spans)))
    from_proto = records_from_proto(encode_spans(spans))
    assert _normalise(from_json) == _normalise(from_proto)


def test_decoded_records_are_plain_python() -> None:
    records = {r.name: r for r in decode_request_json(json.loads(encode_request_json(sample_spans())))}
    root = records["envoy.connection"]
    assert root.trace_id == "0af7651916cd43dd8448eb211c80319c"
    assert root.parent_span_id is None
    assert root.kind == 2
    assert root.start_ns == T0 and root.end_ns == T0 + 12_500_000
    assert root.duration_ns == 12_500_000
    assert root.attributes["network.peer.port"] == 51234
    assert root.attributes["arr.str"] == ["a", "b", ""]
    assert root.attributes["arr.bool"] == [True, False]
    assert root.attributes["unicode"] == 'héllo ☃ "quoted" \\ back\nslash\t\u0001'
    assert root.resource_attributes["service.name"] == "envoy"
    assert root.scope_name == "otel-envoy" and root.scope_version == "0.1.0"
    assert root.status_code == 1 and root.status_message == ""
    tls = records["tls.handshake"]
    assert tls.parent_span_id == "1111111111111111"
    assert tls.is_error and tls.status_message == "certificate expired"
    assert tls.events == [
        (T0 + 1_600_000, "tls.client_hello", {"size": 517, "sni": "example.com"}),
        (T0 + 2_500_000, "tls.server_hello", {}),
    ]
    assert tls.links == [
        (f"{TRACE_B:032x}", "3333333333333333", {"link.reason": "follows"}),
        (f"{TRACE_B:032x}", "4444444444444444", {}),
    ]
    assert records["client.call"].parent_span_id == "00000000000000ff"
    assert records["client.call"].flags == 0x300  # parent is remote


def test_decode_accepts_protobuf_json_variants() -> None:
    """Base64 ids and enum names (protobuf's canonical JSON) are accepted too."""
    canonical = json_format.MessageToDict(encode_spans(sample_spans()[:2]))
    records = decode_request_json(canonical)
    assert records[0].trace_id == "0af7651916cd43dd8448eb211c80319c"
    assert records[0].kind == 2
    assert records[1].status_code == 2


@pytest.mark.parametrize(
    "obj",
    [
        [],
        {"foo": 1},
        {"resourceSpans": {}},
        {"resourceSpans": [{"scopeSpans": [{"spans": [{"spanId": "1111111111111111"}]}]}]},
        {"resourceSpans": [{"scopeSpans": [{"spans": [{"traceId": "xyz", "spanId": "1111111111111111"}]}]}]},
        {
            "resourceSpans": [
                {"scopeSpans": [{"spans": [{"traceId": "0" * 32, "spanId": "1" * 16, "kind": "X"}]}]}
            ]
        },
        {
            "resourceSpans": [
                {"scopeSpans": [{"spans": [{"traceId": "0" * 32, "spanId": "1" * 16, "attributes": 3}]}]}
            ]
        },
    ],
)
def test_decode_rejects_malformed(obj: Any) -> None:
    with pytest.raises(ValueError):
        decode_request_json(obj)


# --------------------------------------------------------------------------------------------- records

SHARED_RESOURCE = {"service.name": "envoy", "host.name": "node-1", "process.pid": 4242}
LONG = "x" * 200  # lengths above 127 bytes take two-byte varints
VERY_LONG = "é" * 9000  # ... and above 16383 bytes, three


def _record(name: str, span_id: int, parent: int | None = None, **kw: Any) -> SpanRecord:
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
        _record(
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
        _record("tcp.accept_queue", 0x2222222222222222, 0x1111111111111111, attributes={"depth": 1}),
        _record("tls.handshake", 0x3333333333333333, 0x1111111111111111, status_code=2),
        _record("remote.child", 0x4444444444444444, 0x00000000000000FF, flags=0x300, status_code=1),
        _record("no.times", 0x5555555555555555, start_ns=0, end_ns=0, kind=5),
        # An equal copy of the shared resource dict groups with it; other resources and scopes do not.
        _record("equal.resource", 0x6666666666666666, resource_attributes=dict(SHARED_RESOURCE)),
        _record(
            "other.resource",
            0x7777777777777777,
            resource_attributes={"service.name": "other"},
            resource_schema_url="https://opentelemetry.io/schemas/1.21.0",
        ),
        _record("other.scope", 0x8888888888888888, scope_name="otel-envoy.extra", scope_version=""),
        _record("no.scope", 0x9999999999999999, scope_name="", scope_version="", resource_attributes={}),
    ]


def test_records_encode_exactly_like_the_same_sdk_spans() -> None:
    records = sample_records()
    spans = to_readable_spans(records)
    assert encode_request_json(records) == encode_request_json(spans)
    assert encode_request(records) == encode_request(spans)
    assert encode_request_proto(records) == encode_spans(spans).SerializeToString()
    assert _strict_loads(encode_request_json(records)) == encode_request(records)
    _assert_same(_parse(encode_request(records)), encode_spans(spans))
    for record, span in zip(records, spans, strict=True):
        assert encode_request_json([record]) == encode_request_json([span])
        assert encode_request_proto([record]) == encode_spans([span]).SerializeToString()


def test_records_round_trip_through_json_and_protobuf() -> None:
    records = sample_records()
    records[1].links = [
        (f"{TRACE_B:032x}", "3333333333333333", {"why": "x"}),
        (f"{TRACE_B:032x}", "44" * 8, {}),
    ]
    records[2].flags = 0  # a record without flags keeps none
    records[2].status_message = "message without an error code"
    records[3].attributes = {"nested": {"kv": [1, {"x": b"\x01"}]}}
    from_json = decode_request_json(_strict_loads(encode_request_json(records)))
    from_proto = records_from_proto(ExportTraceServiceRequest.FromString(encode_request_proto(records)))
    assert _normalise(from_json) == _normalise(records)
    assert _normalise(from_proto) == _normalise(records)


def test_record_grouping() -> None:
    obj = _strict_loads(encode_request_json(sample_records()))
    groups = [
        (rs.get("schemaUrl"), [(ss["scope"], [s["name"] for s in ss["spans"]]) for ss in rs["scopeSpans"]])
        for rs in obj["resourceSpans"]
    ]
    assert groups == [
        (
            None,
            [
                (
                    {"name": "otel-envoy", "version": "0.1.0"},
                    ["envoy.downstream.connection", "tcp.accept_queue", "tls.handshake", "remote.child",
                     "no.times", "equal.resource"],
                ),
                ({"name": "otel-envoy.extra"}, ["other.scope"]),
            ],
        ),
        ("https://opentelemetry.io/schemas/1.21.0", [({"name": "otel-envoy", "version": "0.1.0"},
                                                      ["other.resource"])]),
        (None, [({}, ["no.scope"])]),
    ]  # fmt: skip
    assert "attributes" not in obj["resourceSpans"][2]["resource"]


def test_record_special_values() -> None:
    record = _record(
        "special",
        1,
        attributes={
            "nan": float("nan"),
            "inf": float("-inf"),
            "huge": 2**70,
            "neg.huge": -(2**64),
            "none": None,
        },
    )
    obj = _strict_loads(encode_request_json([record]))  # still strict JSON
    (rec,) = decode_request_json(obj)
    (pb,) = records_from_proto(ExportTraceServiceRequest.FromString(encode_request_proto([record])))
    for decoded in (rec, pb):
        assert math.isnan(decoded.attributes["nan"])
        assert decoded.attributes["inf"] == float("-inf")
        assert decoded.attributes["huge"] == str(2**70)  # not representable as int64: a string
        assert decoded.attributes["neg.huge"] == str(-(2**64))
        assert decoded.attributes["none"] is None


def test_mixed_batches_hold_records_and_sdk_spans() -> None:
    records, spans = sample_records()[:3], sample_spans()[:3]
    names = sorted([r.name for r in records] + [s.name for s in spans])
    from_json = decode_request_json(_strict_loads(encode_request_json([spans[0], *records, *spans[1:]])))
    assert sorted(r.name for r in from_json) == names
    assert _strict_loads(encode_request_json([*records, *spans])) == encode_request([*records, *spans])
    request = ExportTraceServiceRequest.FromString(encode_request_proto([*spans, *records]))
    assert sorted(r.name for r in records_from_proto(request)) == names


def test_changed_resource_dict_is_encoded_again() -> None:
    resource = {"service.name": "a"}
    record = _record("r", 1, resource_attributes=resource)
    assert '"stringValue":"a"' in encode_request_json([record])
    assert b"\x0a\x01a" in encode_request_proto([record])
    resource["service.name"] = "b"
    (decoded,) = decode_request_json(json.loads(encode_request_json([record])))
    assert decoded.resource_attributes == {"service.name": "b"}
    (decoded,) = records_from_proto(ExportTraceServiceRequest.FromString(encode_request_proto([record])))
    assert decoded.resource_attributes == {"service.name": "b"}


def test_empty_record_batch() -> None:
    assert encode_request_json([]) == '{"resourceSpans":[]}'
    assert encode_request_proto([]) == b""


@pytest.mark.parametrize(
    "ids",
    [{"trace_id": "abcd"}, {"span_id": "0" * 15 + "x"}, {"parent_span_id": "00" * 9}],
    ids=["short_trace_id", "not_hex", "long_parent_id"],
)
def test_bad_record_ids_fail_the_protobuf_encoding(ids: dict[str, str]) -> None:
    record = _record("bad", 1, 2)
    for field, value in ids.items():
        setattr(record, field, value)
    with pytest.raises(ValueError):  # rather than a malformed request
        encode_request_proto([record])


def test_shared_tuples_are_encoded_once_and_stay_right() -> None:
    """Tuple attribute values are cached by identity (both encoders); a tuple's text is its own, the cache
    is bounded, and a tuple keeps its entry alive so its id cannot be reused for other contents."""
    from otel_envoy.export import otlp_json, records

    shared = ("TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384")
    other = ("h2", "http/1.1")
    for _ in range(2):
        assert otlp_json._tuple_json(shared) == otlp_json._array_json(list(shared))
        assert otlp_json._tuple_json(other) == otlp_json._array_json(list(other))
        assert records._pb_tuple(shared) == records._pb_array(list(shared))
        assert records._pb_tuple(other) == records._pb_array(list(other))
    calls: list[tuple] = []
    cache = records.ConstantCache(lambda t: calls.append(t) or str(t), limit=4, snapshot=None)
    counted = cache.get
    assert counted(shared) == counted(shared) == str(shared) and calls == [shared]
    assert counted(tuple(list(shared))) == str(shared) and len(calls) == 2  # equal, but another object
    for i in range(10):
        t = (f"v{i}",)
        assert counted(t) == str(t)
        assert otlp_json._tuple_json(t) == '{"arrayValue":{"values":[{"stringValue":"v' + str(i) + '"}]}}'
        assert records._pb_tuple(t) == records._pb_array([f"v{i}"])
        assert len(cache) <= 4
    span = SpanRecord("0" * 31 + "1", "0" * 15 + "1", None, "s", 1, 1, 2, {"a": shared, "b": list(other)},
                      [], [], 0, "", {}, "scope", "", "", 0, "")
    decoded = decode_request_json(json.loads(encode_request_json([span, span])))
    assert [d.attributes for d in decoded] == [{"a": list(shared), "b": list(other)}] * 2

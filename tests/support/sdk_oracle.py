"""The OpenTelemetry SDK as the oracle of otel-envoy's span encoders, and protobuf requests read back.

otel-envoy encodes its own :class:`SpanRecord` objects.  Tests check that encoding against the SDK's:
:func:`to_readable_spans` turns records into SDK ``ReadableSpan`` objects for the SDK's own OTLP encoder
(``opentelemetry.exporter.otlp.proto.common.trace_encoder.encode_spans``), whose request our encoders must
reproduce (:func:`parse_otlp_json`, :func:`assert_same_request`).  :func:`records_from_proto` flattens a
protobuf ``ExportTraceServiceRequest`` (what the test receiver gets, or what the SDK encoded) back into
records; :func:`records_from_sdk_spans` goes the other way round, SDK spans through the SDK's encoder into
records, for tests that describe their spans as SDK spans.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from typing import Any

from google.protobuf import json_format
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanContext, SpanKind, TraceFlags, TraceState
from opentelemetry.trace.status import Status, StatusCode

from otel_envoy.correlate.records import ConnectionRecord
from otel_envoy.spans.connection import SCOPE, ConnectionSpanBuilder
from otel_envoy.spans.model import (
    SPAN_FLAGS_REMOTE,
    SPAN_KIND_CLIENT,
    SPAN_KIND_CONSUMER,
    SPAN_KIND_INTERNAL,
    SPAN_KIND_PRODUCER,
    SPAN_KIND_SERVER,
    SpanRecord,
)

__all__ = [
    "assert_same_request",
    "parse_otlp_json",
    "proto_attributes",
    "readable_connection_spans",
    "records_from_proto",
    "records_from_sdk_spans",
    "to_protobuf_json",
    "to_readable_spans",
    "without_record_gaps",
]

_KINDS = {
    SPAN_KIND_INTERNAL: SpanKind.INTERNAL,
    SPAN_KIND_SERVER: SpanKind.SERVER,
    SPAN_KIND_CLIENT: SpanKind.CLIENT,
    SPAN_KIND_PRODUCER: SpanKind.PRODUCER,
    SPAN_KIND_CONSUMER: SpanKind.CONSUMER,
}


def to_readable_spans(
    records: Sequence[SpanRecord],
    resource: Resource | None = None,
    scope: InstrumentationScope | None = None,
) -> list[ReadableSpan]:
    """SDK ``ReadableSpan`` objects for records.

    ``resource`` / ``scope`` are used as given when passed (so spans share them); otherwise each
    record's resource and scope fields are turned into SDK objects (one per distinct value).
    Parents are taken as local spans of the same trace, as :data:`SPAN_FLAGS_REMOTE` says otherwise.
    """
    sampled = TraceFlags(TraceFlags.SAMPLED)
    resources: list[tuple[dict[str, Any], str, Resource]] = []
    scopes: dict[tuple[str, str], InstrumentationScope | None] = {}
    out = []
    for r in records:
        res = resource
        if res is None:
            for attrs, schema, obj in resources:
                if schema == r.resource_schema_url and attrs == r.resource_attributes:
                    res = obj
                    break
            else:
                res = Resource(r.resource_attributes, r.resource_schema_url or None)
                resources.append((r.resource_attributes, r.resource_schema_url, res))
        sc = scope
        if sc is None:
            key = (r.scope_name, r.scope_version)
            if key not in scopes:
                scopes[key] = InstrumentationScope(key[0], key[1] or None) if any(key) else None
            sc = scopes[key]
        trace_id = int(r.trace_id, 16)
        state = None
        if r.trace_state:
            state = TraceState([tuple(kv.split("=", 1)) for kv in r.trace_state.split(",")])  # type: ignore[misc]
        parent = None
        if r.parent_span_id:
            remote = (r.flags & SPAN_FLAGS_REMOTE) == SPAN_FLAGS_REMOTE
            parent = SpanContext(trace_id, int(r.parent_span_id, 16), remote, sampled)
        status = Status(StatusCode(r.status_code), r.status_message or None)
        out.append(
            ReadableSpan(
                name=r.name,
                context=SpanContext(trace_id, int(r.span_id, 16), False, sampled, state),
                parent=parent,
                resource=res,
                attributes=r.attributes,
                events=[Event(name, attrs or None, ts) for ts, name, attrs in r.events],
                links=[
                    Link(SpanContext(int(t, 16), int(s, 16), False, sampled), attrs or None)
                    for t, s, attrs in r.links
                ],
                kind=_KINDS.get(r.kind, SpanKind.INTERNAL),
                status=status,
                start_time=r.start_ns,
                end_time=r.end_ns,
                instrumentation_scope=sc,
            )
        )
    return out


def readable_connection_spans(builder: ConnectionSpanBuilder, conn: ConnectionRecord) -> list[ReadableSpan]:
    """The spans ``builder.build_records(conn)`` gives, as SDK spans sharing the builder's resource."""
    return to_readable_spans(builder.build_records(conn), builder.resource, SCOPE)


def _proto_value(value: AnyValue) -> Any:
    which = value.WhichOneof("value")
    if which is None:
        return None
    if which == "array_value":
        return [_proto_value(v) for v in value.array_value.values]
    if which == "kvlist_value":
        return proto_attributes(value.kvlist_value.values)
    return getattr(value, which)


def proto_attributes(kvs: Any) -> dict[str, Any]:
    """Repeated protobuf ``KeyValue`` messages as a dict of plain Python values."""
    return {kv.key: _proto_value(kv.value) for kv in kvs} if kvs else {}


def records_from_proto(request: ExportTraceServiceRequest) -> list[SpanRecord]:
    """Flatten a protobuf ``ExportTraceServiceRequest`` into :class:`SpanRecord` objects."""
    records: list[SpanRecord] = []
    for resource_spans in request.resource_spans:
        resource_attrs = proto_attributes(resource_spans.resource.attributes)
        for scope_spans in resource_spans.scope_spans:
            scope_name = scope_spans.scope.name
            scope_version = scope_spans.scope.version
            for span in scope_spans.spans:
                records.append(
                    SpanRecord(
                        trace_id=span.trace_id.hex(),
                        span_id=span.span_id.hex(),
                        parent_span_id=span.parent_span_id.hex() or None,
                        name=span.name,
                        kind=int(span.kind),
                        start_ns=int(span.start_time_unix_nano),
                        end_ns=int(span.end_time_unix_nano),
                        attributes=proto_attributes(span.attributes),
                        events=[
                            (int(ev.time_unix_nano), ev.name, proto_attributes(ev.attributes))
                            for ev in span.events
                        ],
                        links=[
                            (link.trace_id.hex(), link.span_id.hex(), proto_attributes(link.attributes))
                            for link in span.links
                        ],
                        status_code=int(span.status.code),
                        status_message=span.status.message,
                        resource_attributes=dict(resource_attrs),
                        scope_name=scope_name,
                        scope_version=scope_version,
                        trace_state=span.trace_state,
                        flags=int(span.flags),
                        resource_schema_url=resource_spans.schema_url,
                    )
                )
    return records


def records_from_sdk_spans(spans: Sequence[ReadableSpan]) -> list[SpanRecord]:
    """Records for SDK spans, through the SDK's own protobuf encoder; the records of one resource share
    one attributes dict, as the span builder's do."""
    records = records_from_proto(encode_spans(spans))
    shared: list[dict[str, Any]] = []
    for r in records:
        for attrs in shared:
            if attrs == r.resource_attributes:
                r.resource_attributes = attrs
                break
        else:
            shared.append(r.resource_attributes)
    return records


# --------------------------------------------------------------------------------------------- comparing


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


def parse_otlp_json(obj: dict[str, Any]) -> ExportTraceServiceRequest:
    """A parsed OTLP/JSON request as the protobuf message (protobuf's own JSON parser does the work)."""
    return json_format.Parse(json.dumps(to_protobuf_json(obj)), ExportTraceServiceRequest())


def assert_same_request(ours: ExportTraceServiceRequest, sdk: ExportTraceServiceRequest) -> None:
    """Equal messages, and equal deterministic serialisations; a readable diff when not."""
    if ours != sdk:  # show a readable diff
        assert json_format.MessageToDict(ours) == json_format.MessageToDict(sdk)
    assert ours == sdk
    assert ours.SerializeToString(deterministic=True) == sdk.SerializeToString(deterministic=True)


def without_record_gaps(request: ExportTraceServiceRequest) -> ExportTraceServiceRequest:
    """A copy of an SDK-encoded request without the fields a :class:`SpanRecord` has no room for: the
    flags of links and the schema URL of scopes (the spans otel-envoy builds use neither)."""
    out = ExportTraceServiceRequest()
    out.CopyFrom(request)
    for rs in out.resource_spans:
        for ss in rs.scope_spans:
            ss.ClearField("schema_url")
            for span in ss.spans:
                for link in span.links:
                    link.ClearField("flags")
    return out

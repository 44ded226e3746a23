"""Flat, plain-Python records of exported spans.

:class:`SpanRecord` is what the ``show`` command, the tests and the test OTLP receiver work
with: ids are lowercase hex strings, attribute values are plain Python values (arrays become
lists, key/value lists become dicts, bytes stay bytes).  Records are built either from an
OTLP/JSON request (:func:`otel_envoy.export.otlp_json.decode_request_json`) or from the
protobuf ``ExportTraceServiceRequest`` (:func:`records_from_proto`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
    from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

__all__ = [
    "SPAN_KIND_CLIENT",
    "SPAN_KIND_CONSUMER",
    "SPAN_KIND_INTERNAL",
    "SPAN_KIND_PRODUCER",
    "SPAN_KIND_SERVER",
    "SPAN_KIND_UNSPECIFIED",
    "STATUS_CODE_ERROR",
    "STATUS_CODE_OK",
    "STATUS_CODE_UNSET",
    "SpanRecord",
    "records_from_proto",
]

# OTLP proto enum values (opentelemetry/proto/trace/v1/trace.proto).
SPAN_KIND_UNSPECIFIED = 0
SPAN_KIND_INTERNAL = 1
SPAN_KIND_SERVER = 2
SPAN_KIND_CLIENT = 3
SPAN_KIND_PRODUCER = 4
SPAN_KIND_CONSUMER = 5

STATUS_CODE_UNSET = 0
STATUS_CODE_OK = 1
STATUS_CODE_ERROR = 2

EventRecord = tuple[int, str, dict[str, Any]]
LinkRecord = tuple[str, str, dict[str, Any]]


@dataclass(slots=True)
class SpanRecord:
    """One exported span, flattened.

    ``kind`` and ``status_code`` use the OTLP proto enum values (``SPAN_KIND_SERVER`` = 2,
    ``STATUS_CODE_ERROR`` = 2, ...).  ``events`` are ``(time_ns, name, attributes)`` tuples and
    ``links`` are ``(trace_id_hex, span_id_hex, attributes)`` tuples.
    """

    trace_id: str
    span_id: str
    parent_span_id: str | None
    name: str
    kind: int = SPAN_KIND_INTERNAL
    start_ns: int = 0
    end_ns: int = 0
    attributes: dict[str, Any] = field(default_factory=dict)
    events: list[EventRecord] = field(default_factory=list)
    links: list[LinkRecord] = field(default_factory=list)
    status_code: int = STATUS_CODE_UNSET
    status_message: str = ""
    resource_attributes: dict[str, Any] = field(default_factory=dict)
    scope_name: str = ""
    scope_version: str = ""
    trace_state: str = ""
    flags: int = 0

    @property
    def duration_ns(self) -> int:
        """End minus start, never negative."""
        return max(0, self.end_ns - self.start_ns)

    @property
    def is_error(self) -> bool:
        """True when the span status is ERROR."""
        return self.status_code == STATUS_CODE_ERROR


def _proto_value(value: AnyValue) -> Any:
    which = value.WhichOneof("value")
    if which is None:
        return None
    if which == "array_value":
        return [_proto_value(v) for v in value.array_value.values]
    if which == "kvlist_value":
        return _proto_attributes(value.kvlist_value.values)
    return getattr(value, which)


def _proto_attributes(kvs: Any) -> dict[str, Any]:
    return {kv.key: _proto_value(kv.value) for kv in kvs}


def _proto_attrs_of(kvs: list[KeyValue] | Any) -> dict[str, Any]:
    return _proto_attributes(kvs) if kvs else {}


def records_from_proto(request: ExportTraceServiceRequest) -> list[SpanRecord]:
    """Flatten a protobuf ``ExportTraceServiceRequest`` into :class:`SpanRecord` objects.

    Needs the ``opentelemetry-proto`` package only for the message types the caller already has.
    """
    records: list[SpanRecord] = []
    for resource_spans in request.resource_spans:
        resource_attrs = _proto_attrs_of(resource_spans.resource.attributes)
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
                        attributes=_proto_attrs_of(span.attributes),
                        events=[
                            (int(ev.time_unix_nano), ev.name, _proto_attrs_of(ev.attributes))
                            for ev in span.events
                        ],
                        links=[
                            (link.trace_id.hex(), link.span_id.hex(), _proto_attrs_of(link.attributes))
                            for link in span.links
                        ],
                        status_code=int(span.status.code),
                        status_message=span.status.message,
                        resource_attributes=dict(resource_attrs),
                        scope_name=scope_name,
                        scope_version=scope_version,
                        trace_state=span.trace_state,
                        flags=int(span.flags),
                    )
                )
    return records

"""The span model of otel-envoy: :class:`SpanRecord`, a flat, plain-Python span, :class:`TemplatedSpan`,
one made from a :class:`SpanTemplate`, and the OTLP enum values it uses.

The span builders produce records, the export sinks encode them, and the ``show`` command reads them back
from OTLP/JSON. Ids are lowercase hex strings, attribute values are plain Python values (arrays are lists
or tuples, key/value lists dicts, bytes stay bytes).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from ..shared_attributes import SharedAttributes

__all__ = [
    "SPAN_FLAGS_LOCAL",
    "SPAN_FLAGS_REMOTE",
    "SPAN_KIND_CLIENT",
    "SPAN_KIND_CONSUMER",
    "SPAN_KIND_INTERNAL",
    "SPAN_KIND_PRODUCER",
    "SPAN_KIND_SERVER",
    "SPAN_KIND_UNSPECIFIED",
    "STATUS_CODE_ERROR",
    "STATUS_CODE_OK",
    "STATUS_CODE_UNSET",
    "AttributeBlock",
    "EventRecord",
    "LinkRecord",
    "SharedAttributes",
    "SpanRecord",
    "SpanTemplate",
    "TemplatedSpan",
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

#: ``Span.flags`` (SpanFlags in trace.proto) as the SDK sets them: "is_remote is known" (0x100),
#: plus "the parent is remote" (0x200).
SPAN_FLAGS_LOCAL = 0x100
SPAN_FLAGS_REMOTE = 0x300

#: A span event: ``(time_ns, name, attributes)``.
EventRecord = tuple[int, str, dict[str, Any]]
#: A span link: ``(trace_id_hex, span_id_hex, attributes)``.
LinkRecord = tuple[str, str, dict[str, Any]]


class AttributeBlock:
    """Attributes many spans share unchanged (a connection's peer, thread and listener with a request head's
    method, path and user agent). Read-only."""

    __slots__ = ("items", "size")

    def __init__(self, items: dict[str, Any]) -> None:
        self.items = items
        self.size = len(items)


class SpanTemplate:
    """What the spans made from one template share: everything but their span id, start and end times, the
    times of their events, and the value of ``varying_key``. ``prototype`` holds all of it: a span whose
    attributes are the template's AttributeBlock's (``block``) followed by ``varying_key``. The spans are
    :class:`TemplatedSpan` objects; the encoders write the shared part from what they remembered in
    ``encoded``, and the sinks check the shared ids once (a templated span's own span id comes from the
    correlator's IdSource). Read-only."""

    __slots__ = ("block", "encoded", "prototype", "varying_key")

    def __init__(self, block: AttributeBlock, varying_key: str, prototype: SpanRecord) -> None:
        self.block = block
        self.varying_key = varying_key
        self.prototype = prototype
        self.encoded: dict[Any, Any] = {}


@dataclass(slots=True)
class SpanRecord:
    """One span, flattened.

    ``kind`` and ``status_code`` use the OTLP proto enum values (``SPAN_KIND_SERVER`` = 2,
    ``STATUS_CODE_ERROR`` = 2, ...).  ``events`` are ``(time_ns, name, attributes)`` tuples and
    ``links`` are ``(trace_id_hex, span_id_hex, attributes)`` tuples.  ``flags`` is the OTLP
    ``Span.flags`` field (``SPAN_FLAGS_LOCAL`` for spans built here).

    Records built by the span builder share one ``resource_attributes`` dict: treat it as read-only.
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
    resource_schema_url: str = ""

    @property
    def duration_ns(self) -> int:
        """End minus start, never negative."""
        return max(0, self.end_ns - self.start_ns)

    @property
    def is_error(self) -> bool:
        """True when the span status is ERROR."""
        return self.status_code == STATUS_CODE_ERROR


class TemplatedSpan:
    """One span made from a :class:`SpanTemplate`: its own span id, start and end, ``varying`` (the value of
    the template's varying key) and ``event_times`` (one per event of the prototype); the rest is the
    template prototype's. It reads like a :class:`SpanRecord` (its attributes and events are made when they
    are read: the encoders write it from the template without them) and is never changed: ``as_record``
    gives a SpanRecord to change. A request summary's span costs one of these (spans/request_summaries.py)."""

    __slots__ = ("end_ns", "event_times", "resource_attributes", "resource_schema_url", "scope_name",
                 "scope_version", "span_id", "start_ns", "template", "varying")

    def __init__(self, template: SpanTemplate, span_id: str, start_ns: int, end_ns: int, varying: Any,
                 event_times: tuple[int, ...], resource_attributes: dict[str, Any], scope_name: str,
                 scope_version: str, resource_schema_url: str) -> None:
        self.template = template
        self.span_id = span_id
        self.start_ns = start_ns
        self.end_ns = end_ns
        self.varying = varying
        self.event_times = event_times
        self.resource_attributes = resource_attributes
        self.scope_name = scope_name
        self.scope_version = scope_version
        self.resource_schema_url = resource_schema_url

    trace_id = property(lambda self: self.template.prototype.trace_id)
    parent_span_id = property(lambda self: self.template.prototype.parent_span_id)
    name = property(lambda self: self.template.prototype.name)
    kind = property(lambda self: self.template.prototype.kind)
    links = property(lambda self: list(self.template.prototype.links))
    status_code = property(lambda self: self.template.prototype.status_code)
    status_message = property(lambda self: self.template.prototype.status_message)
    trace_state = property(lambda self: self.template.prototype.trace_state)
    flags = property(lambda self: self.template.prototype.flags)
    duration_ns = SpanRecord.duration_ns
    is_error = SpanRecord.is_error

    @property
    def attributes(self) -> dict[str, Any]:
        """The template's block followed by its varying key with this span's value (a new dict)."""
        template = self.template
        return {**template.block.items, template.varying_key: self.varying}

    @property
    def events(self) -> list[EventRecord]:
        """The prototype's events at this span's times (a new list)."""
        return [(t, name, attrs) for t, (_ts, name, attrs) in
                zip(self.event_times, self.template.prototype.events, strict=True)]

    def as_record(self, **changes: Any) -> SpanRecord:
        """This span as a SpanRecord of its own (with ``changes``: SpanRecord fields)."""
        return replace(self.template.prototype, span_id=self.span_id, start_ns=self.start_ns,
                       end_ns=self.end_ns, attributes=self.attributes, events=self.events,
                       links=self.links, resource_attributes=self.resource_attributes,
                       scope_name=self.scope_name, scope_version=self.scope_version,
                       resource_schema_url=self.resource_schema_url, **changes)

    def __repr__(self) -> str:
        return f"TemplatedSpan({self.name!r}, span_id={self.span_id!r}, start_ns={self.start_ns})"

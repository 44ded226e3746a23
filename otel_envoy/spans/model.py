"""The span model of otel-envoy: :class:`SpanRecord`, a flat, plain-Python span, and the OTLP enum values
it uses.

The span builders produce records, the export sinks encode them, and the ``show`` command reads them back
from OTLP/JSON. Ids are lowercase hex strings, attribute values are plain Python values (arrays are lists
or tuples, key/value lists dicts, bytes stay bytes).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

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
    "SpanRecord",
    "SpanTemplate",
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
    times of their events, and the value of ``varying_key``. Their attributes are the template's
    AttributeBlock's (``block``) followed by ``varying_key``. Spans name it in ``SpanRecord.template``; the
    encoders then write the shared part from what they remembered in ``encoded``, and the sinks check the
    shared ids once (a templated span's own span id comes from the correlator's IdSource). A span that names a
    template is not changed afterwards (clear ``template`` first): the encoders only check that its
    attributes are one more than the block's and its events as many as the template's first span had.
    Read-only."""

    __slots__ = ("block", "encoded", "varying_key")

    def __init__(self, block: AttributeBlock, varying_key: str) -> None:
        self.block = block
        self.varying_key = varying_key
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
    template: SpanTemplate | None = None  # made from a template (spans/request_summaries.py), or None

    @property
    def duration_ns(self) -> int:
        """End minus start, never negative."""
        return max(0, self.end_ns - self.start_ns)

    @property
    def is_error(self) -> bool:
        """True when the span status is ERROR."""
        return self.status_code == STATUS_CODE_ERROR

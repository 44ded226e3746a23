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
    "LayeredAttributes",
    "LinkRecord",
    "SpanRecord",
    "SpanTemplate",
    "layered_block",
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
    method, path and user agent): built once, and encoded once per encoding (``encoded``, filled by the
    encoders). Read-only."""

    __slots__ = ("encoded", "items", "size")

    def __init__(self, items: dict[str, Any]) -> None:
        self.items = items
        self.size = len(items)
        self.encoded: dict[str, Any] = {}  # encoding name -> the block's encoding


def layered_block(attrs: LayeredAttributes) -> AttributeBlock | None:
    """The block ``attrs`` begin with, or None (detached, or never set)."""
    return getattr(attrs, "block", None)


class LayeredAttributes(dict):
    """A span's attributes that begin with an :class:`AttributeBlock`'s: a plain dict to every reader; an
    encoder writes the block's remembered encoding and encodes only the keys after it. Changing or
    removing one of the block's keys detaches the block (the dict is then encoded key by key)."""

    __slots__ = ("block",)  # set by whoever makes one (no __init__: one Python call less per span); unset
    #                         reads as no block (layered_block)

    @classmethod
    def of(cls, block: AttributeBlock, key: str, value: Any) -> LayeredAttributes:
        """The block's attributes, then ``key`` (not one of the block's)."""
        attrs = cls(block.items)
        attrs.block = block
        dict.__setitem__(attrs, key, value)
        return attrs

    def _touch(self, key: object) -> None:
        block = layered_block(self)
        if block is not None and key in block.items:
            self.block = None

    def __setitem__(self, key: str, value: Any) -> None:
        self._touch(key)
        dict.__setitem__(self, key, value)

    def __delitem__(self, key: str) -> None:
        self._touch(key)
        dict.__delitem__(self, key)

    def pop(self, key: str, *default: Any) -> Any:
        self._touch(key)
        return dict.pop(self, key, *default)

    def setdefault(self, key: str, default: Any = None) -> Any:
        self._touch(key)
        return dict.setdefault(self, key, default)

    def update(self, *args: Any, **kwargs: Any) -> None:
        self.block = None
        dict.update(self, *args, **kwargs)

    def popitem(self) -> tuple[str, Any]:
        self.block = None
        return dict.popitem(self)

    def clear(self) -> None:
        self.block = None
        dict.clear(self)

    def __ior__(self, other: Any) -> LayeredAttributes:  # type: ignore[override,misc]
        self.update(other)
        return self


class SpanTemplate:
    """What the spans made from one template share: everything but their span id, start and end times, the
    times of their events, and the value of ``varying_key``, the one attribute after the template's
    AttributeBlock (``block``). Spans name it in ``SpanRecord.template``; an encoder may then write the
    shared part from what it remembered in ``encoded`` (it checks the span still has the template's
    attributes; the sinks check the shared ids once). Read-only."""

    __slots__ = ("block", "encoded", "varying_key")

    def __init__(self, block: AttributeBlock, varying_key: str) -> None:
        self.block = block
        self.varying_key = varying_key
        self.encoded: dict[str, Any] = {}


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

"""Flat, plain-Python records of spans, and their OTLP protobuf encoding.

:class:`SpanRecord` is the one span representation of otel-envoy: the span builder produces
records (:meth:`otel_envoy.spans.connection.ConnectionSpanBuilder.build_records`), the export
sinks encode them, and the ``show`` command, the tests and the test OTLP receiver read them back.
Ids are lowercase hex strings, attribute values are plain Python values (arrays become lists,
key/value lists become dicts, bytes stay bytes).  Records are decoded either from an OTLP/JSON
request (:func:`otel_envoy.export.otlp_json.decode_request_json`) or from the protobuf
``ExportTraceServiceRequest`` (:func:`records_from_proto`), and encoded into either
(:func:`otel_envoy.export.otlp_json.encode_request_json`, :func:`encode_request_proto`).

The protobuf encoder writes the wire format directly (no message objects): it is the hot path of
the OTLP sinks, several times faster than building ``opentelemetry.proto`` messages.  Its output is
byte-identical to ``SerializeToString()`` of the request the SDK's encoder builds for the same spans.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
    from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope

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
    "ConstantCache",
    "ResourceGroup",
    "SpanRecord",
    "encode_request_proto",
    "group_records",
    "records_from_proto",
    "to_readable_spans",
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

EventRecord = tuple[int, str, dict[str, Any]]
LinkRecord = tuple[str, str, dict[str, Any]]


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


# --------------------------------------------------------------------------------------------- grouping

#: ``(resource attributes, resource schema url, [((scope name, scope version), records), ...])``
ResourceGroup = tuple[dict[str, Any], str, list[tuple[tuple[str, str], list[SpanRecord]]]]


def group_records(records: Sequence[SpanRecord]) -> list[ResourceGroup]:
    """Group records by resource (attributes and schema url), then by scope, in order of first appearance.

    Equal resources in distinct dicts land in one group.  The common case -- every record sharing one
    resource dict and one scope, as the span builder makes them -- costs one pass of identity checks.
    """
    if not records:
        return []
    first = records[0]
    attrs, schema = first.resource_attributes, first.resource_schema_url
    name, version = first.scope_name, first.scope_version
    for r in records:
        if (
            r.resource_attributes is not attrs
            or r.scope_name != name
            or r.scope_version != version
            or r.resource_schema_url != schema
        ):
            break
    else:
        return [(attrs, schema, [((name, version), list(records))])]
    groups: list[tuple[dict[str, Any], str, dict[tuple[str, str], list[SpanRecord]]]] = []
    by_id: dict[tuple[int, str], tuple[dict[str, Any], str, dict[tuple[str, str], list[SpanRecord]]]] = {}
    for r in records:
        attrs, schema = r.resource_attributes, r.resource_schema_url
        key = (id(attrs), schema)  # the records keep the dicts alive: ids are not reused meanwhile
        group = by_id.get(key)
        if group is None:
            for g in groups:
                if g[1] == schema and g[0] == attrs:
                    group = g
                    break
            else:
                group = (attrs, schema, {})
                groups.append(group)
            by_id[key] = group
        scopes = group[2]
        scope_key = (r.scope_name, r.scope_version)
        members = scopes.get(scope_key)
        if members is None:
            members = scopes[scope_key] = []
        members.append(r)
    return [(attrs, schema, list(scopes.items())) for attrs, schema, scopes in groups]


class ConstantCache:
    """Encodings of objects that many spans share, computed once per object, keyed by its identity.

    Holds a reference to each object so its id cannot be reused while cached. Dicts (resource attributes)
    are mutable: each entry keeps a shallow snapshot (``snapshot``, by default ``dict``), and a dict changed
    since is re-encoded. Immutable objects (the tuple of a client's cipher-suite names, shared by every
    connection it makes) need none: ``snapshot=None``. Bounded: cleared when ``limit`` objects are cached.
    """

    __slots__ = ("_encode", "_entries", "_limit", "_snapshot")

    def __init__(self, encode: Callable[[Any], Any], limit: int = 64,
                 snapshot: Callable[[Any], Any] | None = dict) -> None:
        """``encode(obj)`` computes the value cached for ``obj``."""
        self._encode = encode
        self._entries: dict[int, tuple[Any, Any, Any]] = {}
        self._limit = limit
        self._snapshot = snapshot

    def get(self, obj: Any) -> Any:
        """The cached encoding of ``obj`` (computed on a miss)."""
        entry = self._entries.get(id(obj))
        if entry is not None and entry[0] is obj and (entry[1] is None or entry[1] == obj):
            return entry[2]
        value = self._encode(obj)
        if len(self._entries) >= self._limit:
            self._entries.clear()
        snapshot = self._snapshot
        self._entries[id(obj)] = (obj, None if snapshot is None else snapshot(obj), value)
        return value

    def __len__(self) -> int:
        return len(self._entries)


# --------------------------------------------------------------------------------------------- protobuf

_INT64_MIN = -(1 << 63)
_INT64_MAX = (1 << 63) - 1
_UINT64_MASK = (1 << 64) - 1

_pack_fixed64 = struct.Struct("<Q").pack
_pack_fixed32 = struct.Struct("<I").pack
_pack_double = struct.Struct("<d").pack
_VARINT1 = [bytes((i,)) for i in range(128)]


def _varint(n: int) -> bytes:
    """Protobuf base-128 varint of a non-negative integer."""
    if n < 0x80:
        return _VARINT1[n]
    if n < 0x4000:
        return bytes((n & 0x7F | 0x80, n >> 7))
    if n < 0x200000:
        return bytes((n & 0x7F | 0x80, (n >> 7) & 0x7F | 0x80, n >> 14))
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _ld(tag: bytes, body: bytes) -> bytes:
    """A length-delimited field: tag, length, body."""
    n = len(body)
    return tag + (_VARINT1[n] if n < 0x80 else _varint(n)) + body


def _pb_str(tag: bytes, s: str) -> bytes:
    return _ld(tag, s.encode("utf-8", "replace"))


# Field tags (field number << 3 | wire type), as bytes.
_T1_LD = b"\x0a"  # field 1, length-delimited: request.resource_spans, ResourceSpans.resource, ...
_T2_LD = b"\x12"
_T3_LD = b"\x1a"
_T4_LD = b"\x22"
_SPAN_ATTR = b"\x4a"  # Span.attributes (9)
_SPAN_EVENT = b"\x5a"  # Span.events (11)
_SPAN_LINK = b"\x6a"  # Span.links (13)
_SPAN_STATUS = b"\x7a"  # Span.status (15)
_SPAN_FLAGS = b"\x85\x01"  # Span.flags (16, fixed32)
_SPAN_START = b"\x39"  # Span.start_time_unix_nano (7, fixed64)
_SPAN_END = b"\x41"  # Span.end_time_unix_nano (8, fixed64)
_TRACE_ID = b"\x0a\x10"  # Span.trace_id / Link.trace_id (1), 16 bytes
_SPAN_ID = b"\x12\x08"  # Span.span_id / Link.span_id (2), 8 bytes
_PARENT_ID = b"\x22\x08"  # Span.parent_span_id (4), 8 bytes
_EMPTY_STATUS = b"\x7a\x00"
_BOOL_TRUE = b"\x10\x01"  # AnyValue.bool_value (2)
_BOOL_FALSE = b"\x10\x00"

_PB_KEY: dict[str, bytes] = {}  # attribute key -> KeyValue.key field plus the KeyValue.value tag
_PB_NAME: dict[str, bytes] = {}  # span name -> the Span.name field
_PB_CACHE_MAX = 4096


def _pb_key(key: str) -> bytes:
    prefix = _pb_str(_T1_LD, key) + _T2_LD
    if len(_PB_KEY) < _PB_CACHE_MAX:
        _PB_KEY[key] = prefix
    return prefix


def _pb_name(name: str) -> bytes:
    out = _pb_str(b"\x2a", name) if name else b""
    if len(_PB_NAME) < _PB_CACHE_MAX:
        _PB_NAME[name] = out
    return out


def _pb_int(v: int) -> bytes:
    if _INT64_MIN <= v <= _INT64_MAX:
        return b"\x18" + _varint(v & _UINT64_MASK)
    return _pb_str(b"\x0a", str(v))  # not representable as int64: a string, as in OTLP/JSON


def _pb_value(v: Any) -> bytes:
    """An ``AnyValue`` body, with the type mapping of :func:`otel_envoy.export.otlp_json.encode_value`."""
    t = type(v)
    if t is str:
        return _pb_str(b"\x0a", v)
    if t is bool:
        return _BOOL_TRUE if v else _BOOL_FALSE
    if t is int:
        return _pb_int(v)
    if t is float:
        return b"\x21" + _pack_double(v)
    if t is tuple or t is list:
        return _ld(b"\x2a", b"".join([_ld(_T1_LD, _pb_value(x)) for x in v]))
    if v is None:
        return b""
    # Subclasses and other containers (slow path).
    if isinstance(v, bool):
        return _BOOL_TRUE if v else _BOOL_FALSE
    if isinstance(v, str):
        return _pb_str(b"\x0a", str(v))
    if isinstance(v, int):
        return _pb_int(int(v))
    if isinstance(v, float):
        return b"\x21" + _pack_double(float(v))
    if isinstance(v, bytes | bytearray | memoryview):
        return _ld(b"\x3a", bytes(v))
    if isinstance(v, Mapping):
        return _ld(b"\x32", _pb_attrs(_T1_LD, v))
    if isinstance(v, Sequence):
        return _ld(b"\x2a", b"".join([_ld(_T1_LD, _pb_value(x)) for x in v]))
    return _pb_str(b"\x0a", str(v))


_STR_VALUE = [b"\x0a" + _VARINT1[n] for n in range(128)]  # AnyValue.string_value tag and length
_STR_ELEMENT = [
    b"\x0a" + _VARINT1[n + 2] + b"\x0a" + _VARINT1[n] for n in range(126)
]  # ... as ArrayValue.values
_SMALL_INT_VALUE = [b"\x18" + _VARINT1[n] for n in range(128)]  # AnyValue.int_value 0..127
_PB_HEADS: dict[bytes, dict[str, list[bytes | None]]] = {}


def _pb_head(tag: bytes, key: str, m: int) -> bytes:
    """``tag``, the ``KeyValue`` length, its key field and its value tag and length, for a value of
    ``m`` (< 128) bytes: all of one attribute field but its ``AnyValue`` body.  Cached per tag and key."""
    heads = _PB_HEADS.get(tag)
    if heads is None:
        heads = _PB_HEADS[tag] = {}
    row = heads.get(key)
    if row is None:
        row = [None] * 128
        if len(heads) < _PB_CACHE_MAX:
            heads[key] = row
    prefix = _PB_KEY.get(key) or _pb_key(key)
    head = row[m] = tag + _varint(len(prefix) + 1 + m) + prefix + _VARINT1[m]
    return head


def _pb_array(values: list[Any] | tuple[Any, ...]) -> bytes:
    """An ``AnyValue`` body holding ``array_value`` for a list or tuple."""
    parts = []
    append = parts.append
    for x in values:
        if type(x) is str:
            b = x.encode("utf-8", "replace")
            n = len(b)
            if n < 0x7E:
                append(_STR_ELEMENT[n] + b)
                continue
        append(_ld(_T1_LD, _pb_value(x)))
    return _ld(b"\x2a", b"".join(parts))


_pb_tuple: Callable[[tuple[Any, ...]], bytes] = ConstantCache(_pb_array, limit=1024, snapshot=None).get


def _pb_attrs(tag: bytes, attrs: Mapping[str, Any]) -> bytes:
    """Every attribute as a ``KeyValue`` field with ``tag`` (the repeated field of the enclosing message)."""
    parts = []
    append = parts.append
    heads = _PB_HEADS.get(tag) or {}
    str_value = _STR_VALUE
    for key, v in attrs.items():
        t = type(v)
        if t is str:
            b = v.encode("utf-8", "replace")
            n = len(b)
            value = str_value[n] + b if n < 0x80 else _ld(b"\x0a", b)
        elif t is int and 0 <= v < 0x200000:
            if v < 0x80:
                value = _SMALL_INT_VALUE[v]
            elif v < 0x4000:
                value = bytes((0x18, v & 0x7F | 0x80, v >> 7))
            else:
                value = bytes((0x18, v & 0x7F | 0x80, (v >> 7) & 0x7F | 0x80, v >> 14))
        elif t is bool:
            value = _BOOL_TRUE if v else _BOOL_FALSE
        elif t is tuple:
            value = _pb_tuple(v)
        elif t is list:
            value = _pb_array(v)
        else:
            value = _pb_value(v)
        m = len(value)
        if m < 0x80:
            row = heads.get(key)
            head = row[m] if row is not None else None
            append((head or _pb_head(tag, key, m)) + value)
        else:
            append(_ld(tag, (_PB_KEY.get(key) or _pb_key(key)) + _varint(m) + value))
    return b"".join(parts)


def _pb_events(events: Sequence[EventRecord]) -> bytes:
    parts = []
    for ts, name, attrs in events:
        body = (b"\x09" + _pack_fixed64(ts) if ts else b"") + (_pb_str(_T2_LD, name) if name else b"")
        if attrs:
            body += _pb_attrs(_T3_LD, attrs)
        parts.append(_ld(_SPAN_EVENT, body))
    return b"".join(parts)


def _pb_links(links: Sequence[LinkRecord]) -> bytes:
    parts = []
    for trace_id, span_id, attrs in links:
        body = _ld(_T1_LD, bytes.fromhex(trace_id)) + _ld(_T2_LD, bytes.fromhex(span_id))
        if attrs:
            body += _pb_attrs(_T4_LD, attrs)
        parts.append(_ld(_SPAN_LINK, body))
    return b"".join(parts)


_pack_times = struct.Struct("<BQBQ").pack  # Span.start_time_unix_nano and end_time_unix_nano, with tags
_PB_KINDS = [b"\x30" + _VARINT1[k] if k else b"" for k in range(6)]  # Span.kind fields
_PB_TAIL_LOCAL = _EMPTY_STATUS + _SPAN_FLAGS + _pack_fixed32(SPAN_FLAGS_LOCAL)  # the usual end of a span


def _pb_span(r: SpanRecord) -> bytes:
    """One ``Span`` message body, fields in field-number order (as protobuf serialises them)."""
    parent, state, kind = r.parent_span_id, r.trace_state, r.kind
    trace_id, span_id = bytes.fromhex(r.trace_id), bytes.fromhex(r.span_id)
    parent_id = bytes.fromhex(parent) if parent else b""
    if len(trace_id) != 16 or len(span_id) != 8 or len(parent_id) not in (0, 8):
        raise ValueError(f"span {r.name!r} has an id of the wrong length")
    if parent_id and not state:
        out = [_TRACE_ID, trace_id, _SPAN_ID, span_id, _PARENT_ID, parent_id]
    else:
        out = [_TRACE_ID, trace_id, _SPAN_ID, span_id]
        if state:
            out.append(_pb_str(_T3_LD, state))
        if parent_id:
            out.append(_PARENT_ID)
            out.append(parent_id)
    append = out.append
    append(_PB_NAME.get(r.name) or _pb_name(r.name))
    append(_PB_KINDS[kind] if 0 <= kind < 6 else b"\x30" + _varint(kind & _UINT64_MASK))
    start, end = r.start_ns, r.end_ns
    if start and end:
        append(_pack_times(0x39, start, 0x41, end))
    else:
        if start:
            append(_SPAN_START + _pack_fixed64(start))
        if end:
            append(_SPAN_END + _pack_fixed64(end))
    if r.attributes:
        append(_pb_attrs(_SPAN_ATTR, r.attributes))
    if r.events:
        append(_pb_events(r.events))
    if r.links:
        append(_pb_links(r.links))
    code, message, flags = r.status_code, r.status_message, r.flags
    if not code and not message and flags == SPAN_FLAGS_LOCAL:
        append(_PB_TAIL_LOCAL)
        return b"".join(out)
    code_field = b"\x18" + _varint(code & _UINT64_MASK) if code else b""
    if message:
        append(_ld(_SPAN_STATUS, _pb_str(_T2_LD, message) + code_field))
    elif code:
        append(_ld(_SPAN_STATUS, code_field))
    else:
        append(_EMPTY_STATUS)
    if flags:
        append(_SPAN_FLAGS + _pack_fixed32(flags))
    return b"".join(out)


def _pb_resource(attrs: dict[str, Any]) -> bytes:
    return _ld(_T1_LD, _pb_attrs(_T1_LD, attrs))


_PB_RESOURCES = ConstantCache(_pb_resource)
_PB_SCOPES: dict[tuple[str, str], bytes] = {}


def _pb_scope(name: str, version: str) -> bytes:
    key = (name, version)
    out = _PB_SCOPES.get(key)
    if out is None:
        body = (_pb_str(_T1_LD, name) if name else b"") + (_pb_str(_T2_LD, version) if version else b"")
        out = _ld(_T1_LD, body)
        if len(_PB_SCOPES) < _PB_CACHE_MAX:
            _PB_SCOPES[key] = out
    return out


def _pb_records(records: Sequence[SpanRecord]) -> bytes:
    """The ``ExportTraceServiceRequest`` body for records.

    Nested lengths are summed up front so that the request is assembled with a single join (a batch of a
    thousand spans is about half a megabyte: copying it once per nesting level would cost more than the
    grouping).
    """
    out: list[bytes] = []
    for attrs, schema, scopes in group_records(records):
        resource = _PB_RESOURCES.get(attrs)
        rs_parts = [resource]
        rs_len = len(resource)
        for (name, version), members in scopes:
            scope = _pb_scope(name, version)
            ss_parts = [scope]
            ss_len = len(scope)
            for r in members:
                span = _pb_span(r)
                n = len(span)
                head = _T2_LD + (_VARINT1[n] if n < 0x80 else _varint(n))
                ss_parts.append(head)
                ss_parts.append(span)
                ss_len += len(head) + n
            head = _T2_LD + _varint(ss_len)
            rs_parts.append(head)
            rs_parts.extend(ss_parts)
            rs_len += len(head) + ss_len
        if schema:
            field = _pb_str(_T3_LD, schema)
            rs_parts.append(field)
            rs_len += len(field)
        out.append(_T1_LD + _varint(rs_len))
        out.extend(rs_parts)
    return b"".join(out)


def encode_request_proto(spans: Sequence[SpanRecord | ReadableSpan]) -> bytes:
    """Serialise spans as a protobuf ``ExportTraceServiceRequest`` (what OTLP gRPC / HTTP send).

    :class:`SpanRecord` objects are encoded directly; SDK ``ReadableSpan`` objects go through the SDK's
    own encoder.  A mixed batch gives one request holding both (serialised protobuf messages concatenate).
    """
    records = [s for s in spans if type(s) is SpanRecord]
    if len(records) == len(spans):
        return _pb_records(records)
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

    others = [s for s in spans if type(s) is not SpanRecord]
    return _pb_records(records) + encode_spans(others).SerializeToString()


# --------------------------------------------------------------------------------------------- SDK spans


def to_readable_spans(
    records: Sequence[SpanRecord],
    resource: Resource | None = None,
    scope: InstrumentationScope | None = None,
) -> list[ReadableSpan]:
    """SDK ``ReadableSpan`` objects for records (for SDK exporters; not a hot path).

    ``resource`` / ``scope`` are used as given when passed (so spans share them); otherwise each
    record's resource and scope fields are turned into SDK objects (one per distinct value).
    Parents are taken as local spans of the same trace, as :data:`SPAN_FLAGS_REMOTE` says otherwise.
    """
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import Event, ReadableSpan
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope
    from opentelemetry.trace import Link, SpanContext, SpanKind, TraceFlags, TraceState
    from opentelemetry.trace.status import Status, StatusCode

    kinds = {
        SPAN_KIND_INTERNAL: SpanKind.INTERNAL,
        SPAN_KIND_SERVER: SpanKind.SERVER,
        SPAN_KIND_CLIENT: SpanKind.CLIENT,
        SPAN_KIND_PRODUCER: SpanKind.PRODUCER,
        SPAN_KIND_CONSUMER: SpanKind.CONSUMER,
    }
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
                kind=kinds.get(r.kind, SpanKind.INTERNAL),
                status=status,
                start_time=r.start_ns,
                end_time=r.end_ns,
                instrumentation_scope=sc,
            )
        )
    return out


# --------------------------------------------------------------------------------------------- decode


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
                        resource_schema_url=resource_spans.schema_url,
                    )
                )
    return records

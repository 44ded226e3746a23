"""OTLP/JSON encoding of spans, and decoding back into :class:`SpanRecord` objects.

The output is the ``ExportTraceServiceRequest`` exactly as OTLP/HTTP with
``Content-Type: application/json`` carries it: the protobuf JSON mapping with lowerCamelCase
keys, plus OTLP's documented exceptions -- trace and span ids are lowercase hex (not base64) and
enums (span kind, status code) are integers.  64-bit integers (``intValue``, timestamps) are
strings, as the protobuf JSON mapping requires.

Spans are :class:`SpanRecord` objects (what the span builder makes; the fast path) or SDK
``ReadableSpan`` objects.  The encoder is written for the hot export path: it writes text directly,
walks the spans once, dispatches on exact types first, groups by resource/scope identity (hashing an
SDK ``Resource`` serialises its attributes, which costs more than encoding a span) and encodes each
resource, scope and attribute key once.  For the same spans, records and SDK spans give the same line.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanKind

from otel_envoy.export.records import ConstantCache, SpanRecord, group_records

__all__ = [
    "OTLP_SPAN_KIND",
    "decode_request_json",
    "encode_request",
    "encode_request_json",
    "encode_value",
]

#: SDK ``SpanKind`` -> OTLP proto ``Span.SpanKind`` (the SDK enum starts at INTERNAL=0, OTLP at 1).
OTLP_SPAN_KIND: dict[SpanKind, int] = {
    SpanKind.INTERNAL: 1,
    SpanKind.SERVER: 2,
    SpanKind.CLIENT: 3,
    SpanKind.PRODUCER: 4,
    SpanKind.CONSUMER: 5,
}

# Span.flags bits (SpanFlags in trace.proto); mirrors what the SDK's protobuf encoder sets.
_FLAG_HAS_IS_REMOTE = 0x100
_FLAG_IS_REMOTE = 0x200
_FLAGS_LOCAL = _FLAG_HAS_IS_REMOTE
_FLAGS_REMOTE = _FLAG_HAS_IS_REMOTE | _FLAG_IS_REMOTE
_FLAGS_LOCAL_JSON = f',"flags":{_FLAGS_LOCAL}'

_INT64_MIN = -(1 << 63)
_INT64_MAX = (1 << 63) - 1

_JSON = json.JSONEncoder(ensure_ascii=True, check_circular=False, allow_nan=False, separators=(",", ":"))


# --------------------------------------------------------------------------------------------- encode


def _double(v: float) -> dict[str, Any]:
    if math.isfinite(v):
        return {"doubleValue": v}
    # The protobuf JSON mapping spells non-finite doubles as strings.
    return {"doubleValue": "NaN" if v != v else ("Infinity" if v > 0 else "-Infinity")}


def encode_value(v: Any) -> dict[str, Any]:
    """Encode one attribute value as an OTLP/JSON ``AnyValue`` object.

    Integers outside int64 and values of unknown types fall back to ``stringValue`` so a single odd
    attribute can never make a collector reject the whole request.
    """
    t = type(v)
    if t is str:
        return {"stringValue": v}
    if t is bool:
        return {"boolValue": v}
    if t is int:
        if _INT64_MIN <= v <= _INT64_MAX:
            return {"intValue": str(v)}
        return {"stringValue": str(v)}
    if t is float:
        return _double(v)
    if t is tuple or t is list:
        return {"arrayValue": {"values": [encode_value(x) for x in v]}}
    if v is None:
        return {}
    # Subclasses and other containers (slow path).
    if isinstance(v, bool):
        return {"boolValue": bool(v)}
    if isinstance(v, str):
        return {"stringValue": str(v)}
    if isinstance(v, int):
        return encode_value(int(v))
    if isinstance(v, float):
        return _double(float(v))
    if isinstance(v, bytes | bytearray | memoryview):
        return {"bytesValue": base64.b64encode(bytes(v)).decode("ascii")}
    if isinstance(v, Mapping):
        return {"kvlistValue": {"values": _encode_attributes(v)}}
    if isinstance(v, Sequence):
        return {"arrayValue": {"values": [encode_value(x) for x in v]}}
    return {"stringValue": str(v)}


def _encode_attributes(attrs: Mapping[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    append = out.append
    for key, v in attrs.items():
        t = type(v)
        # Inline the common scalar cases; everything else goes through encode_value.
        if t is str:
            append({"key": key, "value": {"stringValue": v}})
        elif t is int and _INT64_MIN <= v <= _INT64_MAX:
            append({"key": key, "value": {"intValue": str(v)}})
        elif t is bool:
            append({"key": key, "value": {"boolValue": v}})
        else:
            append({"key": key, "value": encode_value(v)})
    return out


def _trace_state(ts: Any) -> str:
    return ",".join(f"{k}={v}" for k, v in ts.items())


def _dropped(attrs: Any) -> int:
    """Dropped-attribute count of an SDK ``BoundedAttributes`` (plain dicts never drop anything)."""
    if attrs is None or type(attrs) is dict:
        return 0
    return getattr(attrs, "dropped", 0) or 0


def _encode_span(span: ReadableSpan) -> dict[str, Any]:
    ctx = span.context
    out: dict[str, Any] = {"traceId": f"{ctx.trace_id:032x}", "spanId": f"{ctx.span_id:016x}"}
    ts = ctx.trace_state
    if ts:
        out["traceState"] = _trace_state(ts)
    parent = span.parent
    if parent is not None:
        out["parentSpanId"] = f"{parent.span_id:016x}"
        out["flags"] = _FLAGS_REMOTE if parent.is_remote else _FLAGS_LOCAL
    else:
        out["flags"] = _FLAGS_LOCAL
    out["name"] = span.name
    out["kind"] = OTLP_SPAN_KIND[span.kind]
    start = span.start_time
    if start:
        out["startTimeUnixNano"] = str(start)
    end = span.end_time
    if end:
        out["endTimeUnixNano"] = str(end)
    attrs = span._attributes  # the public property wraps it in a MappingProxyType on every access
    if attrs:
        out["attributes"] = _encode_attributes(attrs)
    dropped = _dropped(attrs)
    if dropped:
        out["droppedAttributesCount"] = dropped
    events = span._events
    if events:
        enc_events = []
        for ev in events:
            e: dict[str, Any] = {"timeUnixNano": str(ev.timestamp), "name": ev.name}
            ev_attrs = ev.attributes
            if ev_attrs:
                e["attributes"] = _encode_attributes(ev_attrs)
            dropped = _dropped(ev_attrs)
            if dropped:
                e["droppedAttributesCount"] = dropped
            enc_events.append(e)
        out["events"] = enc_events
        if span.dropped_events:
            out["droppedEventsCount"] = span.dropped_events
    links = span._links
    if links:
        enc_links = []
        for link in links:
            lctx = link.context
            lk: dict[str, Any] = {"traceId": f"{lctx.trace_id:032x}", "spanId": f"{lctx.span_id:016x}"}
            if lctx.trace_state:
                lk["traceState"] = _trace_state(lctx.trace_state)
            l_attrs = link.attributes
            if l_attrs:
                lk["attributes"] = _encode_attributes(l_attrs)
            dropped = _dropped(l_attrs)
            if dropped:
                lk["droppedAttributesCount"] = dropped
            lk["flags"] = _FLAGS_REMOTE if lctx.is_remote else _FLAGS_LOCAL
            enc_links.append(lk)
        out["links"] = enc_links
        if span.dropped_links:
            out["droppedLinksCount"] = span.dropped_links
    status = span.status
    if status is not None:
        st: dict[str, Any] = {}
        code = status.status_code.value
        if code:
            st["code"] = code
        if status.description:
            st["message"] = status.description
        out["status"] = st
    return out


def _encode_scope(scope: Any) -> dict[str, Any]:
    if scope is None:
        return {}
    out: dict[str, Any] = {}
    if scope.name:
        out["name"] = scope.name
    if scope.version:
        out["version"] = scope.version
    attrs = getattr(scope, "attributes", None)
    if attrs:
        out["attributes"] = _encode_attributes(attrs)
    return out


def _split(spans: Sequence[SpanRecord | ReadableSpan]) -> tuple[list[SpanRecord], list[ReadableSpan]]:
    records = [s for s in spans if type(s) is SpanRecord]
    if len(records) == len(spans):
        return records, []
    return records, [s for s in spans if type(s) is not SpanRecord]  # type: ignore[misc]


def encode_request(spans: Sequence[SpanRecord | ReadableSpan]) -> dict[str, Any]:
    """Encode finished spans as an OTLP/JSON ``ExportTraceServiceRequest`` (a JSON-ready dict).

    Spans are grouped by resource, then by instrumentation scope, in order of first appearance
    (the same grouping the SDK's protobuf encoder does).  Records come first in a mixed batch.
    """
    records, sdk_spans = _split(spans)
    resource_spans = [_record_resource_dict(group) for group in group_records(records)]
    resource_spans.extend(_sdk_request(sdk_spans))
    return {"resourceSpans": resource_spans}


def _record_resource_dict(group: Any) -> dict[str, Any]:
    attrs, schema, scopes = group
    scope_spans = []
    for (name, version), members in scopes:
        scope: dict[str, Any] = {}
        if name:
            scope["name"] = name
        if version:
            scope["version"] = version
        scope_spans.append({"scope": scope, "spans": [_record_dict(r) for r in members]})
    resource: dict[str, Any] = {}
    if attrs:
        resource["attributes"] = _encode_attributes(attrs)
    rs: dict[str, Any] = {"resource": resource, "scopeSpans": scope_spans}
    if schema:
        rs["schemaUrl"] = schema
    return rs


def _record_dict(r: SpanRecord) -> dict[str, Any]:
    out: dict[str, Any] = {"traceId": r.trace_id, "spanId": r.span_id}
    if r.trace_state:
        out["traceState"] = r.trace_state
    if r.parent_span_id:
        out["parentSpanId"] = r.parent_span_id
    if r.flags:
        out["flags"] = r.flags
    out["name"] = r.name
    out["kind"] = r.kind
    if r.start_ns:
        out["startTimeUnixNano"] = str(r.start_ns)
    if r.end_ns:
        out["endTimeUnixNano"] = str(r.end_ns)
    if r.attributes:
        out["attributes"] = _encode_attributes(r.attributes)
    if r.events:
        events = []
        for ts, name, attrs in r.events:
            e: dict[str, Any] = {"timeUnixNano": str(ts), "name": name}
            if attrs:
                e["attributes"] = _encode_attributes(attrs)
            events.append(e)
        out["events"] = events
    if r.links:
        links = []
        for trace_id, span_id, attrs in r.links:
            lk: dict[str, Any] = {"traceId": trace_id, "spanId": span_id}
            if attrs:
                lk["attributes"] = _encode_attributes(attrs)
            links.append(lk)
        out["links"] = links
    status: dict[str, Any] = {}
    if r.status_code:
        status["code"] = r.status_code
    if r.status_message:
        status["message"] = r.status_message
    out["status"] = status
    return out


def _sdk_request(spans: Sequence[ReadableSpan]) -> list[dict[str, Any]]:
    resource_spans = []
    for resource, scope_entries in _group(spans):
        scope_spans = []
        for scope, members in scope_entries:
            ss: dict[str, Any] = {
                "scope": _encode_scope(scope),
                "spans": [_encode_span(sp) for sp in members],
            }
            schema = getattr(scope, "schema_url", None) if scope is not None else None
            if schema:
                ss["schemaUrl"] = schema
            scope_spans.append(ss)
        resource_obj: dict[str, Any] = {}
        rs: dict[str, Any] = {"resource": resource_obj, "scopeSpans": scope_spans}
        if resource is not None:
            if resource.attributes:
                resource_obj["attributes"] = _encode_attributes(resource.attributes)
            if resource.schema_url:
                rs["schemaUrl"] = resource.schema_url
        resource_spans.append(rs)
    return resource_spans


def encode_request_json(spans: Sequence[SpanRecord | ReadableSpan]) -> str:
    """Encode finished spans as a compact OTLP/JSON ``ExportTraceServiceRequest`` string (one line).

    Same content as ``json.dumps(encode_request(spans))`` but written straight to text, which is
    several times faster than building the dicts and serialising them.
    """
    records, sdk_spans = _split(spans)
    out = ['{"resourceSpans":[']
    if records:
        _records_json(records, out)
    if sdk_spans:
        if records:
            out.append(",")
        out.append(",".join(_sdk_json(sdk_spans)))
    out.append("]}")
    return "".join(out)


def _sdk_json(spans: Sequence[ReadableSpan]) -> list[str]:
    out = []
    for resource, scope_entries in _group(spans):
        rs = ['{"resource":{']
        if resource is not None and resource.attributes:
            rs.append('"attributes":[' + _attrs_json(resource.attributes) + "]")
        rs.append('},"scopeSpans":[')
        scope_parts = []
        for scope, members in scope_entries:
            encoded = ",".join([_span_json(sp) for sp in members])
            schema = getattr(scope, "schema_url", None) if scope is not None else None
            extra = ',"schemaUrl":' + _esc(schema) if schema else ""
            scope_parts.append(
                '{"scope":' + _JSON.encode(_encode_scope(scope)) + ',"spans":[' + encoded + "]" + extra + "}"
            )
        rs.append(",".join(scope_parts))
        rs.append("]")
        if resource is not None and resource.schema_url:
            rs.append(',"schemaUrl":' + _esc(resource.schema_url))
        rs.append("}")
        out.append("".join(rs))
    return out


def _group(spans: Sequence[ReadableSpan]) -> list[tuple[Any, list[tuple[Any, list[ReadableSpan]]]]]:
    """Group spans by resource, then scope (by identity first, then merging equal objects)."""
    by_id: dict[int, tuple[Any, dict[int, tuple[Any, list[ReadableSpan]]]]] = {}
    for span in spans:
        resource = span.resource
        group = by_id.get(id(resource))
        if group is None:
            group = by_id[id(resource)] = (resource, {})
        scope = span.instrumentation_scope
        entry = group[1].get(id(scope))
        if entry is None:
            entry = group[1][id(scope)] = (scope, [])
        entry[1].append(span)
    if len(by_id) == 1:
        ((resource, scopes),) = by_id.values()
        if len(scopes) == 1:
            return [(resource, list(scopes.values()))]
    merged: list[tuple[Any, list[tuple[Any, list[ReadableSpan]]]]] = []
    for resource, scopes in by_id.values():
        for m in merged:
            if m[0] is resource or m[0] == resource:
                m[1].extend(scopes.values())
                break
        else:
            merged.append((resource, list(scopes.values())))
    result = []
    for resource, scope_entries in merged:
        scope_merged: list[tuple[Any, list[ReadableSpan]]] = []
        for scope, members in scope_entries:
            for m in scope_merged:
                if m[0] is scope or (scope is not None and m[0] is not None and m[0] == scope):
                    m[1].extend(members)
                    break
            else:
                scope_merged.append((scope, list(members)))
        result.append((resource, scope_merged))
    return result


_esc = json.encoder.encode_basestring_ascii
_KEY_PREFIX: dict[str, str] = {}  # key -> '{"key":KEY,"value":'
_STR_PREFIX: dict[str, str] = {}  # key -> '{"key":KEY,"value":{"stringValue":'
_INT_PREFIX: dict[str, str] = {}  # key -> '{"key":KEY,"value":{"intValue":"'
_KEY_PREFIX_MAX = 4096


def _key_prefix(key: str) -> str:
    prefix = '{"key":' + _esc(key) + ',"value":'
    if len(_KEY_PREFIX) < _KEY_PREFIX_MAX:
        _KEY_PREFIX[key] = prefix
    return prefix


def _str_prefix(key: str) -> str:
    prefix = '{"key":' + _esc(key) + ',"value":{"stringValue":'
    if len(_STR_PREFIX) < _KEY_PREFIX_MAX:
        _STR_PREFIX[key] = prefix
    return prefix


def _int_prefix(key: str) -> str:
    prefix = '{"key":' + _esc(key) + ',"value":{"intValue":"'
    if len(_INT_PREFIX) < _KEY_PREFIX_MAX:
        _INT_PREFIX[key] = prefix
    return prefix


def _array_json(values: list[Any] | tuple[Any, ...]) -> str:
    """``{"arrayValue":...}`` for a list or tuple, the same text as ``_JSON.encode(encode_value(values))``."""
    if values and type(values[0]) is str:
        # Arrays of strings (cipher suites, ALPN ids, socket options): one join in C. _esc raises
        # TypeError for anything but a string; a str subclass gets the same text as the loop below gives.
        try:
            return '{"arrayValue":{"values":[{"stringValue":' + '},{"stringValue":'.join(map(_esc, values)) \
                + "}]}}"
        except TypeError:  # not all strings: element by element
            pass
    parts = []
    append = parts.append
    for x in values:
        t = type(x)
        if t is str:
            append('{"stringValue":' + _esc(x) + "}")
        elif t is int and _INT64_MIN <= x <= _INT64_MAX:
            append(f'{{"intValue":"{x}"}}')
        elif t is bool:
            append('{"boolValue":true}' if x else '{"boolValue":false}')
        else:
            append(_JSON.encode(encode_value(x)))
    return '{"arrayValue":{"values":[' + ",".join(parts) + "]}}"


_tuple_json: Callable[[tuple[Any, ...]], str] = ConstantCache(_array_json, limit=1024, snapshot=None).get


def _attrs_json(attrs: Mapping[str, Any]) -> str:
    parts = []
    append = parts.append
    str_prefix = _STR_PREFIX
    int_prefix = _INT_PREFIX
    for key, v in attrs.items():
        t = type(v)
        if t is str:
            append((str_prefix.get(key) or _str_prefix(key)) + _esc(v) + "}}")
        elif t is int and _INT64_MIN <= v <= _INT64_MAX:
            append(f'{int_prefix.get(key) or _int_prefix(key)}{v}"}}}}')
        elif t is bool:
            prefix = _KEY_PREFIX.get(key) or _key_prefix(key)
            append(prefix + ('{"boolValue":true}}' if v else '{"boolValue":false}}'))
        elif t is tuple:
            append((_KEY_PREFIX.get(key) or _key_prefix(key)) + _tuple_json(v) + "}")
        elif t is list:
            append((_KEY_PREFIX.get(key) or _key_prefix(key)) + _array_json(v) + "}")
        else:
            append((_KEY_PREFIX.get(key) or _key_prefix(key)) + _JSON.encode(encode_value(v)) + "}")
    return ",".join(parts)


def _span_json(span: ReadableSpan) -> str:
    ctx = span.context
    parent = span.parent
    parts = [f'{{"traceId":"{ctx.trace_id:032x}","spanId":"{ctx.span_id:016x}"']
    append = parts.append
    ts = ctx.trace_state
    if ts:
        append(',"traceState":' + _esc(_trace_state(ts)))
    if parent is not None:
        flags = _FLAGS_REMOTE if parent.is_remote else _FLAGS_LOCAL
        append(f',"parentSpanId":"{parent.span_id:016x}","flags":{flags}')
    else:
        append(_FLAGS_LOCAL_JSON)
    append(f',"name":{_esc(span.name)},"kind":{OTLP_SPAN_KIND[span.kind]}')
    start = span.start_time
    if start:
        append(f',"startTimeUnixNano":"{start}"')
    end = span.end_time
    if end:
        append(f',"endTimeUnixNano":"{end}"')
    attrs = span._attributes  # the public property wraps it in a MappingProxyType on every access
    if attrs:
        append(',"attributes":[' + _attrs_json(attrs) + "]")
    dropped = _dropped(attrs)
    if dropped:
        append(f',"droppedAttributesCount":{dropped}')
    events = span._events
    if events:
        enc = []
        for ev in events:
            e = f'{{"timeUnixNano":"{ev.timestamp}","name":{_esc(ev.name)}'
            ev_attrs = ev.attributes
            if ev_attrs:
                e += ',"attributes":[' + _attrs_json(ev_attrs) + "]"
            dropped = _dropped(ev_attrs)
            if dropped:
                e += f',"droppedAttributesCount":{dropped}'
            enc.append(e + "}")
        append(',"events":[' + ",".join(enc) + "]")
        if span.dropped_events:
            append(f',"droppedEventsCount":{span.dropped_events}')
    links = span._links
    if links:
        enc = []
        for link in links:
            lctx = link.context
            lk = f'{{"traceId":"{lctx.trace_id:032x}","spanId":"{lctx.span_id:016x}"'
            if lctx.trace_state:
                lk += ',"traceState":' + _esc(_trace_state(lctx.trace_state))
            l_attrs = link.attributes
            if l_attrs:
                lk += ',"attributes":[' + _attrs_json(l_attrs) + "]"
            dropped = _dropped(l_attrs)
            if dropped:
                lk += f',"droppedAttributesCount":{dropped}'
            flags = _FLAGS_REMOTE if lctx.is_remote else _FLAGS_LOCAL
            enc.append(f'{lk},"flags":{flags}}}')
        append(',"links":[' + ",".join(enc) + "]")
        if span.dropped_links:
            append(f',"droppedLinksCount":{span.dropped_links}')
    status = span.status
    if status is None:
        append("}")
    else:
        code = status.status_code.value
        desc = status.description
        if desc:
            code_part = f'"code":{code},' if code else ""
            append(f',"status":{{{code_part}"message":{_esc(desc)}}}}}')
        elif code:
            append(f',"status":{{"code":{code}}}}}')
        else:
            append(',"status":{}}')
    return "".join(parts)


# ------------------------------------------------------------------------------------- records -> JSON


def _json_resource(attrs: dict[str, Any]) -> str:
    if attrs:
        return '{"resource":{"attributes":[' + _attrs_json(attrs) + ']},"scopeSpans":['
    return '{"resource":{},"scopeSpans":['


_JSON_RESOURCES = ConstantCache(_json_resource)
_JSON_SCOPES: dict[tuple[str, str], str] = {}
_JSON_NAMES: dict[str, str] = {}  # span name -> ',"name":NAME,"kind":'
_JSON_CACHE_MAX = 4096


def _json_scope(name: str, version: str) -> str:
    key = (name, version)
    out = _JSON_SCOPES.get(key)
    if out is None:
        scope = {}
        if name:
            scope["name"] = name
        if version:
            scope["version"] = version
        out = '{"scope":' + _JSON.encode(scope) + ',"spans":['
        if len(_JSON_SCOPES) < _JSON_CACHE_MAX:
            _JSON_SCOPES[key] = out
    return out


def _json_name(name: str) -> str:
    out = f',"name":{_esc(name)},"kind":'
    if len(_JSON_NAMES) < _JSON_CACHE_MAX:
        _JSON_NAMES[name] = out
    return out


def _records_json(records: Sequence[SpanRecord], out: list[str]) -> None:
    """Append the text of the ``resourceSpans`` entries (comma-separated) for records to ``out``.

    The pieces are joined once, by the caller: a batch is written without intermediate copies.
    """
    append = out.append
    for i, (attrs, schema, scopes) in enumerate(group_records(records)):
        if i:
            append(",")
        append(_JSON_RESOURCES.get(attrs))
        for j, ((name, version), members) in enumerate(scopes):
            if j:
                append(",")
            append(_json_scope(name, version))
            append(",".join([_record_json(r) for r in members]))
            append("]}")
        append('],"schemaUrl":' + _esc(schema) + "}" if schema else "]}")


def _record_json(r: SpanRecord) -> str:
    # Keys in the order of the SDK-span path (_span_json), so both give the same text.
    parent, flags, state = r.parent_span_id, r.flags, r.trace_state
    head = f'{{"traceId":"{r.trace_id}","spanId":"{r.span_id}"'
    if state:
        head += ',"traceState":' + _esc(state)
    if parent:
        head += f',"parentSpanId":"{parent}"'
    if flags:
        head += f',"flags":{flags}'
    name = _JSON_NAMES.get(r.name) or _json_name(r.name)
    start, end = r.start_ns, r.end_ns
    if start and end:
        s = f'{head}{name}{r.kind},"startTimeUnixNano":"{start}","endTimeUnixNano":"{end}"'
    else:
        s = f"{head}{name}{r.kind}"
        if start:
            s += f',"startTimeUnixNano":"{start}"'
        if end:
            s += f',"endTimeUnixNano":"{end}"'
    if r.attributes:
        s += ',"attributes":[' + _attrs_json(r.attributes) + "]"
    if r.events:
        enc = []
        for ts, ev_name, attrs in r.events:
            if attrs:
                enc.append(
                    f'{{"timeUnixNano":"{ts}","name":{_esc(ev_name)},"attributes":[{_attrs_json(attrs)}]}}'
                )
            else:
                enc.append(f'{{"timeUnixNano":"{ts}","name":{_esc(ev_name)}}}')
        s += ',"events":[' + ",".join(enc) + "]"
    if r.links:
        enc = []
        for trace_id, span_id, attrs in r.links:
            lk = f'{{"traceId":"{trace_id}","spanId":"{span_id}"'
            enc.append(lk + (',"attributes":[' + _attrs_json(attrs) + "]}" if attrs else "}"))
        s += ',"links":[' + ",".join(enc) + "]"
    code, message = r.status_code, r.status_message
    if message:
        code_part = f'"code":{code},' if code else ""
        return s + f',"status":{{{code_part}"message":{_esc(message)}}}}}'
    if code:
        return s + f',"status":{{"code":{code}}}}}'
    return s + ',"status":{}}'


# --------------------------------------------------------------------------------------------- decode


def _id(value: Any, nbytes: int, what: str) -> str:
    """Normalise an id to lowercase hex; accepts OTLP/JSON hex and, leniently, protobuf base64."""
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a string, got {type(value).__name__}")
    if len(value) == 2 * nbytes:
        try:
            bytes.fromhex(value)
            return value.lower()
        except ValueError:
            pass
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != nbytes:
        raise ValueError(f"{what} {value!r} is neither {2 * nbytes} hex digits nor base64 of {nbytes} bytes")
    return raw.hex()


def _int(value: Any, what: str) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{what} must be an integer, got a boolean")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            pass
    if isinstance(value, float) and value.is_integer():
        return int(value)
    raise ValueError(f"{what} must be an integer, got {value!r}")


_KIND_NAMES = {
    "SPAN_KIND_UNSPECIFIED": 0,
    "SPAN_KIND_INTERNAL": 1,
    "SPAN_KIND_SERVER": 2,
    "SPAN_KIND_CLIENT": 3,
    "SPAN_KIND_PRODUCER": 4,
    "SPAN_KIND_CONSUMER": 5,
}
_STATUS_NAMES = {"STATUS_CODE_UNSET": 0, "STATUS_CODE_OK": 1, "STATUS_CODE_ERROR": 2}


def _enum(value: Any, names: dict[str, int], what: str) -> int:
    if isinstance(value, str) and value in names:
        return names[value]
    return _int(value, what)


def _decode_value(v: Any) -> Any:
    if not isinstance(v, dict):
        raise ValueError(f"attribute value must be an object, got {v!r}")
    if not v:
        return None
    if "stringValue" in v:
        return v["stringValue"]
    if "intValue" in v:
        return _int(v["intValue"], "intValue")
    if "boolValue" in v:
        return bool(v["boolValue"])
    if "doubleValue" in v:
        return float(v["doubleValue"])  # float() understands "NaN", "Infinity", "-Infinity"
    if "arrayValue" in v:
        return [_decode_value(x) for x in (v["arrayValue"] or {}).get("values", ())]
    if "kvlistValue" in v:
        return _decode_attributes((v["kvlistValue"] or {}).get("values"))
    if "bytesValue" in v:
        return base64.b64decode(v["bytesValue"])
    raise ValueError(f"unknown attribute value {v!r}")


def _decode_attributes(kvs: Any) -> dict[str, Any]:
    if not kvs:
        return {}
    if not isinstance(kvs, list):
        raise ValueError(f"attributes must be a list, got {type(kvs).__name__}")
    return {kv["key"]: _decode_value(kv.get("value", {})) for kv in kvs}


def _list(obj: Any, key: str) -> list[Any]:
    value = obj.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise ValueError(f"{key!r} must be a list, got {type(value).__name__}")
    return value


def decode_request_json(obj: dict[str, Any]) -> list[SpanRecord]:
    """Flatten a parsed OTLP/JSON ``ExportTraceServiceRequest`` into :class:`SpanRecord` objects.

    Raises ``ValueError`` (with a short reason) when ``obj`` is not such a request.
    """
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    if "resourceSpans" not in obj:
        raise ValueError("missing 'resourceSpans'")
    try:
        return _decode(obj)
    except ValueError:
        raise
    except (KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"malformed request ({type(exc).__name__}: {exc})") from exc


def _decode(obj: dict[str, Any]) -> list[SpanRecord]:
    records: list[SpanRecord] = []
    for rs in _list(obj, "resourceSpans"):
        resource_attrs = _decode_attributes((rs.get("resource") or {}).get("attributes"))
        resource_schema_url = rs.get("schemaUrl", "")
        for ss in _list(rs, "scopeSpans"):
            scope = ss.get("scope") or {}
            scope_name = scope.get("name", "")
            scope_version = scope.get("version", "")
            for sp in _list(ss, "spans"):
                parent = sp.get("parentSpanId")
                status = sp.get("status") or {}
                records.append(
                    SpanRecord(
                        trace_id=_id(sp["traceId"], 16, "traceId"),
                        span_id=_id(sp["spanId"], 8, "spanId"),
                        parent_span_id=_id(parent, 8, "parentSpanId") if parent else None,
                        name=sp.get("name", ""),
                        kind=_enum(sp.get("kind", 0), _KIND_NAMES, "kind"),
                        start_ns=_int(sp.get("startTimeUnixNano", 0), "startTimeUnixNano"),
                        end_ns=_int(sp.get("endTimeUnixNano", 0), "endTimeUnixNano"),
                        attributes=_decode_attributes(sp.get("attributes")),
                        events=[
                            (
                                _int(ev.get("timeUnixNano", 0), "timeUnixNano"),
                                ev.get("name", ""),
                                _decode_attributes(ev.get("attributes")),
                            )
                            for ev in _list(sp, "events")
                        ],
                        links=[
                            (
                                _id(lk["traceId"], 16, "links.traceId"),
                                _id(lk["spanId"], 8, "links.spanId"),
                                _decode_attributes(lk.get("attributes")),
                            )
                            for lk in _list(sp, "links")
                        ],
                        status_code=_enum(status.get("code", 0), _STATUS_NAMES, "status.code"),
                        status_message=status.get("message", ""),
                        resource_attributes=dict(resource_attrs),
                        scope_name=scope_name,
                        scope_version=scope_version,
                        trace_state=sp.get("traceState", ""),
                        flags=_int(sp.get("flags", 0), "flags"),
                        resource_schema_url=resource_schema_url,
                    )
                )
    return records

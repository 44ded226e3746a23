"""OTLP/JSON encoding of span records: the ``ExportTraceServiceRequest`` the JSON-lines file holds.

The output is the request exactly as OTLP/HTTP with ``Content-Type: application/json`` carries it: the
protobuf JSON mapping with lowerCamelCase keys, plus OTLP's documented exceptions -- trace and span ids are
lowercase hex (not base64) and enums (span kind, status code) are integers.  64-bit integers
(``intValue``, timestamps) are strings, as the protobuf JSON mapping requires.

The text encoder (:func:`encode_request_json`) is written for the hot export path: it writes text
directly, walks the records once, dispatches on exact types first, groups by resource identity and
encodes each resource, scope and attribute key once.  :func:`encode_request` builds the same request as
dicts.  The reader is :mod:`otel_envoy.export.otlp_json_decode`.
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from otel_envoy.export.constant_cache import ConstantCache
from otel_envoy.export.grouping import ResourceGroup, group_records
from otel_envoy.export.span_templates import Pieces, cut_at_marks, sentinel_copy, template_pieces
from otel_envoy.spans.model import SharedAttributes, SpanRecord, SpanTemplate, TemplatedSpan

__all__ = [
    "JSON_ENCODER",
    "array_json",
    "encode_request",
    "encode_request_json",
    "encode_value",
]

_INT64_MIN = -(1 << 63)
_INT64_MAX = (1 << 63) - 1

#: Compact, strict, ASCII-only JSON: what every value the fast paths do not write themselves goes through.
JSON_ENCODER = json.JSONEncoder(ensure_ascii=True, check_circular=False, allow_nan=False,
                                separators=(",", ":"))


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


def encode_request(records: Sequence[SpanRecord]) -> dict[str, Any]:
    """Encode span records as an OTLP/JSON ``ExportTraceServiceRequest`` (a JSON-ready dict).

    Records are grouped by resource, then by instrumentation scope, in order of first appearance
    (the same grouping the SDK's protobuf encoder does).
    """
    return {"resourceSpans": [_record_resource_dict(group) for group in group_records(records)]}


def _record_resource_dict(group: ResourceGroup) -> dict[str, Any]:
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


def encode_request_json(records: Sequence[SpanRecord]) -> str:
    """Encode span records as a compact OTLP/JSON ``ExportTraceServiceRequest`` string (one line).

    Same content as ``json.dumps(encode_request(records))`` but written straight to text, which is
    several times faster than building the dicts and serialising them.
    """
    out = ['{"resourceSpans":[']
    if records:
        _records_json(records, out)
    out.append("]}")
    return "".join(out)


# ------------------------------------------------------------------------------------------ text pieces

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


def array_json(values: list[Any] | tuple[Any, ...]) -> str:
    """``{"arrayValue":...}`` for a list or tuple: the text of ``JSON_ENCODER.encode(encode_value(values))``,
    written directly (arrays of strings in one join)."""
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
            append(JSON_ENCODER.encode(encode_value(x)))
    return '{"arrayValue":{"values":[' + ",".join(parts) + "]}}"


_tuple_json: Callable[[tuple[Any, ...]], str] = ConstantCache(array_json, limit=1024, snapshot=None).get


#: (key, str or int value) -> its attribute's text. Most attributes repeat from span to span (a
#: connection's addresses, port and thread, a client's method, path and user agent, statuses, the phase
#: names): a lookup instead of a concatenation and an escape. Bounded: cleared when full.
_ATTR_TEXT: dict[tuple[str, Any], str] = {}
_ATTR_TEXT_MAX = 16384


def _scalar_attr_text(item: tuple[str, Any]) -> str:
    """The text of a str or int attribute, remembered in _ATTR_TEXT."""
    key, v = item
    if type(v) is str:
        text = (_STR_PREFIX.get(key) or _str_prefix(key)) + _esc(v) + "}}"
    elif _INT64_MIN <= v <= _INT64_MAX:
        text = f'{_INT_PREFIX.get(key) or _int_prefix(key)}{v}"}}}}'
    else:  # beyond int64: encode_value's rendering
        text = (_KEY_PREFIX.get(key) or _key_prefix(key)) + JSON_ENCODER.encode(encode_value(v)) + "}"
    if len(_ATTR_TEXT) >= _ATTR_TEXT_MAX:
        _ATTR_TEXT.clear()
    _ATTR_TEXT[item] = text
    return text


def _attrs_json(attrs: Mapping[str, Any]) -> str:
    parts = []
    append = parts.append
    known = _ATTR_TEXT.get
    for item in attrs.items():
        key, v = item
        t = type(v)
        if t is str or t is int:
            append(known(item) or _scalar_attr_text(item))
        elif t is bool:
            prefix = _KEY_PREFIX.get(key) or _key_prefix(key)
            append(prefix + ('{"boolValue":true}}' if v else '{"boolValue":false}}'))
        elif t is tuple:
            append((_KEY_PREFIX.get(key) or _key_prefix(key)) + _tuple_json(v) + "}")
        elif t is list:
            append((_KEY_PREFIX.get(key) or _key_prefix(key)) + array_json(v) + "}")
        else:
            append((_KEY_PREFIX.get(key) or _key_prefix(key)) + JSON_ENCODER.encode(encode_value(v)) + "}")
    return ",".join(parts)


#: A SharedAttributes' text, by identity (read-only objects shared by many spans: no snapshot needed).
_shared_attrs_json: Callable[[SharedAttributes], str] = ConstantCache(_attrs_json, limit=1024,
                                                                     snapshot=None).get


# ------------------------------------------------------------------------------------- records -> JSON


def _json_resource(attrs: dict[str, Any]) -> str:
    if attrs:
        return '{"resource":{"attributes":[' + _attrs_json(attrs) + ']},"scopeSpans":['
    return '{"resource":{},"scopeSpans":['


_JSON_RESOURCES = ConstantCache(_json_resource, limit=1024)  # one resource per traced process
_JSON_SCOPES: dict[tuple[str, str], str] = {}
_JSON_NAMES: dict[str, str] = {}  # span name -> ',"name":NAME,"kind":'
_JSON_EVENT_NAMES: dict[str, str] = {}  # event name -> '","name":NAME' (after the event's time)
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
        out = '{"scope":' + JSON_ENCODER.encode(scope) + ',"spans":['
        if len(_JSON_SCOPES) < _JSON_CACHE_MAX:
            _JSON_SCOPES[key] = out
    return out


def _json_name(name: str) -> str:
    out = f',"name":{_esc(name)},"kind":'
    if len(_JSON_NAMES) < _JSON_CACHE_MAX:
        _JSON_NAMES[name] = out
    return out


def _json_event_name(name: str) -> str:
    out = f'","name":{_esc(name)}'
    if len(_JSON_EVENT_NAMES) < _JSON_CACHE_MAX:
        _JSON_EVENT_NAMES[name] = out
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


_SENTINEL_SPAN_ID = "zzzzzzzzzzzzzzzz"  # not hex: no span's id


def _templated_json(r: TemplatedSpan) -> str | None:
    """A span made from a template: its text from the template's pieces, or None when it does not fit."""
    pieces = template_pieces(r, "json", _json_template)
    if pieces is None:
        return None
    value = r.varying
    if type(value) is not int or not _INT64_MIN <= value <= _INT64_MAX:
        return None
    times = r.event_times
    if len(times) == 2:  # a request and its answer: the pieces and values in one f-string
        p0, p1, p2, p3, p4, p5, p6 = pieces
        return f"{p0}{r.span_id}{p1}{r.start_ns}{p2}{r.end_ns}{p3}{value}{p4}{times[0]}{p5}{times[1]}{p6}"
    values = [r.span_id, r.start_ns, r.end_ns, value, *times]
    out = [pieces[0]]
    for v, piece in zip(values, pieces[1:], strict=True):
        out.append(str(v))
        out.append(piece)
    return "".join(out)


def _json_template(template: SpanTemplate) -> Pieces:
    """The template prototype's text as _record_json writes it, cut where the template's spans differ."""
    n_events = len(template.prototype.events)
    sentinels = [-(10**18) - i for i in range(3 + n_events)]  # start, end, value, event times
    text = _record_json(sentinel_copy(template, _SENTINEL_SPAN_ID, sentinels))
    value_prefix = _INT_PREFIX.get(template.varying_key) or _int_prefix(template.varying_key)
    marks = [('"spanId":"', _SENTINEL_SPAN_ID), ('"startTimeUnixNano":"', str(sentinels[0])),
             ('"endTimeUnixNano":"', str(sentinels[1])), (value_prefix, str(sentinels[2])),
             *[('"timeUnixNano":"', str(t)) for t in sentinels[3:]]]
    return cut_at_marks(text, marks, n_events)


def _record_json(r: SpanRecord | TemplatedSpan) -> str:
    # The key order is fixed, so the same records always give the same text.
    if type(r) is TemplatedSpan:
        text = _templated_json(r)
        if text is not None:
            return text
        r = r.as_record()
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
    attributes = r.attributes
    if attributes:
        s += ',"attributes":[' + (_shared_attrs_json(attributes) if type(attributes) is SharedAttributes
                                  else _attrs_json(attributes)) + "]"
    if r.events:
        enc = []
        for ts, ev_name, attrs in r.events:
            named = _JSON_EVENT_NAMES.get(ev_name) or _json_event_name(ev_name)
            if attrs:
                enc.append(f'{{"timeUnixNano":"{ts}{named},"attributes":[{_attrs_json(attrs)}]}}')
            else:
                enc.append(f'{{"timeUnixNano":"{ts}{named}}}')
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


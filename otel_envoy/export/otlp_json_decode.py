"""OTLP/JSON ``ExportTraceServiceRequest`` -> :class:`SpanRecord` objects (the ``show`` command's reader).

Accepts what :mod:`otel_envoy.export.otlp_json` writes (OTLP/JSON: hex ids, integer enums) and, leniently,
protobuf's canonical JSON mapping (base64 ids, enum names).
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

from otel_envoy.spans.model import SpanRecord

__all__ = ["decode_request_json"]


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

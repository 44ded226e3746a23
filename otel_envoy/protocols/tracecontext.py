"""Trace context carried in request headers: W3C traceparent, Zipkin B3 (single and multi), x-request-id.

:func:`trace_context` picks the first usable one in that order and returns the trace id and the span id
the header names (the span our request span becomes a child of). ``x-request-id`` names no span: when it
is a UUID (as Envoy generates), its 128 bits are the trace id, so every hop that sees the same request id
lands in the same trace. Values are checked strictly and an invalid one is ignored (as if absent), never
raised: an id is exactly its length of hex digits (lowercase in traceparent, as W3C Trace Context requires),
with no sign, prefix, underscore or inner space (which Python's ``int(text, 16)`` would accept), and not all
zeros; traceparent's version and flags are two hex digits each.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["TraceContext", "trace_context"]


@dataclass(frozen=True, slots=True)
class TraceContext:
    """Where a request's span belongs."""

    trace_id: int
    parent_span_id: int | None  # None: the span is a root in that trace
    sampled: bool
    source: str  # "traceparent" | "b3" | "x-b3" | "x-request-id"
    trace_state: str = ""  # the tracestate header that came with a traceparent, kept as it was


#: The longest tracestate kept (the W3C specification's 32 members of up to 256 characters are more; 512 is
#: what it asks every vendor to propagate at least).
MAX_TRACE_STATE = 512

_HEX = re.compile(r"[0-9a-fA-F]+")
_LOWER_HEX = re.compile(r"[0-9a-f]+")


#: The blanks HTTP allows around a field value (RFC 9110 5.6.3 OWS); str.strip() would also take control
#: characters such as \x1f for whitespace.
_OWS = " \t"


def _hex(text: str, digits: tuple[int, ...], *, lowercase: bool = False, blanks: bool = True) -> int | None:
    """The value of an id of exactly one of ``digits`` hex digits, not zero (``blanks``: spaces and tabs
    around it allowed)."""
    if blanks:
        text = text.strip(_OWS)
    if len(text) not in digits or not (_LOWER_HEX if lowercase else _HEX).fullmatch(text):
        return None
    return int(text, 16) or None


def _traceparent(value: str) -> TraceContext | None:
    parts = value.strip(_OWS).split("-")
    if len(parts) < 4 or not _LOWER_HEX.fullmatch(parts[0]) or len(parts[0]) != 2 or parts[0] == "ff":
        return None
    if parts[0] == "00" and len(parts) != 4:
        return None
    if len(parts[3]) != 2 or not _HEX.fullmatch(parts[3]):
        return None
    trace_id = _hex(parts[1], (32,), lowercase=True, blanks=False)
    span_id = _hex(parts[2], (16,), lowercase=True, blanks=False)
    if trace_id is None or span_id is None:
        return None
    return TraceContext(trace_id, span_id, bool(int(parts[3], 16) & 1), "traceparent")


def _b3_single(value: str) -> TraceContext | None:
    parts = value.strip(_OWS).split("-")
    if len(parts) < 2:
        return None  # "0"/"1"/"d": a sampling decision only
    trace_id, span_id = _hex(parts[0], (16, 32)), _hex(parts[1], (16,))
    if trace_id is None or span_id is None:
        return None
    sampled = len(parts) < 3 or parts[2] in ("1", "d")
    return TraceContext(trace_id, span_id, sampled, "b3")


def _b3_multi(headers: Mapping[str, str]) -> TraceContext | None:
    trace_id = _hex(headers.get("x-b3-traceid", ""), (16, 32))
    span_id = _hex(headers.get("x-b3-spanid", ""), (16,))
    if trace_id is None or span_id is None:
        return None
    return TraceContext(trace_id, span_id, headers.get("x-b3-sampled", "1") in ("1", "true", "d"), "x-b3")


def _request_id(value: str) -> TraceContext | None:
    trace_id = _hex(value.replace("-", ""), (32,))
    if trace_id is None:
        return None
    return TraceContext(trace_id, None, True, "x-request-id")


def trace_context(headers: Mapping[str, str]) -> TraceContext | None:
    """The trace a request belongs to, from its (lower-case) headers, or None."""
    value = headers.get("traceparent")
    if value and (ctx := _traceparent(value)) is not None:
        state = headers.get("tracestate", "").strip(_OWS)
        return dataclasses.replace(ctx, trace_state=state) if 0 < len(state) <= MAX_TRACE_STATE else ctx
    value = headers.get("b3")
    if value and (ctx := _b3_single(value)) is not None:
        return ctx
    if "x-b3-traceid" in headers and (ctx := _b3_multi(headers)) is not None:
        return ctx
    value = headers.get("x-request-id")
    if value:
        return _request_id(value)
    return None

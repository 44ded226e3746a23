"""Trace context from request headers (otel_envoy.protocols.tracecontext)."""

from __future__ import annotations

import pytest

from otel_envoy.protocols.tracecontext import TraceContext, trace_context

TID = "0af7651916cd43dd8448eb211c80319c"
SID = "b7ad6b7169203331"


def test_traceparent_wins_over_everything_else() -> None:
    ctx = trace_context({"traceparent": f"00-{TID}-{SID}-01", "b3": f"{TID}-00f067aa0ba902b7-1",
                         "x-request-id": "5e6f1a36-4b5c-4f6e-9a8b-0c1d2e3f4a5b"})
    assert ctx == TraceContext(int(TID, 16), int(SID, 16), True, "traceparent")


def test_unsampled_traceparent_keeps_the_flag() -> None:
    assert trace_context({"traceparent": f"00-{TID}-{SID}-00"}).sampled is False  # type: ignore[union-attr]


def test_b3_single_with_64_bit_trace_id() -> None:
    ctx = trace_context({"b3": f"463ac35c9f6413ad-{SID}-1"})
    assert ctx == TraceContext(0x463AC35C9F6413AD, int(SID, 16), True, "b3")


def test_b3_multi_headers_as_istio_sends_them() -> None:
    ctx = trace_context({"x-b3-traceid": TID, "x-b3-spanid": SID, "x-b3-sampled": "0"})
    assert ctx == TraceContext(int(TID, 16), int(SID, 16), False, "x-b3")


def test_request_id_uuid_becomes_a_root_in_its_own_trace() -> None:
    ctx = trace_context({"x-request-id": "5e6f1a36-4b5c-4f6e-9a8b-0c1d2e3f4a5b"})
    assert ctx == TraceContext(0x5E6F1A364B5C4F6E9A8B0C1D2E3F4A5B, None, True, "x-request-id")


@pytest.mark.parametrize("headers", [
    {},
    {"traceparent": "garbage"},
    {"traceparent": f"00-{'0' * 32}-{SID}-01"},  # all-zero trace id is invalid
    {"traceparent": f"00-{TID}-{'0' * 16}-01"},
    {"traceparent": f"ff-{TID}-{SID}-01"},
    {"traceparent": f"00-{TID}-{SID}-01-extra"},
    {"b3": "1"},
    {"b3": "zz-yy"},
    {"x-b3-traceid": TID},
    {"x-request-id": "not-a-uuid"},
])
def test_invalid_or_missing_context_is_none(headers: dict[str, str]) -> None:
    assert trace_context(headers) is None


def test_future_traceparent_version_with_more_fields_is_accepted() -> None:
    assert trace_context({"traceparent": f"01-{TID}-{SID}-01-future"}) is not None

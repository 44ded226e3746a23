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


@pytest.mark.parametrize("headers", [
    {"x-b3-traceid": "-000000000000001", "x-b3-spanid": SID},  # int(x, 16) accepts a sign
    {"x-b3-traceid": "+00000000000000a", "x-b3-spanid": SID},
    {"x-b3-traceid": "0x0000000000000a", "x-b3-spanid": SID},  # ... and a prefix
    {"x-b3-traceid": "0000_0000_00000a", "x-b3-spanid": SID},  # ... and underscores
    {"x-b3-traceid": TID, "x-b3-spanid": "-b7ad6b716920333"},
    {"b3": f"-{TID[1:]}-{SID}-1"},
    {"traceparent": f"00-{TID}-{SID}-zz"},  # flags must be two hex digits
    {"traceparent": f"00-{TID}-{SID}-1"},
    {"traceparent": f"00-{TID.upper()}-{SID}-01"},  # W3C ids are lowercase hex
    {"traceparent": f"0g-{TID}-{SID}-01"},
    {"traceparent": f"00-{TID[:-1]}--{SID}-01"},
    {"traceparent": f"00-{'0' * 32}-{SID}-01"},
    {"traceparent": f"00-{TID}-{'0' * 16}-01"},
    {"x-request-id": "-5e6f1a36-4b5c-4f6e-9a8b-0c1d2e3f4a5"},
])
def test_invalid_values_are_treated_as_absent(headers: dict[str, str]) -> None:
    assert trace_context(headers) is None


def test_an_invalid_traceparent_falls_through_to_the_next_header() -> None:
    ctx = trace_context({"traceparent": f"00-{TID}-{SID}-zz", "x-b3-traceid": TID, "x-b3-spanid": SID})
    assert ctx is not None and ctx.source == "x-b3"


def test_every_id_it_returns_fits_its_field() -> None:
    """Whatever the header, a trace id is 1..2^128-1 and a span id 1..2^64-1 (the encoders' ranges)."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    alphabet = st.sampled_from("0123456789abcdefABCDEF-+_x ")
    value = st.text(alphabet, max_size=60)

    @settings(max_examples=3000, deadline=None)
    @given(st.dictionaries(st.sampled_from(["traceparent", "b3", "x-b3-traceid", "x-b3-spanid",
                                            "x-request-id"]), value))
    def check(headers: dict[str, str]) -> None:
        ctx = trace_context(headers)
        if ctx is not None:
            assert 0 < ctx.trace_id < 2**128
            assert ctx.parent_span_id is None or 0 < ctx.parent_span_id < 2**64

    check()


def test_a_control_character_inside_a_traceparent_id_makes_it_invalid() -> None:
    """Found by the header fuzzer: str.strip() took \\x1f for a blank, so this traceparent was accepted."""
    from otel_envoy.protocols.tracecontext import trace_context as parse

    assert parse({"traceparent": "00-\x1f00000000000000000000000000000001-0000000000000001-00"}) is None
    assert parse({"traceparent": "00-0af7651916cd43dd8448eb211c80319c-\x1cb7ad6b716920333-01"}) is None
    assert parse({"x-b3-traceid": "\x1f80f198ee56343ba8", "x-b3-spanid": "e457b5a2e4d86bd1"}) is None
    ok = parse({"traceparent": " 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\t"})
    assert ok is not None and ok.source == "traceparent"  # spaces and tabs around the value are fine

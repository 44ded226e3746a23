"""Property tests: whatever trace-context headers and header blocks arrive, the header parsers never raise,
an id they return is one OTLP can carry (hex of its exact length, not zero: invalid values are treated as
absent), and no header value other than the kept ones (Authorization, Cookie...) leaves the HTTP/1 parser."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from otel_envoy.protocols.http import KEPT_HEADERS, MAX_HEADER_VALUE
from otel_envoy.protocols.http1 import Http1Exchanges
from otel_envoy.protocols.tracecontext import MAX_TRACE_STATE, trace_context
from tests.fuzz.fuzz_settings import FUZZ

SECRET = "s3cret-fuzz-value"
TRACE_HEADERS = ["traceparent", "tracestate", "b3", "x-b3-traceid", "x-b3-spanid", "x-b3-sampled",
                 "x-request-id"]
VALID = {
    "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    "b3": "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1",
    "x-b3-traceid": "80f198ee56343ba864fe8b2a57d3eff7",
    "x-b3-spanid": "e457b5a2e4d86bd1",
    "x-request-id": "3e1a4b9c-6f0d-4e2a-9b7c-1d2e3f405162",
}
# header values arrive as latin-1 text: every code point 0-255
LATIN1 = st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=255), max_size=80)
HEXISH = st.text(alphabet="0123456789abcdefABCDEF-+_ x0\t", max_size=70)


@st.composite
def mutated(draw: st.DrawFn, value: str) -> str:
    """A valid value with a few characters replaced, inserted or deleted."""
    chars = list(value)
    for _ in range(draw(st.integers(0, 4))):
        op = draw(st.sampled_from(["replace", "insert", "delete"]))
        i = draw(st.integers(0, max(len(chars) - 1, 0)))
        c = draw(st.characters(min_codepoint=0, max_codepoint=255))
        if op == "replace" and chars:
            chars[i] = c
        elif op == "insert":
            chars.insert(i, c)
        elif chars:
            del chars[i]
    return "".join(chars)


def header_values() -> st.SearchStrategy[dict[str, str]]:
    value = st.one_of(LATIN1, HEXISH, *(mutated(v) for v in VALID.values()),
                      st.sampled_from(list(VALID.values())))
    return st.dictionaries(st.sampled_from(TRACE_HEADERS), value, max_size=len(TRACE_HEADERS))


@FUZZ
@given(header_values())
def test_trace_context_never_raises_and_returns_only_ids_otlp_carries(headers: dict[str, str]) -> None:
    ctx = trace_context(headers)
    if ctx is None:
        return
    assert 0 < ctx.trace_id < 1 << 128
    assert ctx.parent_span_id is None or 0 < ctx.parent_span_id < 1 << 64
    assert ctx.source in ("traceparent", "b3", "x-b3", "x-request-id")
    assert len(ctx.trace_state) <= MAX_TRACE_STATE
    # the span builder writes them as fixed-width lower-case hex: what span_ids_valid requires
    assert len(f"{ctx.trace_id:032x}") == 32
    if ctx.source == "traceparent":  # a traceparent is used only when it is exactly right
        parts = headers["traceparent"].strip().split("-")
        assert int(parts[1], 16) == ctx.trace_id and parts[1] == parts[1].lower()


LINE = st.binary(max_size=60).filter(lambda b: b"\r" not in b and b"\n" not in b)


@st.composite
def request_bytes(draw: st.DrawFn) -> bytes:
    """A request with fuzzed header lines among real ones carrying secrets."""
    secret = SECRET.encode()
    lines = [b"GET /p?token=" + secret + b" HTTP/1.1", b"Host: h", b"Authorization: Bearer " + secret,
             b"Cookie: c=" + secret]
    for _ in range(draw(st.integers(0, 6))):
        name = draw(st.sampled_from([b"traceparent", b"b3", b"x-request-id", b"user-agent", b"X-B3-TraceId",
                                     b"set-cookie", b"x-other", b""]))
        lines.insert(draw(st.integers(1, len(lines))), name + b":" + draw(LINE))
    if draw(st.booleans()):
        lines.insert(draw(st.integers(1, len(lines))), draw(LINE))  # a line that is no header at all
    return b"\r\n".join(lines) + b"\r\n\r\n"


@FUZZ
@given(request_bytes(), st.lists(st.integers(1, 64), min_size=1, max_size=8),
       st.integers(0, 3000), st.booleans())
def test_http1_header_blocks_never_raise_and_never_let_a_secret_out(raw: bytes, cuts: list[int], gap: int,
                                                                   pipelined: bool) -> None:
    x = Http1Exchanges(requests_read=True)
    data = raw + (raw if pipelined else b"")
    pos, ts = 0, 1
    for n in cuts:
        piece = data[pos:pos + n]
        x.on_read(ts, piece, len(piece) + (gap if ts == 2 else 0), tid=1, round_=ts)
        pos, ts = pos + n, ts + 1
    x.on_read(ts, data[pos:], len(data) - pos, tid=1, round_=ts)
    answer = b"HTTP/1.1 200 OK\r\nSet-Cookie: s=" + SECRET.encode() + b"\r\nContent-Length: 0\r\n\r\n"
    x.on_write(ts + 1, answer, len(answer), tid=1, round_=ts + 1)
    messages = [m for e in x.finish(ts + 2) for m in (e.request, e.response) if m is not None]
    for m in messages:
        assert set(m.headers) <= KEPT_HEADERS
        assert all(len(v) <= MAX_HEADER_VALUE for v in m.headers.values())
        for k, v in m.headers.items():  # a kept header may carry anything, but only its own value
            assert SECRET not in v or k in ("traceparent", "b3", "x-request-id", "user-agent", "x-b3-traceid",
                                            "tracestate", "x-b3-spanid", "x-b3-sampled")
        assert m.path is None or SECRET not in m.path  # the query never leaves
        trace_context(m.headers)  # never raises on what the parser kept

"""The first bytes of a request the kernel kept (a 5xx, closed, or slow request that was not traced)."""

from __future__ import annotations

from otel_envoy.protocols.request_head import parse_request_head

TP = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def test_a_head_cut_in_a_header_keeps_the_complete_kept_headers_only() -> None:
    head = parse_request_head(b"GET /a/b?token=1 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer s3cret\r\n"
                              b"traceparent: " + TP.encode() + b"\r\nUser-Ag")
    assert (head.method, head.path, head.version, head.complete) == ("GET", "/a/b", "1.1", False)
    assert head.headers == {"traceparent": TP}  # no Authorization, no half header, no query
    assert "s3cret" not in repr(head)


def test_a_whole_head() -> None:
    head = parse_request_head(b"POST /x HTTP/1.0\r\nUser-Agent: curl/8\r\n\r\n")
    assert (head.method, head.path, head.version, head.complete) == ("POST", "/x", "1.0", True)
    assert head.headers == {"user-agent": "curl/8"}


def test_a_request_line_cut_short_gives_what_it_has() -> None:
    head = parse_request_head(b"GET /very/long/pa")
    assert (head.method, head.path, head.version, head.complete) == ("GET", "/very/long/pa", None, False)


def test_bytes_that_are_no_request_are_an_error_not_an_exception() -> None:
    head = parse_request_head(b"\x16\x03\x01\x02\x00garbage")
    assert head.method is None and head.path is None and head.error


def test_any_bytes_never_raise() -> None:
    import random

    rng = random.Random(7)
    for _ in range(2000):
        parse_request_head(bytes(rng.randrange(256) for _ in range(rng.randrange(0, 160))))


TP = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def test_the_kernels_trace_context_bytes_give_traceparent_and_the_tracestate_after_it() -> None:
    from otel_envoy.protocols.request_head import trace_context_headers

    assert trace_context_headers(f"{TP}\r\nTraceState: k=v,a=b \r\nhost: x\r\n".encode()) == {
        "traceparent": TP, "tracestate": "k=v,a=b"}
    assert trace_context_headers(f"{TP}\r\nx-other: 1\r\ntracestate: k=v\r\n".encode()) == {"traceparent": TP}
    assert trace_context_headers(f"{TP}\r\ntracestate: k=v,cut-by-the-end".encode()) == {"traceparent": TP}
    assert trace_context_headers(TP[:40].encode()) == {}  # fewer bytes than a value: none
    assert trace_context_headers(b"") == {}

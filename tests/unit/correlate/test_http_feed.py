"""The HTTP parser a connection gets from its first bytes (correlate/http_feed.py)."""

from __future__ import annotations

from otel_envoy.correlate.http_feed import downstream_parser, upstream_parser
from otel_envoy.protocols.http1 import Http1Exchanges
from otel_envoy.protocols.http2 import PREFACE, Http2Exchanges

GET = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"


def test_downstream_parsers_read_requests_and_take_http2_after_the_preface() -> None:
    h2 = downstream_parser(PREFACE)
    assert isinstance(h2, Http2Exchanges)
    h1 = downstream_parser(GET)
    assert isinstance(h1, Http1Exchanges) and h1.requests_read and h1.h2c_handoff
    assert isinstance(downstream_parser(b""), Http1Exchanges)  # nothing captured: HTTP/1 tries


def test_upstream_parsers_only_for_a_request_envoy_wrote() -> None:
    assert isinstance(upstream_parser(PREFACE), Http2Exchanges)
    h1 = upstream_parser(GET)
    assert isinstance(h1, Http1Exchanges) and not h1.requests_read
    assert isinstance(upstream_parser(b"P"), Http1Exchanges)  # too little to tell HTTP/2 from a POST
    assert upstream_parser(b"\x16\x03\x01") is None  # TLS
    assert upstream_parser(b"") is None  # nothing captured

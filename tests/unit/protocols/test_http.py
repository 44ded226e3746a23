"""The protocol-neutral HTTP records (otel_envoy.protocols.http): what a request path keeps."""

from __future__ import annotations

import pytest

from otel_envoy.protocols.http import MAX_HEADER_VALUE, HttpExchange, HttpMessage, request_path


@pytest.mark.parametrize(("target", "path"), [
    ("/a/b?token=secret", "/a/b"),
    ("/a#frag?x", "/a"),
    ("/a?x#y", "/a"),
    ("http://h.example:8080/p/q?x=1", "/p/q"),  # absolute form (a proxy request): the path part only
    ("http://h.example", "/"),
    ("*", "*"),
    ("", ""),
])
def test_request_path_drops_query_and_fragment(target: str, path: str) -> None:
    assert request_path(target) == path


def test_request_path_is_bounded() -> None:
    assert request_path("/" + "p" * 5000) == "/" + "p" * (MAX_HEADER_VALUE - 1)


def test_an_exchange_links_request_and_response() -> None:
    req, resp = HttpMessage(start_ns=1, method="GET", path="/"), HttpMessage(start_ns=2, status=200)
    req.response = resp
    exchange = HttpExchange(req, resp)
    assert exchange.request.response is exchange.response and exchange.request.headers == {}

"""Requests on downstream connections (correlate/downstream_requests.py)."""

from __future__ import annotations

from tests.support.correlation import Harness
from tests.support.events import EPOLL_CTL_ADD, accept, close, epoll, established, read, write


def test_requests_are_parsed_after_a_listener_filter_peeked_the_first_bytes() -> None:
    """An http_inspector-like peek before the first real read must not stop request parsing."""
    requests: list[tuple[str | None, int | None]] = []
    h = Harness(on_request=lambda rr, ex: requests.append(
        (ex.request.path, ex.response.status if ex.response else None)))
    req = b"GET /peeked HTTP/1.1\r\nHost: lab\r\n\r\n"
    resp = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    h.feed([
        established(1_000, 40000), accept(2_000, 30, 40000), epoll(3_000, 30, EPOLL_CTL_ADD),
        read(4_000, 30, req, peek=True), epoll(5_000, 30, EPOLL_CTL_ADD),
        read(6_000, 30, req), write(7_000, 30, resp), close(8_000, 30, rx=len(req), tx=len(resp)),
    ])
    assert requests == [("/peeked", 200)]
    assert h.only().http.count == 1

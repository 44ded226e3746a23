"""Requests on downstream connections (correlate/downstream_requests.py)."""

from __future__ import annotations

from tests.support.correlation import Harness
from tests.support.events import accept, close, established, read, write


def test_requests_are_parsed_after_a_listener_filter_peeked_the_first_bytes() -> None:
    """An http_inspector-like peek before the first real read must not stop request parsing."""
    requests: list[tuple[str | None, int | None]] = []
    h = Harness(on_request=lambda rr, ex: requests.append(
        (ex.request.path, ex.response.status if ex.response else None)))
    req = b"GET /peeked HTTP/1.1\r\nHost: lab\r\n\r\n"
    resp = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    h.feed([
        established(1_000, 40000), accept(2_000, 30, 40000), read(4_000, 30, req, peek=True),
        read(6_000, 30, req), write(7_000, 30, resp),
        close(8_000, 30, rx=len(req), tx=len(resp), epoll_adds=(3_000, 5_000)),
    ])
    assert requests == [("/peeked", 200)]
    assert h.only().http.count == 1


def test_a_lost_record_ends_the_exchange_in_flight_and_later_requests_pair_right() -> None:
    """Keep-alive: /a, /b, /c, and the record of /a's response is lost (the kernel dropped it: its msg_seq is
    skipped). /a ends without a response, marked records_lost; /b and /c keep their own responses (before,
    /b got /c's 500 and /c none)."""
    seen: list[tuple[str | None, int | None, bool]] = []
    h = Harness(on_request=lambda rr, ex: seen.append(
        (ex.request.path, ex.response.status if ex.response else None, ex.request.records_lost)))

    def req(path: str) -> bytes:
        return f"GET {path} HTTP/1.1\r\nHost: lab\r\n\r\n".encode()

    def resp(status: int) -> bytes:
        return f"HTTP/1.1 {status} X\r\nContent-Length: 0\r\n\r\n".encode()

    events = [established(1_000, 40001), accept(2_000, 31, 40001),
              read(3_000, 31, req("/a")), write(4_000, 31, resp(200)),
              read(5_000, 31, req("/b")), write(6_000, 31, resp(404)),
              read(7_000, 31, req("/c")), write(8_000, 31, resp(500)), close(9_000, 31)]
    del events[3]  # /a's response: msg_seq 1 never arrives
    h.feed(events)
    assert seen == [("/a", None, True), ("/b", 404, False), ("/c", 500, False)]
    assert h.c.drops["data_records_lost"] == 1
    assert "records_lost" in h.only().partial


def test_a_lost_record_inside_a_response_body_resyncs_at_the_next_response() -> None:
    """The lost record is the middle of /a's chunked body: the rest of that body is skipped, not parsed as a
    response; /b pairs with its own."""
    seen: list[tuple[str | None, int | None]] = []
    h = Harness(on_request=lambda rr, ex: seen.append(
        (ex.request.path, ex.response.status if ex.response else None)))
    events = [established(1_000, 40002), accept(2_000, 32, 40002),
              read(3_000, 32, b"GET /a HTTP/1.1\r\nHost: lab\r\n\r\n"),
              write(4_000, 32, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"),
              write(5_000, 32, b"5\r\nworld\r\n"),
              write(6_000, 32, b"3\r\nend\r\n0\r\n\r\n"),
              read(7_000, 32, b"GET /b HTTP/1.1\r\nHost: lab\r\n\r\n"),
              write(8_000, 32, b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n"), close(9_000, 32)]
    del events[4]  # the second chunk's record
    h.feed(events)
    assert seen == [("/a", None), ("/b", 201)]


def test_requests_in_flight_on_an_evicted_connection_become_spans_and_are_counted() -> None:
    seen: list[tuple[str, object, bool]] = []
    h = Harness(max_connections=1, on_request=lambda rr, ex: seen.append(
        (rr.request.path, ex.response.status if ex.response else None, rr.request.records_lost)))
    h.feed([established(1_000, 40001), accept(2_000, 30, 40001),
            read(3_000, 30, b"GET /slow HTTP/1.1\r\nHost: a\r\n\r\n"),
            established(4_000, 40002), accept(5_000, 31, 40002)])  # the table holds one: 30 is evicted
    assert seen == [("/slow", None, True)]
    assert h.c.drops["requests_in_flight_evicted"] == 1 and h.c.drops["connection_table_full"] == 1

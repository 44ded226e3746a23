"""HTTP/1.x exchange parsing from syscall-sized pieces of bytes (otel_envoy.protocols.http1)."""

from __future__ import annotations

from otel_envoy.protocols.http1 import Http1Exchanges

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def feed_read(x: Http1Exchanges, ts: int, data: bytes, total: int | None = None) -> None:
    x.on_read(ts, data, len(data) if total is None else total, tid=7, round_=ts)


def feed_write(x: Http1Exchanges, ts: int, data: bytes, total: int | None = None) -> None:
    x.on_write(ts, data, len(data) if total is None else total, tid=7, round_=ts)


def test_keep_alive_requests_pair_with_responses_and_keep_only_allowed_headers() -> None:
    x = Http1Exchanges(requests_read=True)
    feed_read(x, 1, b"GET /a/b?token=secret HTTP/1.1\r\nHost: h\r\nAuthorization: Bearer s3cret\r\n"
                    b"Cookie: c=1\r\nUser-Agent: curl/8\r\ntraceparent: " + TRACEPARENT.encode() + b"\r\n"
                    b"X-Request-Id: abc\r\n\r\n")
    feed_write(x, 2, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nSet-Cookie: s=1\r\n\r\nok")
    feed_read(x, 3, b"GET /second HTTP/1.1\r\n\r\n")
    feed_write(x, 4, b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
    done = x.take_completed()
    assert [(e.request.method, e.request.path, e.response.status) for e in done if e.response] == [
        ("GET", "/a/b", 200), ("GET", "/second", 404)]
    first = done[0]
    assert first.request.headers == {
        "user-agent": "curl/8", "traceparent": TRACEPARENT, "x-request-id": "abc"}
    assert "set-cookie" not in first.response.headers
    assert (first.request.start_ns, first.response.end_ns, first.response.body_bytes) == (1, 2, 2)
    assert first.request.version == "1.1" and first.request.tid == 7 and first.request.round == 1


def test_pipelined_requests_in_one_read_each_get_their_response() -> None:
    x = Http1Exchanges(requests_read=True)
    feed_read(x, 1, b"GET /1 HTTP/1.1\r\n\r\nGET /2 HTTP/1.1\r\n\r\nGET /3 HTTP/1.1\r\n\r\n")
    feed_write(x, 2, b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\na")
    feed_write(x, 3, b"HTTP/1.1 201 OK\r\nContent-Length: 1\r\n\r\nb"
                     b"HTTP/1.1 202 OK\r\nContent-Length: 1\r\n\r\nc")
    done = x.take_completed()
    assert [(e.request.path, e.response.status, e.response.end_ns) for e in done] == [
        ("/1", 200, 2), ("/2", 201, 3), ("/3", 202, 3)]


def test_request_split_across_many_reads_starts_at_the_first_byte() -> None:
    x = Http1Exchanges(requests_read=True)
    raw = b"POST /upload HTTP/1.1\r\nContent-Length: 10\r\nUser-Agent: split\r\n\r\n0123456789"
    for i in range(0, len(raw), 7):
        feed_read(x, 100 + i, raw[i:i + 7])
    feed_write(x, 1000, b"HTTP/1.1 204 No Content\r\n\r\n")
    (e,) = x.take_completed()
    assert e.request.start_ns == 100 and e.request.end_ns == 100 + (len(raw) - 1) // 7 * 7
    assert e.request.body_bytes == 10 and e.request.headers["user-agent"] == "split"


def test_chunked_response_and_100_continue() -> None:
    x = Http1Exchanges(requests_read=True)
    feed_read(x, 1, b"POST / HTTP/1.1\r\nExpect: 100-continue\r\nTransfer-Encoding: chunked\r\n\r\n")
    feed_write(x, 2, b"HTTP/1.1 100 Continue\r\n\r\n")
    feed_read(x, 3, b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
    feed_write(x, 4, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
    (e,) = x.take_completed()
    assert e.request.body_bytes == 11 and e.response.status == 200 and e.response.body_bytes == 3


def test_capture_gap_inside_a_body_keeps_the_count() -> None:
    x = Http1Exchanges(requests_read=True)
    feed_read(x, 1, b"GET /big HTTP/1.1\r\n\r\n")
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n"
    feed_write(x, 2, head + b"x" * 100, total=len(head) + 100000)
    (e,) = x.take_completed()
    assert e.response.body_bytes == 100000 and e.response.error is None


CAPTURE = 256  # bytes captured per syscall in these tests; the rest of each write is a capture gap


def _write_captured(x: Http1Exchanges, ts: int, data: bytes) -> None:
    feed_write(x, ts, data[:CAPTURE], total=len(data))


def _chunk(n: int, fill: bytes = b"y") -> bytes:
    return b"%x\r\n" % n + fill * n + b"\r\n"


def test_a_gap_inside_a_chunked_body_is_skipped_and_later_exchanges_stay_right() -> None:
    """Envoy writes whole chunks; each write larger than the capture hides its chunk's CRLF in the gap.
    Zeros in its place used to make the 200 an error and leave every later request unanswered."""
    x = Http1Exchanges(requests_read=True)
    feed_read(x, 1, b"GET /big HTTP/1.1\r\n\r\n")
    _write_captured(x, 2, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + _chunk(16384))
    _write_captured(x, 3, _chunk(16384))
    _write_captured(x, 4, _chunk(1000) + _chunk(2000))  # two chunks in one write: the second hides in the gap
    feed_write(x, 5, b"0\r\n\r\n")
    feed_read(x, 6, b"GET /next HTTP/1.1\r\n\r\n")
    feed_write(x, 7, b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
    done = x.take_completed()
    assert [(e.request.path, e.response.status) for e in done] == [("/big", 200), ("/next", 404)]
    big = done[0].response
    assert big.error is None and big.capture_gap and big.end_ns == 5
    assert done[1].response.error is None and not done[1].response.capture_gap and x.error is None


def test_a_chunked_body_whose_end_is_in_the_gap_ends_at_its_last_write() -> None:
    x = Http1Exchanges(requests_read=True)
    feed_read(x, 1, b"GET /big HTTP/1.1\r\n\r\n")
    _write_captured(x, 2, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + _chunk(8000))
    _write_captured(x, 3, _chunk(8000) + b"0\r\n\r\n")  # the last chunk is in the gap
    feed_read(x, 4, b"GET /b HTTP/1.1\r\n\r\n")
    feed_write(x, 5, b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n")
    feed_read(x, 6, b"GET /c HTTP/1.1\r\n\r\n")
    feed_write(x, 7, b"HTTP/1.1 204 No Content\r\n\r\n")
    done = x.take_completed()
    assert [(e.request.path, e.response.status, e.response.end_ns) for e in done] == [
        ("/big", 200, 3), ("/b", 500, 5), ("/c", 204, 7)]
    assert done[0].response.capture_gap and x.error is None


def test_a_write_that_continues_a_chunk_and_ends_the_body_is_seen() -> None:
    x = Http1Exchanges(requests_read=True)
    feed_read(x, 1, b"GET /big HTTP/1.1\r\n\r\n")
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    _write_captured(x, 2, head + b"4000\r\n" + b"z" * 9000)
    feed_write(x, 3, b"z" * 100 + b"\r\n0\r\n\r\n")  # a partial write's rest: chunk data, then the end
    (e,) = x.take_completed()
    assert e.response.status == 200 and e.response.end_ns == 3 and e.response.capture_gap


def test_a_chunked_upload_larger_than_the_capture_keeps_the_requests_after_it() -> None:
    x = Http1Exchanges(requests_read=True)
    head = b"POST /upload HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
    feed_read(x, 1, (head + _chunk(5000))[:CAPTURE], total=len(head) + len(_chunk(5000)))
    feed_read(x, 2, b"0\r\n\r\n")
    feed_write(x, 3, b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n")
    feed_read(x, 4, b"GET /after HTTP/1.1\r\n\r\n")
    feed_write(x, 5, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    done = x.take_completed()
    assert [(e.request.path, e.response.status) for e in done] == [("/upload", 201), ("/after", 200)]
    assert done[0].request.capture_gap and done[0].request.end_ns == 2


def test_a_content_length_body_that_ends_inside_the_gap_resumes_at_the_next_message() -> None:
    """A write carrying the end of one response and the start of the next (pipelining): the second's start
    was not captured, so it is lost, but the third pairs right instead of the stream failing."""
    x = Http1Exchanges(requests_read=True)
    feed_read(x, 1, b"GET /1 HTTP/1.1\r\n\r\nGET /2 HTTP/1.1\r\n\r\n")
    first = b"HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\n" + b"a" * 5000
    second = b"HTTP/1.1 202 OK\r\nContent-Length: 0\r\n\r\n"
    _write_captured(x, 2, first + second)
    feed_read(x, 3, b"GET /3 HTTP/1.1\r\n\r\n")
    feed_write(x, 4, b"HTTP/1.1 203 OK\r\nContent-Length: 0\r\n\r\n")
    done = x.take_completed()
    assert [(e.request.path, e.response.status) for e in done] == [("/1", 200), ("/2", None), ("/3", 203)]
    assert done[0].response.body_bytes == 5000 and not done[0].response.capture_gap
    assert done[1].response.capture_gap and done[1].response.error is None  # answered, uncaptured
    assert x.error is None


def test_a_content_length_body_that_ends_with_its_gap_goes_on_as_before() -> None:
    x = Http1Exchanges(requests_read=True)
    feed_read(x, 1, b"GET /1 HTTP/1.1\r\n\r\n")
    _write_captured(x, 2, b"HTTP/1.1 200 OK\r\nContent-Length: 70000\r\n\r\n" + b"a" * 70000)
    feed_read(x, 3, b"GET /2 HTTP/1.1\r\n\r\n")
    feed_write(x, 4, b"HTTP/1.1 201 OK\r\nContent-Length: 0\r\n\r\n")
    done = x.take_completed()
    assert [(e.request.path, e.response.status, e.response.end_ns) for e in done] == [("/1", 200, 2),
                                                                                      ("/2", 201, 4)]
    assert done[0].response.body_bytes == 70000 and not done[0].response.capture_gap


def test_malformed_request_line_is_an_error_and_parsing_stops() -> None:
    x = Http1Exchanges(requests_read=True)
    feed_read(x, 1, b"GE\x01T / HTTP/1.1\r\n\r\n")
    feed_write(x, 2, b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
    feed_read(x, 3, b"GET / HTTP/1.1\r\n\r\n")  # ignored: the stream is out of sync
    (e,) = x.take_completed()
    assert e.request.error and "malformed HTTP/1 request" in e.request.error
    assert e.response is not None and e.response.status == 400
    assert x.error == e.request.error


def test_garbage_bytes_never_raise() -> None:
    x = Http1Exchanges(requests_read=True)
    for i, chunk in enumerate([b"\x00\xff" * 50, b"\r\n\r\n", bytes(range(256))]):
        feed_read(x, i, chunk)
        feed_write(x, i, chunk)
    assert x.error is not None


def test_connection_end_closes_pending_requests() -> None:
    x = Http1Exchanges(requests_read=True)
    feed_read(x, 1, b"GET /slow HTTP/1.1\r\n\r\n")
    feed_write(x, 2, b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    (e,) = x.finish(9)
    assert e.request.path == "/slow" and e.response is not None
    assert e.response.error and e.response.end_ns == 9


def test_upstream_view_writes_requests_and_reads_responses() -> None:
    x = Http1Exchanges(requests_read=False)
    feed_write(x, 1, b"GET /up HTTP/1.1\r\nx-request-id: r1\r\n\r\n")
    feed_read(x, 2, b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n")
    (e,) = x.take_completed()
    assert (e.request.path, e.request.headers["x-request-id"], e.response.status) == ("/up", "r1", 503)


def test_upgrade_to_h2c_stops_http1_parsing() -> None:
    x = Http1Exchanges(requests_read=True)
    feed_read(x, 1, b"GET / HTTP/1.1\r\nHost: h\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
                    b"HTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n\r\n")
    feed_write(x, 2, b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n"
                     b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
    (e,) = x.take_completed()
    assert e.request.upgrade and e.response.status == 101
    assert x.upgraded and x.error is None


def test_a_long_keep_alive_connection_keeps_nothing_per_finished_request() -> None:
    """Only requests are handed out when their headers complete: a list of response header blocks that
    nobody takes would grow by about 570 bytes per request on a keep-alive connection."""
    ex = Http1Exchanges(requests_read=True)
    for i in range(2000):
        ex.on_read(i * 10, b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n", 27)
        ex.take_new_requests()
        ex.on_write(i * 10 + 5, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", 40)
        assert len(ex.take_completed()) == 1
    assert ex._requests.headers_done == [] and ex._responses.headers_done == []
    assert not ex._pending and not ex._requests.done and not ex._responses.done


def test_a_request_that_fails_inside_its_header_block_keeps_its_path_not_its_query() -> None:
    """Found by the header fuzzer: the raw target (query included) was the failed request's path."""
    x = Http1Exchanges(requests_read=True)
    feed_read(x, 1, b"GET /p?token=secret HTTP/1.1\r\n\x00\r\nHost: h\r\n\r\n")
    (e,) = x.finish(2)
    assert e.request.error and e.request.path == "/p"

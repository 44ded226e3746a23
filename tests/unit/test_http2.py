"""HTTP/2 cleartext exchange parsing from syscall-sized pieces of bytes (otel_envoy.protocols.http2).

Frames are built here with ``struct`` and the ``hpack`` encoder (one encoder per direction, as a real peer
keeps one), so the bytes are what a real HTTP/2 stack would send; no network is needed.
"""

from __future__ import annotations

import itertools
import logging
import struct
from collections.abc import Iterable

import hpack
import pytest
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from otel_envoy.protocols.http import HttpExchange
from otel_envoy.protocols.http1 import Http1Exchanges
from otel_envoy.protocols.http2 import MAX_STREAMS, Http2Exchanges, is_h2_preface
from otel_envoy.protocols.http2_frames import PREFACE

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
SECRETS = ("Bearer s3cret-token", "session=c00kie-secret", "sid=set-c00kie-secret", "s3cr3t-query")

DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = (
    range(10))
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY_FLAG = 0x1, 0x1, 0x4, 0x8, 0x20

# --------------------------------------------------------------------------------------------------
# Frame builders (independent of the module under test)
# --------------------------------------------------------------------------------------------------


def frame(ftype: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([ftype, flags]) + struct.pack(">I", sid) + payload


def settings(**values: int) -> bytes:
    ids = {"header_table_size": 1, "max_concurrent_streams": 3, "initial_window_size": 4, "max_frame_size": 5}
    return frame(SETTINGS, 0, 0, b"".join(struct.pack(">HI", ids[k], v) for k, v in values.items()))


SETTINGS_ACK = frame(SETTINGS, ACK, 0)


class Peer:
    """One side of a connection: its HPACK encoder, so the dynamic table evolves as in a real stack."""

    def __init__(self) -> None:
        self.enc = hpack.Encoder()

    def block(self, fields: Iterable[tuple[str, str]]) -> bytes:
        return self.enc.encode(list(fields))

    def headers(self, sid: int, fields: Iterable[tuple[str, str]], *, end_stream: bool = False) -> bytes:
        return frame(HEADERS, END_HEADERS | (END_STREAM if end_stream else 0), sid, self.block(fields))


def data(sid: int, body: bytes, *, end_stream: bool = False, pad: int | None = None) -> bytes:
    if pad is None:
        return frame(DATA, END_STREAM if end_stream else 0, sid, body)
    return frame(DATA, PADDED | (END_STREAM if end_stream else 0), sid, bytes([pad]) + body + bytes(pad))


def rst(sid: int, code: int) -> bytes:
    return frame(RST_STREAM, 0, sid, struct.pack(">I", code))


def get(path: str, **extra: str) -> list[tuple[str, str]]:
    return [(":method", "GET"), (":scheme", "http"), (":authority", "h.example"), (":path", path),
            *extra.items()]


def status(code: int, **extra: str) -> list[tuple[str, str]]:
    return [(":status", str(code)), *extra.items()]


def read(x: Http2Exchanges | Http1Exchanges, ts: int, raw: bytes, total: int | None = None) -> None:
    x.on_read(ts, raw, len(raw) if total is None else total, tid=7, round_=ts)


def write(x: Http2Exchanges | Http1Exchanges, ts: int, raw: bytes, total: int | None = None) -> None:
    x.on_write(ts, raw, len(raw) if total is None else total, tid=9, round_=ts)


def summary(done: list[HttpExchange]) -> list[tuple]:
    out = []
    for e in done:
        q, r = e.request, e.response
        out.append((q.method, q.path, q.body_bytes, q.error, q.headers,
                    None if r is None else (r.status, r.body_bytes, r.error, r.headers)))
    return out


def client_start() -> bytes:
    return PREFACE + settings(initial_window_size=65535)


def server_start() -> bytes:
    return settings(max_concurrent_streams=100) + SETTINGS_ACK

# --------------------------------------------------------------------------------------------------
# Requests and responses
# --------------------------------------------------------------------------------------------------


def test_get_and_post_interleaved_on_two_streams() -> None:
    c, s = Peer(), Peer()
    x = Http2Exchanges(requests_read=True)
    read(x, 1, client_start() + c.headers(1, get("/a/b?token=s3cr3t-query", **{"user-agent": "curl/8"}),
                                          end_stream=True))
    read(x, 2, c.headers(3, [(":method", "POST"), (":scheme", "http"), (":authority", "h"),
                             (":path", "/upload#frag"), ("traceparent", TRACEPARENT),
                             ("x-request-id", "rid-1"), ("content-length", "15")]) + data(3, b"0123456789"))
    new = x.take_new_requests()
    assert [(m.method, m.path, m.headers_done_ns) for m in new] == [
        ("GET", "/a/b", 1), ("POST", "/upload", 2)]
    assert x.in_flight() is new[0]
    write(x, 3, server_start() + ping_and_window_update() + s.headers(3, status(201)))
    read(x, 4, data(3, b"abcde", end_stream=True))
    write(x, 5, s.headers(1, status(200, **{"content-length": "5"})) + data(1, b"hello", end_stream=True))
    assert [e.request.path for e in x.take_completed()] == ["/a/b"]  # h2 completes in any order
    write(x, 6, data(3, b"", end_stream=True))
    (post,) = x.take_completed()
    q, r = post.request, post.response
    assert (q.method, q.body_bytes, q.version, q.start_ns, q.end_ns, q.tid, q.round) == (
        "POST", 15, "2", 2, 4, 7, 2)
    assert q.headers == {"traceparent": TRACEPARENT, "x-request-id": "rid-1", "content-length": "15"}
    assert r is not None and q.response is r
    assert (r.status, r.body_bytes, r.start_ns, r.headers_done_ns, r.end_ns, r.tid, r.version) == (
        201, 0, 3, 3, 6, 9, "2")
    assert x.error is None and x.finish(7) == [] and not x.upgraded


def ping_and_window_update() -> bytes:
    return (frame(PING, 0, 0, bytes(8)) + frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", 1 << 20))
            + frame(PRIORITY, 0, 3, struct.pack(">IB", 0, 15)) + frame(0xFA, 0, 0, b"unknown type"))


def test_responses_in_reverse_order_complete_in_that_order() -> None:
    c, s = Peer(), Peer()
    x = Http2Exchanges(requests_read=True)
    read(x, 1, client_start() + b"".join(c.headers(sid, get(f"/r{sid}"), end_stream=True)
                                         for sid in (1, 3, 5, 7)))
    write(x, 2, server_start())
    for ts, sid in enumerate((7, 5, 3, 1), start=3):
        write(x, ts, s.headers(sid, status(200 + sid)) + data(sid, b"x" * sid, end_stream=True))
    done = x.take_completed()
    assert [(e.request.path, e.response.status, e.response.body_bytes, e.response.end_ns) for e in done] == [
        ("/r7", 207, 7, 3), ("/r5", 205, 5, 4), ("/r3", 203, 3, 5), ("/r1", 201, 1, 6)]
    assert x.in_flight() is None


def test_continuation_frames_complete_the_header_block() -> None:
    c, s = Peer(), Peer()
    x = Http2Exchanges(requests_read=True)
    block = c.block(get("/cont", **{"user-agent": "split-agent", "traceparent": TRACEPARENT}))
    a, b = block[:5], block[5:]
    read(x, 1, client_start() + frame(HEADERS, END_STREAM, 1, a))
    assert x.take_new_requests() == []
    read(x, 2, frame(CONTINUATION, 0, 1, b[:3]))
    read(x, 3, frame(CONTINUATION, END_HEADERS, 1, b[3:]))
    (req,) = x.take_new_requests()
    assert (req.path, req.start_ns, req.headers_done_ns, req.headers_round, req.end_ns) == (
        "/cont", 1, 3, 3, 3)
    assert req.headers == {"user-agent": "split-agent", "traceparent": TRACEPARENT}
    write(x, 4, server_start() + s.headers(1, status(204), end_stream=True))
    (e,) = x.take_completed()
    assert e.response.status == 204 and e.response.end_ns == 4


def test_other_frame_inside_a_header_block_is_an_error() -> None:
    c = Peer()
    x = Http2Exchanges(requests_read=True)
    block = c.block(get("/x"))
    read(x, 1, client_start() + frame(HEADERS, 0, 1, block[:2]) + frame(PING, 0, 0, bytes(8)))
    assert x.error == "HTTP/2 header block interrupted (CONTINUATION expected)"
    assert x.take_new_requests() == []


def test_padding_and_priority_are_not_counted() -> None:
    c, s = Peer(), Peer()
    x = Http2Exchanges(requests_read=True)
    block = c.block([(":method", "PUT"), (":scheme", "http"), (":path", "/p"), (":authority", "h")])
    padded_headers = frame(HEADERS, PADDED | PRIORITY_FLAG | END_HEADERS, 1,
                           bytes([4]) + struct.pack(">IB", 0x80000000, 200) + block + bytes(4))
    read(x, 1, client_start() + padded_headers + data(1, b"abc", pad=10)
         + data(1, b"de", pad=0, end_stream=True))
    write(x, 2, server_start() + s.headers(1, status(200)) + data(1, b"", pad=7, end_stream=True))
    (e,) = x.take_completed()
    assert (e.request.method, e.request.path, e.request.body_bytes, e.response.body_bytes) == (
        "PUT", "/p", 5, 0)


def test_padding_larger_than_the_frame_is_an_error() -> None:
    x = Http2Exchanges(requests_read=True)
    read(x, 1, client_start() + frame(DATA, PADDED, 1, bytes([9]) + b"abc"))
    assert x.error == "HTTP/2 DATA padding exceeds the frame"


def test_rst_stream_ends_the_stream_with_an_error() -> None:
    c, s = Peer(), Peer()
    x = Http2Exchanges(requests_read=True)
    read(x, 1, client_start() + c.headers(1, get("/refused"), end_stream=True)
         + c.headers(3, get("/cancelled"), end_stream=True))
    write(x, 2, server_start() + rst(1, 7) + s.headers(3, status(200)) + data(3, b"partial"))
    read(x, 3, rst(3, 8))
    read(x, 4, rst(3, 8) + rst(99, 2))  # unknown / already closed streams: nothing
    refused, cancelled = x.take_completed()
    assert refused.request.error == "stream reset: REFUSED_STREAM" and refused.response is None
    assert refused.request.end_ns == 1
    r = cancelled.response
    assert r is not None and r.error == "stream reset: CANCEL" and r.end_ns == 3 and r.body_bytes == 7
    assert cancelled.request.error is None and x.error is None


def test_trailers_end_request_and_response() -> None:
    c, s = Peer(), Peer()
    x = Http2Exchanges(requests_read=True)
    grpc = [(":method", "POST"), (":scheme", "http"), (":path", "/pkg.Svc/Call"), (":authority", "h"),
            ("content-type", "application/grpc"), ("te", "trailers")]
    read(x, 1, client_start() + c.headers(1, grpc) + data(1, b"\x00\x00\x00\x00\x02hi"))
    read(x, 2, c.headers(1, [("x-trailer", "t")], end_stream=True))
    write(x, 3, server_start() + s.headers(1, status(200, **{"content-type": "application/grpc"}))
          + data(1, b"\x00\x00\x00\x00\x01!"))
    assert x.take_completed() == []
    write(x, 4, s.headers(1, [("grpc-status", "0"), ("grpc-message", "")], end_stream=True))
    (e,) = x.take_completed()
    assert (e.request.end_ns, e.request.body_bytes, e.response.end_ns, e.response.body_bytes) == (2, 7, 4, 6)
    assert e.response.status == 200 and e.response.headers == {}


def test_informational_responses_are_skipped() -> None:
    c, s = Peer(), Peer()
    x = Http2Exchanges(requests_read=True)
    read(x, 1, client_start() + c.headers(1, [(":method", "POST"), (":path", "/up"),
                                              ("expect", "100-continue")]))
    write(x, 2, server_start() + s.headers(1, status(100)))
    read(x, 3, data(1, b"body", end_stream=True))
    write(x, 4, s.headers(1, status(103)) + s.headers(1, status(200), end_stream=True))
    (e,) = x.take_completed()
    assert e.response.status == 200 and e.response.start_ns == 4


def test_server_goaway_ends_unprocessed_streams_at_once() -> None:
    c, s = Peer(), Peer()
    x = Http2Exchanges(requests_read=True)
    read(x, 1, client_start() + b"".join(c.headers(sid, get(f"/g{sid}"), end_stream=True)
                                         for sid in (1, 3, 5)))
    write(x, 2, server_start() + frame(GOAWAY, 0, 0, struct.pack(">II", 1, 0) + b"draining"))
    done = x.take_completed()
    assert [(e.request.path, e.request.error) for e in done] == [
        ("/g3", "stream not processed: GOAWAY (NO_ERROR) after stream 1"),
        ("/g5", "stream not processed: GOAWAY (NO_ERROR) after stream 1")]
    assert x.goaway is not None and (x.goaway.by_server, x.goaway.last_stream_id, x.goaway.error) == (
        True, 1, "NO_ERROR")
    write(x, 3, s.headers(1, status(200), end_stream=True))
    (e,) = x.take_completed()
    assert e.request.path == "/g1" and e.request.error is None


def test_push_promise_headers_update_the_table_but_make_no_request() -> None:
    c, s = Peer(), Peer()
    x = Http2Exchanges(requests_read=True)
    read(x, 1, client_start() + c.headers(1, get("/index.html"), end_stream=True))
    promise = s.block(get("/style.css", **{"user-agent": "pushed-agent"}))
    write(x, 2, server_start() + frame(PUSH_PROMISE, END_HEADERS | PADDED, 1,
                                       bytes([3]) + struct.pack(">I", 2) + promise + bytes(3)))
    # the pushed response (stream 2) and the real one reuse the table entries the promise added
    write(x, 3, s.headers(2, status(200, **{"user-agent": "pushed-agent"})) + data(2, b"css", end_stream=True)
          + s.headers(1, status(200, **{"user-agent": "pushed-agent"}), end_stream=True))
    (e,) = x.take_completed()
    assert e.request.path == "/index.html" and e.response.headers == {"user-agent": "pushed-agent"}
    assert x.take_new_requests() == [e.request] and x.error is None


def test_dynamic_table_indexes_repeated_headers() -> None:
    c = Peer()
    x = Http2Exchanges(requests_read=True)
    fields = get("/same", **{"user-agent": "a-rather-long-user-agent/1.0", "x-request-id": "r"})
    first, second = c.headers(1, fields, end_stream=True), c.headers(3, fields, end_stream=True)
    assert len(second) < len(first) - 20  # the second block refers to the table
    read(x, 1, client_start() + first + second)
    a, b = x.take_new_requests()
    assert a.headers == b.headers == {"user-agent": "a-rather-long-user-agent/1.0", "x-request-id": "r"}
    assert b.path == "/same"


def test_header_table_size_follows_the_peers_settings() -> None:
    c = Peer()
    c.enc.header_table_size = 8192  # emits a dynamic table size update in the next block
    big = c.headers(1, get("/big", **{"user-agent": "u" * 5000}), end_stream=True)
    x = Http2Exchanges(requests_read=True)
    write(x, 1, settings(header_table_size=8192) + SETTINGS_ACK)
    read(x, 2, client_start() + big)
    (req,) = x.take_new_requests()
    assert req.headers["user-agent"] == "u" * 512  # values are cut like HTTP/1 ones
    y = Http2Exchanges(requests_read=True)  # the server never allowed it: the encoder broke the rules
    read(y, 2, client_start() + big)
    assert y.error == "HPACK decoding failed (InvalidTableSizeError)" and y.take_new_requests() == []


def test_max_frame_size_follows_the_peers_settings() -> None:
    c = Peer()
    x = Http2Exchanges(requests_read=True)
    write(x, 1, settings(max_frame_size=65536))
    read(x, 2, client_start() + c.headers(1, [(":method", "POST"), (":path", "/")]) + data(1, bytes(40000)))
    assert x.error is None
    y = Http2Exchanges(requests_read=True)
    read(y, 2, client_start() + c.headers(1, [(":method", "POST"), (":path", "/")]) + data(1, bytes(40000)))
    assert y.error == "HTTP/2 frame of 40000 bytes exceeds the maximum frame size 16384"


# --------------------------------------------------------------------------------------------------
# Splits, secrets, garbage, capture gaps
# --------------------------------------------------------------------------------------------------


def conversation() -> list[tuple[str, bytes]]:
    """A complete exchange of two requests, as (side, bytes) in order: "c" client, "s" server."""
    c, s = Peer(), Peer()
    return [
        ("c", client_start() + c.headers(1, get("/one", **{"user-agent": "ua"}), end_stream=True)),
        ("s", server_start()),
        ("c", SETTINGS_ACK + c.headers(3, [(":method", "POST"), (":path", "/two"),
                                           ("traceparent", TRACEPARENT)]) + data(3, b"body" * 100, pad=20)),
        ("s", s.headers(1, status(200)) + data(1, b"x" * 300, end_stream=True)),
        ("c", data(3, b"", end_stream=True)),
        ("s", s.headers(3, status(404, **{"content-length": "0"}), end_stream=True)),
    ]


def run(pieces: Iterable[tuple[str, bytes]], requests_read: bool = True) -> Http2Exchanges:
    x = Http2Exchanges(requests_read=requests_read)
    for ts, (side, raw) in enumerate(pieces):
        (read if (side == "c") == requests_read else write)(x, ts, raw)
    return x


def test_frames_split_byte_by_byte() -> None:
    whole = run(conversation())
    expected = summary(whole.take_completed())
    assert [e[:2] for e in expected] == [("GET", "/one"), ("POST", "/two")] and whole.error is None
    x = run((side, raw[i:i + 1]) for side, raw in conversation() for i in range(len(raw)))
    assert summary(x.take_completed()) == expected and x.error is None


def test_split_preface() -> None:
    raw = conversation()[0][1]
    for cut in (1, 3, 10, 23, 24, 25):
        x = Http2Exchanges(requests_read=True)
        read(x, 1, raw[:cut])
        read(x, 2, raw[cut:])
        (req,) = x.take_new_requests()
        assert (req.path, req.start_ns, req.headers_done_ns) == ("/one", 2, 2) and x.error is None


def test_upstream_view_writes_requests_and_reads_responses() -> None:
    x = run(conversation(), requests_read=False)
    done = x.take_completed()
    assert summary(done) == summary(run(conversation()).take_completed())
    assert done[0].request.tid == 9 and done[0].response.tid == 7  # Envoy wrote the request


def test_secret_headers_never_leave_the_module() -> None:
    c, s = Peer(), Peer()
    x = Http2Exchanges(requests_read=True)
    secret_req = get("/login?pw=s3cr3t-query", authorization=SECRETS[0], cookie=SECRETS[1])
    read(x, 1, client_start() + c.headers(1, secret_req, end_stream=True))
    read(x, 2, c.headers(3, secret_req, end_stream=True))  # now indexed from the dynamic table
    sensitive = [hpack.NeverIndexedHeaderTuple("authorization", SECRETS[0]), (":method", "GET"),
                 (":path", "/n")]
    read(x, 3, c.headers(5, sensitive, end_stream=True))
    cookie = status(200, **{"set-cookie": SECRETS[2]})
    write(x, 4, server_start() + b"".join(s.headers(sid, cookie, end_stream=True) for sid in (1, 3, 5)))
    done = x.take_completed() + x.finish(5)
    assert len(done) == 3
    text = repr(done) + repr(x.take_new_requests()) + repr(vars(x)) + repr(x.goaway)
    for secret in SECRETS:
        assert secret not in text


@pytest.mark.parametrize("garbage", [
    b"\xff" * 100,  # a frame length far above the maximum
    frame(HEADERS, END_HEADERS, 1, b"\xff\xff\xff\xff"),  # not SETTINGS first
    settings() + frame(HEADERS, END_HEADERS, 1, b"\xff\xff\xff\xff\x7f"),  # HPACK: bad index
    settings() + frame(CONTINUATION, END_HEADERS, 1, b"\x82"),
    settings() + frame(RST_STREAM, 0, 1, b"\x00"),
    settings() + frame(SETTINGS, 0, 0, b"\x00\x01\x00"),
    settings() + frame(GOAWAY, 0, 0, b"\x00"),
    settings() + frame(HEADERS, PADDED | END_HEADERS, 1, b"\x09abc"),
])
def test_garbage_after_the_preface_is_an_error_not_an_exception(garbage: bytes) -> None:
    x = Http2Exchanges(requests_read=True)
    read(x, 1, PREFACE + garbage)
    read(x, 2, frame(SETTINGS, 0, 0) + Peer().headers(1, get("/after"), end_stream=True))  # ignored
    assert x.error is not None and not x.error.startswith("internal error")
    assert x.take_new_requests() == [] and x.finish(3) == []


def test_not_a_preface() -> None:
    x = Http2Exchanges(requests_read=True)
    read(x, 1, b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n")
    assert x.error == "not an HTTP/2 connection preface"
    y = Http2Exchanges(requests_read=True)
    read(y, 1, b"GET / HTTP/1.1\r\n\r\n")
    assert y.error == "not an HTTP/2 connection preface"


def test_capture_gap_inside_data_is_counted() -> None:
    c, s = Peer(), Peer()
    x = Http2Exchanges(requests_read=True)
    read(x, 1, PREFACE + settings(max_frame_size=1 << 20) + c.headers(1, get("/big"), end_stream=True))
    head = server_start() + s.headers(1, status(200))
    body = data(1, b"y" * 100_000, pad=5, end_stream=False)
    write(x, 2, head + body[:100], total=len(head) + len(body))  # the gap ends with the frame
    write(x, 3, data(1, b"", end_stream=True))
    (e,) = x.take_completed()
    assert e.response.body_bytes == 100_000 and e.response.error is None and x.error is None


def test_capture_gap_with_an_uncaptured_pad_length_reads_it_as_zero() -> None:
    c = Peer()
    x = Http2Exchanges(requests_read=True)
    head = client_start() + c.headers(1, [(":method", "POST"), (":path", "/")])
    body = data(1, b"z" * 1000, pad=0, end_stream=True)
    read(x, 1, head + body[:9], total=len(head) + len(body))  # frame header captured, pad length not
    write(x, 2, server_start() + Peer().headers(1, status(200), end_stream=True))
    (e,) = x.take_completed()
    assert e.request.body_bytes == 1000 and e.request.end_ns == 1


@pytest.mark.parametrize("where", ["frame header", "header block", "past the data frame", "preface"])
def test_capture_gap_in_framing_stops_parsing(where: str) -> None:
    c, s = Peer(), Peer()
    x = Http2Exchanges(requests_read=True)
    read(x, 1, client_start() + c.headers(1, get("/gap"), end_stream=True))
    head = server_start()
    resp = s.headers(1, status(200)) + data(1, b"q" * 50) + data(1, b"r" * 50, end_stream=True)
    if where == "frame header":
        write(x, 2, head + resp[:4], total=len(head) + len(resp))
    elif where == "header block":
        write(x, 2, head + resp[:10], total=len(head) + len(resp))
    elif where == "past the data frame":
        hdr = len(resp) - 2 * 59 + 9
        write(x, 2, head + resp[:hdr + 10], total=len(head) + len(resp))
    else:
        x = Http2Exchanges(requests_read=True)
        read(x, 1, PREFACE[:5], total=100)
    assert x.error == "capture gap inside HTTP/2 framing"
    if where != "preface":
        (e,) = x.finish(9)
        err = e.response.error if e.response is not None else e.request.error
        assert err == "capture gap inside HTTP/2 framing"


def test_finish_ends_open_streams() -> None:
    c, s = Peer(), Peer()
    x = Http2Exchanges(requests_read=True)
    read(x, 1, client_start() + c.headers(1, get("/slow"), end_stream=True)
         + c.headers(3, [(":method", "POST"), (":path", "/unfinished")]) + c.headers(5, get("/no-answer"),
                                                                                    end_stream=True))
    write(x, 2, server_start() + s.headers(1, status(200)) + data(1, b"abc"))
    slow, unfinished, no_answer = x.finish(9)
    assert slow.response.error == "response incomplete when the connection ended"
    assert slow.response.end_ns == 9
    assert unfinished.request.error == "request incomplete when the connection ended"
    assert unfinished.request.end_ns == 9 and unfinished.response is None
    assert no_answer.request.error is None and no_answer.response is None and no_answer.request.end_ns == 1
    assert x.in_flight() is None and x.finish(10) == []


def test_max_streams_bound_drops_the_oldest() -> None:
    c = Peer()
    x = Http2Exchanges(requests_read=True)
    n = MAX_STREAMS + 3
    read(x, 1, client_start() + b"".join(c.headers(2 * i + 1, get(f"/s{i}"), end_stream=True)
                                         for i in range(n)))
    dropped = x.take_completed()
    assert [e.request.path for e in dropped] == ["/s0", "/s1", "/s2"]
    assert all(e.response is None for e in dropped) and x.unanswered_dropped == 3
    assert len(x.take_new_requests()) == n and x.in_flight().path == "/s3"
    write(x, 2, server_start() + Peer().headers(1, status(200), end_stream=True))  # dropped stream: ignored
    assert x.take_completed() == [] and len(x.finish(3)) == MAX_STREAMS


def test_implausible_syscall_size() -> None:
    x = Http2Exchanges(requests_read=True)
    read(x, 1, PREFACE, total=1 << 40)
    assert x.error == "implausible syscall size 1099511627776"


def test_hpack_never_logs_decoded_headers() -> None:
    assert not logging.getLogger("hpack.hpack").isEnabledFor(logging.DEBUG)


def test_is_h2_preface() -> None:
    assert is_h2_preface(PREFACE) and is_h2_preface(PREFACE + b"\x00\x00") and is_h2_preface(PREFACE[:7])
    assert is_h2_preface(b"P") and is_h2_preface(memoryview(PREFACE)[:10])
    assert not is_h2_preface(b"") and not is_h2_preface(b"POST / HTTP/1.1\r\n")
    assert not is_h2_preface(b"PRI * HTTP/1.1") and not is_h2_preface(b"\x16\x03\x01")


# --------------------------------------------------------------------------------------------------
# h2c upgrade (RFC 7540 3.2): HTTP/1.1 request + 101, then HTTP/2 on stream 1
# --------------------------------------------------------------------------------------------------

UPGRADE_REQUEST = (b"GET /upgrade?q=s3cr3t-query HTTP/1.1\r\nHost: h\r\n"
                   b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
                   b"HTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\nUser-Agent: nghttp2/1.52\r\n"
                   b"Authorization: " + SECRETS[0].encode() + b"\r\n\r\n")
SWITCH = b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n"


def test_h2c_upgrade_end_to_end() -> None:
    c, s = Peer(), Peer()
    h1 = Http1Exchanges(requests_read=True, h2c_handoff=True)
    read(h1, 1, b"GET /before HTTP/1.1\r\nHost: h\r\n\r\n")
    write(h1, 2, b"HTTP/1.1 204 No Content\r\n\r\n")
    read(h1, 3, UPGRADE_REQUEST)
    assert [m.path for m in h1.take_new_requests()] == ["/before", "/upgrade"]
    assert Http2Exchanges.from_upgrade(h1) is None  # no 101 yet
    # the 101, the server preface and the response on stream 1, all in one write
    write(h1, 4, SWITCH + server_start() + s.headers(1, status(200, **{"set-cookie": SECRETS[2]}))
          + data(1, b"hello", end_stream=True))
    assert h1.upgraded and h1.h2c_request is not None and h1.h2c_switch.status == 101
    assert h1.upgrade_leftover(requests=False)[0].data.startswith(settings(max_concurrent_streams=100))
    h2 = Http2Exchanges.from_upgrade(h1)
    assert h2 is not None and h1.in_flight() is None and h1.finish(5) == []
    before, upgrade = h2.take_completed()
    assert before.request.path == "/before" and before.response.status == 204
    q, r = upgrade.request, upgrade.response
    assert (q.method, q.path, q.version, q.headers) == ("GET", "/upgrade", "1.1", {
        "upgrade": "h2c", "user-agent": "nghttp2/1.52"})
    assert r is not None and (r.status, r.version, r.body_bytes, r.start_ns, r.end_ns) == (200, "2", 5, 4, 4)
    # the client's preface and its next requests follow
    read(h2, 5, client_start() + SETTINGS_ACK + c.headers(3, get("/next"), end_stream=True))
    (nxt,) = h2.take_new_requests()
    write(h2, 6, s.headers(3, status(404), end_stream=True))
    (e,) = h2.take_completed()
    assert e.request is nxt and e.response.status == 404 and h2.error is None
    text = repr([before, upgrade, e, h1.h2c_switch])
    assert not any(secret in text for secret in SECRETS)


def test_h2c_upgrade_with_body_and_preface_in_the_same_read() -> None:
    c, s = Peer(), Peer()
    h1 = Http1Exchanges(requests_read=True, h2c_handoff=True)
    req = (b"POST /up HTTP/1.1\r\nHost: h\r\nContent-Length: 6\r\nConnection: Upgrade, HTTP2-Settings\r\n"
           b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n\r\n")
    read(h1, 1, req + b"abc")
    read(h1, 2, b"def" + client_start() + c.headers(3, get("/pipelined"), end_stream=True))  # before the 101
    write(h1, 3, SWITCH + server_start()[:5])  # the rest of the server's SETTINGS comes later
    h2 = Http2Exchanges.from_upgrade(h1)
    assert h2 is not None and h2.error is None
    up_req, nxt = h2.take_new_requests()  # h1 had not handed /up out yet: it moved over
    assert (up_req.path, nxt.path) == ("/up", "/pipelined")
    write(h2, 4, server_start()[5:] + s.headers(3, status(200), end_stream=True)
          + s.headers(1, status(201), end_stream=True))
    pipelined, up = h2.take_completed()
    assert pipelined.request is nxt
    assert (up.request.path, up.request.body_bytes, up.request.end_ns) == ("/up", 6, 2)
    assert up.response.status == 201


def test_h2c_upgrade_leftover_with_a_capture_gap() -> None:
    s = Peer()
    h1 = Http1Exchanges(requests_read=True, h2c_handoff=True)
    read(h1, 1, UPGRADE_REQUEST)
    head = SWITCH + server_start() + s.headers(1, status(200))
    body = data(1, b"b" * 10_000, end_stream=True)
    write(h1, 2, head + body[:20], total=len(head) + len(body))
    h2 = Http2Exchanges.from_upgrade(h1)
    assert h2 is not None
    (e,) = h2.take_completed()
    assert e.response.body_bytes == 10_000 and e.response.end_ns == 2 and h2.error is None


def test_101_refused_or_other_protocols_complete_the_request_as_before() -> None:
    ws = Http1Exchanges(requests_read=True, h2c_handoff=True)
    read(ws, 1, b"GET /ws HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
    write(ws, 2, b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
                 b"\x81\x00")
    read(ws, 3, b"\x81\x85" + bytes(100))
    (e,) = ws.take_completed()
    assert e.response.status == 101 and ws.upgraded and Http2Exchanges.from_upgrade(ws) is None
    assert ws.upgrade_leftover(requests=True) == [] and ws.upgrade_leftover(requests=False) == []
    plain = Http1Exchanges(requests_read=True)  # no hand-off wanted: the 101 is the answer
    read(plain, 1, UPGRADE_REQUEST)
    write(plain, 2, SWITCH + server_start())
    (e,) = plain.take_completed()
    assert e.response.status == 101 and Http2Exchanges.from_upgrade(plain) is None


def test_declined_h2c_upgrade_goes_on_as_http1() -> None:
    """curl --http2 to a server without h2c: the answer is a plain 200, and the next requests on the
    connection (pipelined before that answer, or sent after it) are HTTP/1.1 as before."""
    h1 = Http1Exchanges(requests_read=True, h2c_handoff=True)
    read(h1, 1, UPGRADE_REQUEST)
    read(h1, 2, b"GET /pipelined HTTP/1.1\r\nHost: h\r\n\r\n")  # kept while the upgrade is undecided
    write(h1, 3, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert not h1.upgraded and Http2Exchanges.from_upgrade(h1) is None and h1.error is None
    write(h1, 4, b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
    read(h1, 5, b"GET /after HTTP/1.1\r\nHost: h\r\n\r\n")
    write(h1, 6, b"HTTP/1.1 204 No Content\r\n\r\n")
    done = h1.take_completed()
    assert [(e.request.path, e.response.status) for e in done] == [
        ("/upgrade", 200), ("/pipelined", 404), ("/after", 204)]
    assert [m.path for m in h1.take_new_requests()] == ["/upgrade", "/pipelined", "/after"]
    assert done[0].response.body_bytes == 2 and h1.finish(7) == []


def test_declined_websocket_upgrade_goes_on_as_http1() -> None:
    h1 = Http1Exchanges(requests_read=True, h2c_handoff=True)
    read(h1, 1, b"GET /ws HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
    write(h1, 2, b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
    read(h1, 3, b"GET /next HTTP/1.1\r\nHost: h\r\n\r\n")
    write(h1, 4, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    done = h1.take_completed()
    assert [(e.request.path, e.response.status) for e in done] == [("/ws", 403), ("/next", 200)]
    assert not h1.upgraded and h1.error is None


def test_h2c_leftover_is_bounded() -> None:
    h1 = Http1Exchanges(requests_read=True, h2c_handoff=True)
    read(h1, 1, UPGRADE_REQUEST)
    for ts in range(2, 100):  # a client that keeps sending before the server switches
        read(h1, ts, b"\x00" * 5000)
    kept = h1.upgrade_leftover(requests=True)
    assert len(kept) <= 16 and sum(len(c.data) for c in kept) <= 256 * 1024
    assert sum(c.total_len for c in kept) == 98 * 5000  # the rest is remembered as a gap
    write(h1, 100, SWITCH)
    h2 = Http2Exchanges.from_upgrade(h1)
    assert h2 is not None and h2.error == "not an HTTP/2 connection preface"
    (e,) = h2.finish(101)
    assert e.request.path == "/upgrade" and e.request.error == "not an HTTP/2 connection preface"


# --------------------------------------------------------------------------------------------------
# Condensed records (DATA_FLAG_H2_FRAMES): the kernel sends a connection's framing, DATA payloads left out
# --------------------------------------------------------------------------------------------------


def kept_bytes(stream: bytes, *, client: bool) -> bytearray:
    """Which bytes of one direction's stream a condensed record holds (1) or leaves out (0): a model of
    bpf/conn.bpf.c capture_h2, independent of the parser. The client preface, every frame header, every
    payload but DATA ones, of which only a PADDED frame's pad length."""
    keep = bytearray(len(stream))
    pos = 0
    if client:
        keep[0:24] = b"\x01" * min(24, len(stream))
        pos = 24
    while pos < len(stream):
        head = stream[pos:pos + 9]
        keep[pos:pos + 9] = b"\x01" * len(head)
        if len(head) < 9:
            break
        length, ftype, flags = int.from_bytes(head[:3], "big"), head[3], head[4]
        kept = (1 if flags & PADDED and length else 0) if ftype == DATA else length
        keep[pos + 9:pos + 9 + kept] = b"\x01" * kept
        pos += 9 + length
    return keep


def condensed(pieces: list[tuple[str, bytes]]) -> list[tuple[str, bytes, int]]:
    """The condensed records of a conversation given as syscall-sized (side, bytes) pieces: (side, data,
    bytes moved)."""
    streams = {side: b"".join(raw for sd, raw in pieces if sd == side) for side in "cs"}
    keep = {side: kept_bytes(stream, client=side == "c") for side, stream in streams.items()}
    offset = {"c": 0, "s": 0}
    out = []
    for side, raw in pieces:
        o = offset[side]
        out.append((side, bytes(itertools.compress(raw, keep[side][o:o + len(raw)])), len(raw)))
        offset[side] = o + len(raw)
    return out


def run_condensed(records: Iterable[tuple[str, bytes, int]], requests_read: bool = True,
                  plain: Iterable[int] = ()) -> Http2Exchanges:
    """Feed condensed records (those whose index is in ``plain``: their full bytes, as plain records)."""
    x = Http2Exchanges(requests_read=requests_read)
    plain = set(plain)
    for ts, (side, raw, total) in enumerate(records):
        fn = x.on_read if (side == "c") == requests_read else x.on_write
        fn(ts, raw, total, tid=7 if fn == x.on_read else 9, round_=ts, frames_only=ts not in plain)
    return x


def big_conversation() -> list[tuple[str, bytes]]:
    """Several streams with bodies larger than a capture (4 KiB), padding, CONTINUATION, trailers, a
    reset, control frames: the condensed form must give the same exchanges as the full bytes."""
    c, s = Peer(), Peer()
    one = c.headers(1, get("/one", **{"user-agent": "ua"}), end_stream=True)
    block = c.block(get("/cont", **{"user-agent": "split-agent"}))
    post = c.headers(5, [(":method", "POST"), (":path", "/upload"), ("traceparent", TRACEPARENT)])
    trailers = c.headers(5, [("x-t", "1")], end_stream=True)
    return [
        ("c", client_start() + one + frame(HEADERS, END_STREAM, 3, block[:4])
         + frame(CONTINUATION, END_HEADERS, 3, block[4:])),
        ("s", server_start() + ping_and_window_update()),
        ("c", SETTINGS_ACK + post + data(5, b"u" * 15_000, pad=9) + data(5, b"u" * 15_000)
         + data(5, b"v" * 1000) + trailers),
        ("s", s.headers(1, status(200)) + data(1, b"x" * 16_000) + data(1, b"y" * 4_000)
         + data(1, b"", end_stream=True) + s.headers(3, status(404)) + data(3, b"z" * 16_000, pad=0)
         + data(3, b"z" * 4_000) + rst(3, 8)),
        ("s", s.headers(5, status(201)) + data(5, b"w" * 9_999, pad=200, end_stream=True)
         + frame(GOAWAY, 0, 0, struct.pack(">II", 5, 0))),
    ]


def test_condensed_records_give_the_same_exchanges_as_full_ones() -> None:
    full = run(big_conversation())
    expected = summary(full.take_completed())
    assert [e[:3] for e in expected] == [("GET", "/one", 0), ("GET", "/cont", 0), ("POST", "/upload", 31_000)]
    assert [e[5][:2] for e in expected] == [(200, 20_000), (404, 20_000), (201, 9_999)]
    assert full.error is None
    records = condensed(big_conversation())
    assert sum(len(raw) for _, raw, _ in records) < 1000  # the bodies are left out
    for requests_read in (True, False):
        x = run_condensed(records, requests_read=requests_read)
        done = x.take_completed()
        assert summary(done) == expected and x.error is None and x.goaway is not None
        if requests_read:
            assert [e.response.end_ns for e in done] == [3, 3, 4] and done[2].request.end_ns == 2


def test_condensed_frames_split_anywhere() -> None:
    """A syscall split at every byte of its framing (and every 997th of its DATA payloads): frame headers,
    header blocks, the preface and pad lengths straddle two records, or a record holds no byte at all."""
    expected = summary(run(big_conversation()).take_completed())
    pieces = big_conversation()
    records = condensed(pieces)
    tested = 0
    for i, (side, raw) in enumerate(pieces):
        o = sum(len(r) for sd, r in pieces[:i] if sd == side)
        keep = kept_bytes(b"".join(r for sd, r in pieces if sd == side), client=side == "c")[o:o + len(raw)]
        cuts = {cut for cut in range(1, len(raw)) if keep[cut] or keep[cut - 1] or cut % 997 == 0}
        for cut in sorted(cuts):
            first = bytes(itertools.compress(raw[:cut], keep[:cut]))
            second = bytes(itertools.compress(raw[cut:], keep[cut:]))
            split = [*records[:i], (side, first, cut), (side, second, len(raw) - cut), *records[i + 1:]]
            x = run_condensed(split)
            assert summary(x.take_completed()) == expected and x.error is None, (i, cut)
            tested += 1
    assert tested > 400


def test_frame_header_straddling_two_condensed_records() -> None:
    c, s = Peer(), Peer()
    resp = s.headers(1, status(200)) + data(1, b"d" * 50_000, end_stream=True)
    cut = len(resp) - 50_000 - 4  # 5 bytes of the DATA frame header in the first syscall, 4 in the next
    pieces = [("c", PREFACE + settings(max_frame_size=1 << 20) + c.headers(1, get("/s"), end_stream=True)),
              ("s", server_start() + resp[:cut]), ("s", resp[cut:])]
    records = condensed(pieces)
    assert records[2][1:] == (resp[cut:cut + 4], 50_004)  # the rest of the header, no payload
    x = run_condensed(records)
    (e,) = x.take_completed()
    assert (e.response.status, e.response.body_bytes, e.response.end_ns, x.error) == (200, 50_000, 2, None)


@hypothesis_settings(max_examples=80, deadline=None)
@given(st.data())
def test_any_syscall_sizes_and_any_mix_of_plain_and_condensed_records(draw: st.DataObject) -> None:
    """The parser keeps its place in the stream whatever the syscall boundaries and whichever records
    the kernel condensed."""
    expected = summary(run(big_conversation()).take_completed())
    streams: dict[str, bytes] = {}
    pieces = []
    for side, raw in big_conversation():
        cuts = sorted(draw.draw(st.lists(st.integers(0, len(raw)), max_size=6)))
        pieces += [(side, raw[a:b]) for a, b in zip([0, *cuts], [*cuts, len(raw)], strict=True)]
        streams[side] = streams.get(side, b"") + raw
    keep = {side: kept_bytes(stream, client=side == "c") for side, stream in streams.items()}
    offset, records, plain = {"c": 0, "s": 0}, [], []
    for i, (side, raw) in enumerate(pieces):
        o = offset[side]
        offset[side] += len(raw)
        if draw.draw(st.booleans()):
            records.append((side, raw, len(raw)))
            plain.append(i)
        else:
            records.append((side, bytes(itertools.compress(raw, keep[side][o:o + len(raw)])), len(raw)))
    x = run_condensed(records, plain=plain)
    assert summary(x.take_completed()) == expected and x.error is None


def test_plain_and_condensed_records_mix() -> None:
    """The kernel may send any record plain: the one that showed it the preface (if it did not condense
    it), or every record after it lost a direction's framing."""
    expected = summary(run(big_conversation()).take_completed())
    records = condensed(big_conversation())
    full = big_conversation()
    mixed = [(side, full[i][1], total) if i in (0, 3) else (side, raw, total)
             for i, (side, raw, total) in enumerate(records)]
    x = run_condensed(mixed, plain=(0, 3))
    assert summary(x.take_completed()) == expected and x.error is None


def test_lost_framing_is_a_capture_gap() -> None:
    """The kernel could not condense a syscall (more than CAPTURE_MAX bytes of framing, too many frames):
    its record ends early, and the streams in flight carry the error."""
    c, s = Peer(), Peer()
    pieces = [("c", client_start() + c.headers(1, get("/a"), end_stream=True)
               + c.headers(3, get("/b"), end_stream=True)),
              ("s", server_start() + s.headers(1, status(200)) + data(1, b"x" * 9000, end_stream=True)
               + s.headers(3, status(200)) + data(3, b"y" * 9000, end_stream=True))]
    records = condensed(pieces)
    side, raw, total = records[1]
    cut = raw.index(s.headers(3, status(200))[:9])  # the kernel stopped before stream 3's HEADERS
    x = run_condensed([records[0], (side, raw[:cut], total)])
    (first,) = x.take_completed()
    assert first.request.path == "/a" and first.response.status == 200 and first.response.error is None
    assert x.error == "capture gap inside HTTP/2 framing"
    x.on_write(3, b"\x00" * 20, 20)  # the lost direction's later (plain) records change nothing
    (second,) = x.finish(4)
    assert second.request.path == "/b" and second.request.error == "capture gap inside HTTP/2 framing"


def test_condensed_record_with_more_than_its_framing_is_an_error() -> None:
    x = Http2Exchanges(requests_read=True)
    raw = client_start() + Peer().headers(1, get("/x"), end_stream=True)
    x.on_read(1, raw + b"\x00" * 9, len(raw), frames_only=True)
    assert x.error == "condensed HTTP/2 record longer than its framing"
    assert x.take_new_requests() != []  # what came before is kept


def test_padded_data_counts_its_body_exactly_from_the_kept_pad_length() -> None:
    c = Peer()
    pieces = [("c", client_start() + c.headers(1, [(":method", "POST"), (":path", "/p")])
               + data(1, b"a" * 5000, pad=255) + data(1, b"", pad=3, end_stream=True)),
              ("s", server_start() + Peer().headers(1, status(200), end_stream=True))]
    records = condensed(pieces)
    assert len(records[0][1]) < 200
    (e,) = run_condensed(records).take_completed()
    assert e.request.body_bytes == 5000 and e.request.end_ns == 0

"""HTTP/2 frame reading (otel_envoy.protocols.http2_frames), driven through the connection that pairs what
the readers hand on (otel_envoy.protocols.http2): header blocks and CONTINUATION, padding, HPACK and the
peers' SETTINGS, frames split anywhere, garbage, capture gaps, and condensed records.
"""

from __future__ import annotations

import itertools
import logging
import struct
from collections.abc import Iterable

import pytest
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from otel_envoy.protocols.http2 import Http2Exchanges
from otel_envoy.protocols.http2_frames import PREFACE, FrameHandlers, FrameReader
from tests.support.http2_bytes import (
    CONTINUATION,
    DATA,
    END_HEADERS,
    END_STREAM,
    GOAWAY,
    HEADERS,
    PADDED,
    PING,
    PRIORITY_FLAG,
    PUSH_PROMISE,
    RST_STREAM,
    SETTINGS,
    SETTINGS_ACK,
    TRACEPARENT,
    Peer,
    client_start,
    conversation,
    data,
    frame,
    get,
    ping_and_window_update,
    read,
    rst,
    run,
    server_start,
    settings,
    status,
    summary,
    write,
)

# --------------------------------------------------------------------------------------------------
# The reader on its own: what it hands on
# --------------------------------------------------------------------------------------------------


def test_reader_hands_each_frame_to_its_handlers_and_settings_to_its_peer() -> None:
    calls: list[tuple] = []
    handlers = FrameHandlers(
        headers=lambda r, b, fields, ts, rnd: calls.append(("headers", r.client, b.stream_id, b.end_stream,
                                                             b.start, list(fields), ts, rnd)),
        data=lambda r, sid, n, end, ts: calls.append(("data", r.client, sid, n, end, ts)),
        reset=lambda sid, code, ts: calls.append(("reset", sid, code, ts)),
        goaway=lambda r, last, code, ts: calls.append(("goaway", r.client, last, code, ts)),
        upgrade_body=lambda n, ts: calls.append(("upgrade_body", n, ts)),
    )
    client, server = FrameReader(handlers, client=True), FrameReader(handlers, client=False)
    client.peer, server.peer = server, client
    c = Peer()
    client.feed(1, client_start() + c.headers(1, [(":method", "GET"), (":path", "/r")]), tid=7, rnd=1)
    client.feed(2, data(1, b"abc", pad=2, end_stream=True) + rst(1, 8), tid=7, rnd=2)
    server.feed(3, settings(max_frame_size=1 << 20) + frame(GOAWAY, 0, 0, struct.pack(">II", 1, 0)), tid=9,
                rnd=3)
    assert calls == [
        ("headers", True, 1, False, (1, 7, 1), [(b":method", b"GET"), (b":path", b"/r")], 1, 1),
        ("data", True, 1, 3, True, 2),
        ("reset", 1, 8, 2),
        ("goaway", False, 1, 0, 3),
    ]
    assert client.max_frame == 1 << 20 and server.max_frame == 16384  # the server allowed the client more
    assert client.failed is None and server.failed is None


# --------------------------------------------------------------------------------------------------
# Header blocks, padding, HPACK and the peers' settings
# --------------------------------------------------------------------------------------------------


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
# Splits, garbage, capture gaps
# --------------------------------------------------------------------------------------------------


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


def test_hpack_never_logs_decoded_headers() -> None:
    assert not logging.getLogger("hpack.hpack").isEnabledFor(logging.DEBUG)


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


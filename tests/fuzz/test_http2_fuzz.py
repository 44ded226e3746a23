"""Property tests: whatever bytes arrive after the HTTP/2 preface, in whatever chunking and with whatever
capture gaps, the HTTP/2 parser never raises, never records an internal error, keeps its buffers bounded
and never lets a secret header value out."""

from __future__ import annotations

import itertools
import struct

import hpack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from otel_envoy.protocols.http import HttpExchange
from otel_envoy.protocols.http1 import Http1Exchanges
from otel_envoy.protocols.http2 import MAX_STREAMS, Http2Exchanges
from otel_envoy.protocols.http2_frames import MAX_HEADER_BLOCK, PREFACE

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SECRET = "Bearer fuzz-s3cret"

# --------------------------------------------------------------------------------------------------
# Real frames (struct + the hpack encoder)
# --------------------------------------------------------------------------------------------------


def frame(ftype: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([ftype, flags]) + struct.pack(">I", sid) + payload


def conversation() -> list[tuple[str, bytes]]:
    """Two requests (one with a padded body and CONTINUATION), their responses, a reset and trailers."""
    c, s = hpack.Encoder(), hpack.Encoder()
    req = [(":method", "GET"), (":scheme", "http"), (":path", "/a?q=1"), (":authority", "h"),
           ("authorization", SECRET), ("user-agent", "fuzz/1")]
    block = c.encode(req)
    post = c.encode([(":method", "POST"), (":path", "/b"), ("cookie", SECRET), ("traceparent", "00-x")])
    return [
        ("c", PREFACE + frame(4, 0, 0, struct.pack(">HI", 4, 65535)) + frame(1, 0, 1, block[:6])
         + frame(9, 4, 1, block[6:])),
        ("s", frame(4, 0, 0, struct.pack(">HI", 3, 100)) + frame(4, 1, 0)),
        ("c", frame(4, 1, 0) + frame(1, 4 | 8, 3, bytes([2]) + post + b"\x00\x00")
         + frame(0, 8, 3, bytes([3]) + b"body" * 20 + bytes(3))),
        ("s", frame(1, 4, 1, s.encode([(":status", "200"), ("set-cookie", SECRET)])) + frame(0, 1, 1, b"ok")),
        ("c", frame(1, 4 | 1, 3, c.encode([("x-trailer", SECRET)])) + frame(1, 4 | 1, 5, block)),
        ("s", frame(1, 4, 3, s.encode([(":status", "500")])) + frame(6, 0, 0, bytes(8))
         + frame(1, 4 | 1, 3, s.encode([("grpc-status", "2")])) + frame(3, 0, 5, struct.pack(">I", 8))
         + frame(7, 0, 0, struct.pack(">II", 5, 0))),
    ]


UPGRADE = (b"GET /up HTTP/1.1\r\nHost: h\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
           b"HTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\nAuthorization: " + SECRET.encode() + b"\r\n\r\n")
SWITCH = b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n"


def check(x: Http2Exchanges, done: list[HttpExchange]) -> None:
    assert not (x.error or "").startswith("internal error"), x.error
    for side in (x._client, x._server):
        assert len(side.head) < 9 and len(side.payload) <= MAX_HEADER_BLOCK
        assert side.block is None or len(side.block.fragments) <= MAX_HEADER_BLOCK
    assert len(x._streams) <= MAX_STREAMS
    done.extend(x.take_completed())


def no_secrets(done: list[HttpExchange], x: Http2Exchanges) -> None:
    text = repr(done) + repr(x.take_new_requests()) + repr(x.error) + repr(x.goaway)
    assert SECRET not in text


def feed(x: Http2Exchanges, i: int, side: str, piece: bytes, total: int) -> None:
    if (side == "c") == x.requests_read:
        x.on_read(i, piece, total, tid=1, round_=i)
    else:
        x.on_write(i, piece, total, tid=2, round_=i)


# --------------------------------------------------------------------------------------------------
# Strategies
# --------------------------------------------------------------------------------------------------

chunk = st.tuples(
    st.sampled_from(["c", "s"]),
    st.binary(max_size=300),
    st.integers(min_value=0, max_value=5000),  # uncaptured tail
)


@st.composite
def split_points(draw: st.DrawFn, n: int) -> list[int]:
    """Sorted cut positions inside a buffer of n bytes."""
    if n <= 1:
        return []
    return sorted(set(draw(st.lists(st.integers(min_value=1, max_value=n - 1), max_size=16))))


def cut(data: bytes, points: list[int]) -> list[bytes]:
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds) if b > a]


@st.composite
def mutated(draw: st.DrawFn, data: bytes, keep: int = 0) -> bytes:
    """``data`` with a few byte flips, insertions and deletions (its first ``keep`` bytes left alone)."""
    buf = bytearray(data)
    for _ in range(draw(st.integers(min_value=0, max_value=4))):
        if len(buf) <= keep:
            break
        op = draw(st.sampled_from(["flip", "set", "insert", "delete"]))
        i = draw(st.integers(min_value=keep, max_value=len(buf) - 1))
        if op == "flip":
            buf[i] ^= 1 << draw(st.integers(min_value=0, max_value=7))
        elif op == "set":
            buf[i] = draw(st.sampled_from([0x00, 0xFF, 0x7F, 0x80, 0x01, 0x04, 0x09]))
        elif op == "insert":
            buf[i:i] = draw(st.binary(min_size=1, max_size=8))
        else:
            del buf[i : i + draw(st.integers(min_value=1, max_value=8))]
    return bytes(buf)


# --------------------------------------------------------------------------------------------------
# Properties
# --------------------------------------------------------------------------------------------------


@FUZZ
@given(st.lists(chunk, max_size=25), st.booleans(), st.booleans())
def test_random_bytes_after_the_preface_never_raise(chunks: list[tuple[str, bytes, int]],
                                                    settings_first: bool, requests_read: bool) -> None:
    x = Http2Exchanges(requests_read=requests_read)
    done: list[HttpExchange] = []
    feed(x, 0, "c", PREFACE + (frame(4, 0, 0) if settings_first else b""), len(PREFACE) + 9 * settings_first)
    if settings_first:
        feed(x, 0, "s", frame(4, 0, 0), 9)
    for i, (side, data, gap) in enumerate(chunks, start=1):
        feed(x, i, side, data, len(data) + gap)
        check(x, done)
    done.extend(x.finish(len(chunks) + 1))
    assert x.finish(len(chunks) + 2) == [] and x.in_flight() is None


@FUZZ
@given(st.data())
def test_mutated_conversation_in_random_chunks_with_gaps(data: st.DataObject) -> None:
    x = Http2Exchanges(requests_read=data.draw(st.booleans()))
    done: list[HttpExchange] = []
    with_gaps = data.draw(st.booleans())
    i = 0
    for side, raw in conversation():
        raw = data.draw(mutated(raw, keep=len(PREFACE) if raw.startswith(PREFACE) else 0))
        for piece in cut(raw, data.draw(split_points(len(raw)))):
            captured = data.draw(st.integers(0, len(piece))) if with_gaps else len(piece)
            feed(x, i, side, piece[:captured], len(piece))
            check(x, done)
            i += 1
    done.extend(x.finish(i))
    no_secrets(done, x)
    for e in done:
        assert e.request.version == "2" and (e.response is None or e.request.response is e.response)


@FUZZ
@given(st.data())
def test_unmutated_conversation_any_chunking_parses_the_same(data: st.DataObject) -> None:
    def summary(done: list[HttpExchange]) -> list[tuple]:
        return [(e.request.path, e.request.body_bytes, e.request.error, e.request.headers,
                 e.response and (e.response.status, e.response.body_bytes, e.response.error)) for e in done]

    reference = Http2Exchanges(requests_read=True)
    for i, (side, raw) in enumerate(conversation()):
        feed(reference, i, side, raw, len(raw))
    expected = summary(reference.finish(99))
    assert [p for p, *_ in expected] == ["/a", "/b", "/a"] and reference.error is None
    requests_read = data.draw(st.booleans())
    x = Http2Exchanges(requests_read=requests_read)
    done: list[HttpExchange] = []
    for i, (side, raw) in enumerate(conversation()):
        for piece in cut(raw, data.draw(split_points(len(raw)))):
            feed(x, i, side, piece, len(piece))
            check(x, done)
    assert summary(done + x.finish(99)) == expected and x.error is None
    no_secrets(done, x)


@FUZZ
@given(st.data())
def test_h2c_upgrade_in_random_chunks(data: st.DataObject) -> None:
    h1 = Http1Exchanges(requests_read=True, h2c_handoff=True)
    s = hpack.Encoder()
    server = (SWITCH + frame(4, 0, 0) + frame(1, 4, 1, s.encode([(":status", "200"), ("set-cookie", SECRET)]))
              + frame(0, 1, 1, b"done"))
    if data.draw(st.booleans()):
        server = data.draw(mutated(server, keep=len(SWITCH)))
    client = UPGRADE + PREFACE + frame(4, 0, 0)
    cs = [("c", p) for p in cut(client, data.draw(split_points(len(client))))]
    ss = [("s", p) for p in cut(server, data.draw(split_points(len(server))))]
    seq = []  # each side in its own order, the two interleaved at random
    while cs or ss:
        seq.append((cs if cs and (not ss or data.draw(st.booleans())) else ss).pop(0))
    h2: Http2Exchanges | None = None
    done: list[HttpExchange] = []
    for i, (side, piece) in enumerate(seq):
        target = h2 if h2 is not None else h1
        (target.on_read if side == "c" else target.on_write)(i, piece, len(piece), tid=1, round_=i)
        if h2 is None:
            h2 = Http2Exchanges.from_upgrade(h1)
        if h2 is not None:
            check(h2, done)
    if h2 is not None:
        done.extend(h2.finish(len(seq)))
        no_secrets(done, h2)
    else:
        done.extend(h1.finish(len(seq)))
    assert SECRET not in repr(done)

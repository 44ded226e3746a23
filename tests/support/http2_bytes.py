"""HTTP/2 frames built for the tests of otel_envoy.protocols.http2 and .http2_frames, independently of the
code under test: ``struct`` for frames and the ``hpack`` encoder (one per direction, as a real peer keeps
one), so the bytes are what a real HTTP/2 stack would send; plus helpers that feed a conversation to an
:class:`~otel_envoy.protocols.http2.Http2Exchanges` and summarise what came out."""

from __future__ import annotations

import struct
from collections.abc import Iterable

import hpack

from otel_envoy.protocols.http import HttpExchange
from otel_envoy.protocols.http1 import Http1Exchanges
from otel_envoy.protocols.http2 import Http2Exchanges
from otel_envoy.protocols.http2_frames import PREFACE

__all__ = [
    "ACK", "CONTINUATION", "DATA", "END_HEADERS", "END_STREAM", "GOAWAY", "HEADERS", "PADDED", "PING",
    "PRIORITY", "PRIORITY_FLAG", "PUSH_PROMISE", "RST_STREAM", "SETTINGS", "SETTINGS_ACK", "TRACEPARENT",
    "WINDOW_UPDATE", "Peer", "client_start", "conversation", "data", "frame", "get", "ping_and_window_update",
    "read", "rst", "run", "server_start", "settings", "status", "summary", "write",
]

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"

DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = (
    range(10))
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY_FLAG = 0x1, 0x1, 0x4, 0x8, 0x20


def frame(ftype: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    """One frame: 3-byte length, type, flags, stream id, payload."""
    return struct.pack(">I", len(payload))[1:] + bytes([ftype, flags]) + struct.pack(">I", sid) + payload


def settings(**values: int) -> bytes:
    """A SETTINGS frame with the named settings."""
    ids = {"header_table_size": 1, "max_concurrent_streams": 3, "initial_window_size": 4, "max_frame_size": 5}
    return frame(SETTINGS, 0, 0, b"".join(struct.pack(">HI", ids[k], v) for k, v in values.items()))


SETTINGS_ACK = frame(SETTINGS, ACK, 0)


class Peer:
    """One side of a connection: its HPACK encoder, so the dynamic table evolves as in a real stack."""

    def __init__(self) -> None:
        self.enc = hpack.Encoder()

    def block(self, fields: Iterable[tuple[str, str]]) -> bytes:
        """A header block for ``fields``, encoded with this side's HPACK state."""
        return self.enc.encode(list(fields))

    def headers(self, sid: int, fields: Iterable[tuple[str, str]], *, end_stream: bool = False) -> bytes:
        """A HEADERS frame holding a whole header block (END_HEADERS)."""
        return frame(HEADERS, END_HEADERS | (END_STREAM if end_stream else 0), sid, self.block(fields))


def data(sid: int, body: bytes, *, end_stream: bool = False, pad: int | None = None) -> bytes:
    """A DATA frame, PADDED with ``pad`` zero bytes when ``pad`` is given."""
    if pad is None:
        return frame(DATA, END_STREAM if end_stream else 0, sid, body)
    return frame(DATA, PADDED | (END_STREAM if end_stream else 0), sid, bytes([pad]) + body + bytes(pad))


def rst(sid: int, code: int) -> bytes:
    """A RST_STREAM frame with error ``code``."""
    return frame(RST_STREAM, 0, sid, struct.pack(">I", code))


def get(path: str, **extra: str) -> list[tuple[str, str]]:
    """The header fields of a GET request for ``path``."""
    return [(":method", "GET"), (":scheme", "http"), (":authority", "h.example"), (":path", path),
            *extra.items()]


def status(code: int, **extra: str) -> list[tuple[str, str]]:
    """The header fields of a response with status ``code``."""
    return [(":status", str(code)), *extra.items()]


def read(x: Http2Exchanges | Http1Exchanges, ts: int, raw: bytes, total: int | None = None) -> None:
    """Bytes Envoy read (thread 7, round ``ts``)."""
    x.on_read(ts, raw, len(raw) if total is None else total, tid=7, round_=ts)


def write(x: Http2Exchanges | Http1Exchanges, ts: int, raw: bytes, total: int | None = None) -> None:
    """Bytes Envoy wrote (thread 9, round ``ts``)."""
    x.on_write(ts, raw, len(raw) if total is None else total, tid=9, round_=ts)


def summary(done: list[HttpExchange]) -> list[tuple]:
    """The fields of exchanges that the parsers must agree on, comparable with ``==``."""
    out = []
    for e in done:
        q, r = e.request, e.response
        out.append((q.method, q.path, q.body_bytes, q.error, q.headers,
                    None if r is None else (r.status, r.body_bytes, r.error, r.headers)))
    return out


def client_start() -> bytes:
    """The client's preface and first SETTINGS."""
    return PREFACE + settings(initial_window_size=65535)


def server_start() -> bytes:
    """The server's first SETTINGS and its ACK of the client's."""
    return settings(max_concurrent_streams=100) + SETTINGS_ACK


def ping_and_window_update() -> bytes:
    """Frames without meaning for exchanges: PING, WINDOW_UPDATE, PRIORITY, an unknown type."""
    return (frame(PING, 0, 0, bytes(8)) + frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", 1 << 20))
            + frame(PRIORITY, 0, 3, struct.pack(">IB", 0, 15)) + frame(0xFA, 0, 0, b"unknown type"))


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
    """Feed ``pieces`` to a new connection, each as one syscall (``ts`` = its index)."""
    x = Http2Exchanges(requests_read=requests_read)
    for ts, (side, raw) in enumerate(pieces):
        (read if (side == "c") == requests_read else write)(x, ts, raw)
    return x


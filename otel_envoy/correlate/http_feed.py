"""A connection's HTTP parser: chosen from the first bytes of its stream, fed its captured reads/writes."""

from __future__ import annotations

from ..events.layout import load_layout
from ..events.types import DataEvent
from ..protocols.detect import Protocol, detect_protocol
from ..protocols.http1 import Http1Exchanges
from ..protocols.http2 import Http2Exchanges

__all__ = ["HttpParser", "downstream_parser", "feed_http", "upstream_parser"]

_C = load_layout().constants
DIR_READ = _C["DIR_READ"]
DATA_FLAG_H2_FRAMES = _C["DATA_FLAG_H2_FRAMES"]  # condensed HTTP/2 framing (Http2Exchanges frames_only)
#: Envoy writes whole request heads upstream: "P" or "PR" alone would be the start of a POST or PUT.
UPSTREAM_MIN_PREFACE = 3

HttpParser = Http1Exchanges | Http2Exchanges


def downstream_parser(first_read: bytes) -> HttpParser:
    """The parser of a plaintext downstream connection, from its first real read: HTTP/2 after the client
    preface, else HTTP/1.x (which may hand over to HTTP/2 after a 101 to h2c)."""
    if detect_protocol(first_read) is Protocol.H2C:
        return Http2Exchanges(requests_read=True)
    return Http1Exchanges(requests_read=True, h2c_handoff=True)


def upstream_parser(first_write: bytes) -> HttpParser | None:
    """The parser of an upstream connection whose first bytes Envoy wrote: HTTP/2 with prior knowledge or
    HTTP/1.x; None for TLS or when nothing was captured."""
    protocol = detect_protocol(first_write, min_preface_bytes=UPSTREAM_MIN_PREFACE)
    if protocol is Protocol.H2C:
        return Http2Exchanges(requests_read=False)
    if protocol is Protocol.HTTP1:
        return Http1Exchanges(requests_read=False)
    return None


def feed_http(http: HttpParser, ev: DataEvent) -> bool:
    """Hand one read/write to the connection's HTTP parser; False when it is not for that parser
    (condensed HTTP/2 framing reaches the HTTP/2 parser only)."""
    if not ev.flags & DATA_FLAG_H2_FRAMES:
        feed = http.on_read if ev.direction == DIR_READ else http.on_write
        feed(ev.ts_ns, ev.data, ev.ret, ev.tid, ev.round)
        return True
    if not isinstance(http, Http2Exchanges):
        return False
    feed2 = http.on_read if ev.direction == DIR_READ else http.on_write
    feed2(ev.ts_ns, ev.data, ev.ret, ev.tid, ev.round, frames_only=True)
    return True

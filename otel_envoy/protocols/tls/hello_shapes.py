"""ClientHellos parsed once per client shape, and ServerHellos once per shape of the server's answer.

One client's connections send ClientHellos that differ only in bytes no parsed field depends on: the
random, the session id's bytes, and the contents of extensions whose data the parse does not read (the key
shares' public keys, the padding, a GREASE ECH payload) or reads only for its presence (a PSK's identities and
binders, a session ticket). :func:`parse_client_hello_shaped` remembers, per (length, session id length), the
last hello it parsed and where those bytes lie; a hello equal to it everywhere else has the same parse (with
its own session id) and is not walked again. Anything else is parsed in full and becomes the shape of its
length. A server's ServerHellos to one kind of client differ the same way (the random, the session id it
echoes, its key share): :func:`parse_server_hello_shaped`.

Equal everywhere else means equal structure too: every length field (the session id's, each vector's, each
extension's header) lies outside the skipped bytes, so the same bytes are read the same way.
"""

from __future__ import annotations

import struct
from typing import TypeVar

from .hello import (
    EXTENSIONS_READ,
    HRR_RANDOM,
    ClientHello,
    ServerHello,
    client_fingerprints,
    parse_client_hello,
    parse_server_hello,
)

__all__ = ["parse_client_hello_shaped", "parse_server_hello_shaped"]

#: Every extension's data that no parse reads (not in EXTENSIONS_READ) and is at least _SKIP_MIN bytes long
#: is skipped (shorter ones are compared: cheaper than a separate segment).
_SKIP_MIN = 16
_SHAPES_MAX = 64
_U16 = struct.Struct(">H").unpack_from
_EXT_HEADER = struct.Struct(">HH").unpack_from

#: (length, session id length) -> (the segments compared: (start, end, bytes), the parse of that hello)
_shapes: dict[tuple[int, int], tuple[list[tuple[int, int, bytes]], ClientHello]] = {}
_server_shapes: dict[tuple[int, int], tuple[list[tuple[int, int, bytes]], ServerHello]] = {}


def _skipped_ranges(buf: bytes, server: bool = False) -> list[tuple[int, int]]:
    """The byte ranges of a well-formed Client- or ServerHello body (it parsed) that no parsed field depends
    on (a ServerHello's random is skipped too: only whether it is the HelloRetryRequest value matters, which
    a reused parse looks at again)."""
    n = buf[34]
    skipped = [(2, 34), (35, 35 + n)]  # the random, the session id
    p = 35 + n
    if server:
        p += 3  # the cipher suite, the compression method
    else:
        p += 2 + _U16(buf, p)[0]  # cipher suites
        p += 1 + buf[p]  # compression methods
    end = len(buf)
    if p == end:
        return skipped
    xend = p + 2 + _U16(buf, p)[0]
    p += 2
    while p < xend:
        etype, size = _EXT_HEADER(buf, p)
        d = p + 4
        p = d + size
        if size >= _SKIP_MIN and etype not in EXTENSIONS_READ:
            skipped.append((d, p))
    return skipped


def _segments(buf: bytes, skipped: list[tuple[int, int]]) -> list[tuple[int, int, bytes]]:
    """The ranges between the skipped ones, with their bytes."""
    out = []
    at = 0
    for start, stop in skipped:
        if start > at:
            out.append((at, start, buf[at:start]))
        at = stop
    if at < len(buf):
        out.append((at, len(buf), buf[at:]))
    return out


_V = TypeVar("_V", ClientHello, ServerHello)


def _known(shapes: dict[tuple[int, int], tuple[list[tuple[int, int, bytes]], _V]], buf: bytes) -> _V | None:
    """The parse remembered for the shape of ``buf`` (at least 35 bytes) when ``buf`` equals that hello in
    every compared byte, else None."""
    shape = shapes.get((len(buf), buf[34]))
    if shape is None:
        return None
    segments, parsed = shape
    for start, stop, expected in segments:
        if buf[start:stop] != expected:
            return None
    return parsed


def _remember(shapes: dict[tuple[int, int], tuple[list[tuple[int, int, bytes]], _V]], buf: bytes,
              parsed: _V, server: bool) -> None:
    """``parsed`` (of ``buf``, which parsed) as the shape of its length, in place of the one before."""
    if len(shapes) >= _SHAPES_MAX:
        shapes.clear()
    shapes[(len(buf), buf[34])] = (_segments(buf, _skipped_ranges(buf, server)), parsed)


def parse_client_hello_shaped(handshake_body: bytes) -> ClientHello:
    """:func:`~otel_envoy.protocols.tls.hello.parse_client_hello`, reusing the parse of an earlier hello of
    the same shape (see the module's text). The lists of the returned hello may be shared with other
    connections' hellos: read-only. Raises :class:`~otel_envoy.protocols.tls.hello.TlsParseError` as the
    parse does."""
    buf = bytes(handshake_body)
    if len(buf) < 35:
        return parse_client_hello(buf)
    ch = _known(_shapes, buf)
    if ch is not None:  # its fingerprints too: the same fields
        return ClientHello(ch.legacy_version, ch.supported_versions, ch.server_name, ch.alpn,
                           ch.cipher_suites, ch.extensions, ch.supported_groups, ch.ec_point_formats,
                           ch.signature_algorithms, buf[35:35 + buf[34]], ch.offers_psk,
                           ch.has_session_ticket, ch.alpn_raw, ch.fingerprints)
    ch = parse_client_hello(buf)  # raises for a malformed hello, which is not remembered
    client_fingerprints(ch)  # once per shape, for the hellos that reuse this parse
    _remember(_shapes, buf, ch, server=False)
    return ch


def parse_server_hello_shaped(handshake_body: bytes) -> ServerHello:
    """:func:`~otel_envoy.protocols.tls.hello.parse_server_hello`, reusing the parse of an earlier ServerHello
    of the same shape: a server's answers to one kind of client differ in their random, the session id they
    echo and their key share. Whether the random is the HelloRetryRequest value is looked at every time. The
    returned hello's extension list may be shared: read-only. Raises
    :class:`~otel_envoy.protocols.tls.hello.TlsParseError` as the parse does."""
    buf = bytes(handshake_body)
    if len(buf) < 35:
        return parse_server_hello(buf)
    sh = _known(_server_shapes, buf)
    if sh is not None:
        return ServerHello(sh.legacy_version, sh.selected_version, sh.cipher_suite, buf[35:35 + buf[34]],
                           sh.alpn, buf.startswith(HRR_RANDOM, 2), sh.psk_accepted, sh.extensions)
    sh = parse_server_hello(buf)  # raises for a malformed hello, which is not remembered
    _remember(_server_shapes, buf, sh, server=True)
    return sh

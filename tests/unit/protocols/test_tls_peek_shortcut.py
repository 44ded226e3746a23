"""first_handshake_message, the shortcut TlsHandshakeTracker takes on a peeked ClientHello, finds what the
general record reader and handshake reassembler find (or leaves the decision to them)."""

from __future__ import annotations

import ssl

import pytest

from otel_envoy.protocols.tls.record_layer import (
    HandshakeReassembler,
    TlsRecordReader,
    first_handshake_message,
)

# ------------------------------------------------------------------------------ peek shortcut


def _client_hello_record() -> bytes:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname="a.example.com")
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


def _general_first_message(data: bytes) -> tuple[int, bytes] | None:
    """What TlsHandshakeTracker._client_peek finds without the shortcut: the first handshake message."""
    hs = HandshakeReassembler()
    for rec in TlsRecordReader(collect_types={22}).feed(data, len(data)):
        if rec.content_type != 22:
            return None
        for msg in hs.feed(rec.fragment, rec.length - len(rec.fragment)):
            return msg
        return None
    return None


def _variants(hello: bytes) -> list[bytes]:
    out = [hello, hello + b"\x17\x03\x03\x00\x05hello", hello[:-1], hello[:9], hello[:5], b""]
    for i in range(9):  # a byte of the record or message header changed
        for value in (0, 1, 3, 4, 5, 0x16, 0xFF):
            out.append(hello[:i] + bytes([value]) + hello[i + 1 :])
    return out


def test_peek_shortcut_finds_what_the_record_reader_finds() -> None:
    hello = _client_hello_record()
    assert first_handshake_message(hello) == _general_first_message(hello) is not None
    for data in _variants(hello):
        fast = first_handshake_message(data)
        if fast is not None:  # None: the general path decides
            assert fast == _general_first_message(data), data[:9].hex()

"""What a connection speaks, from the first bytes one side sent: TLS, HTTP/2 with prior knowledge, or
plaintext that may be HTTP/1.x.

Only the start of a stream is looked at; whether plaintext really is HTTP/1.x is for the HTTP/1 parser to
find out (it reports what does not parse).
"""

from __future__ import annotations

from enum import Enum

from .http2 import is_h2_preface

__all__ = ["TLS_HANDSHAKE_RECORD", "Protocol", "detect_protocol", "is_tls_record"]

#: The first byte of a TLS stream: the content type of a handshake record (the ClientHello's).
TLS_HANDSHAKE_RECORD = 0x16


class Protocol(Enum):
    """What the first bytes of a stream look like."""

    TLS = "tls"  # a TLS handshake record
    H2C = "h2c"  # the HTTP/2 client preface: HTTP/2 over cleartext with prior knowledge
    HTTP1 = "http/1"  # other plaintext: HTTP/1.x if it parses as such
    UNKNOWN = "unknown"  # no bytes to tell (the capture carried none)


def detect_protocol(first_bytes: bytes, *, min_preface_bytes: int = 1) -> Protocol:
    """The protocol of a stream starting with ``first_bytes``.

    ``min_preface_bytes``: how much of the HTTP/2 client preface must be there to call it HTTP/2. Its
    first bytes "P" and "PR" also start an HTTP/1 ``POST`` or ``PUT``; a caller that can take a wrong
    guess on a 1- or 2-byte read (the first read of a client, which is rarely that short) leaves it at 1,
    one that sees whole request heads written by Envoy asks for 3.
    """
    if not first_bytes:
        return Protocol.UNKNOWN
    if first_bytes[0] == TLS_HANDSHAKE_RECORD:
        return Protocol.TLS
    if len(first_bytes) >= min_preface_bytes and is_h2_preface(first_bytes):
        return Protocol.H2C
    return Protocol.HTTP1


def is_tls_record(data: bytes) -> bool:
    """Whether ``data`` starts with a TLS record header (content type 20-23, version 3.x): how the bytes of a
    TLS connection picked up mid-stream begin, where no handshake will be seen."""
    return len(data) >= 3 and 20 <= data[0] <= 23 and data[1] == 3 and data[2] <= 4

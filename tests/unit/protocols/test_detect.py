"""detect_protocol (protocols/detect.py): what a stream speaks, from its first bytes."""

from __future__ import annotations

import pytest

from otel_envoy.protocols.detect import Protocol, detect_protocol
from otel_envoy.protocols.http2 import PREFACE

CLIENT_HELLO_START = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"


@pytest.mark.parametrize(("first", "protocol"), [
    (CLIENT_HELLO_START, Protocol.TLS),
    (b"\x16", Protocol.TLS),
    (PREFACE, Protocol.H2C),
    (PREFACE + b"\x00\x00\x12\x04", Protocol.H2C),
    (PREFACE[:7], Protocol.H2C),
    (b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", Protocol.HTTP1),
    (b"PRI * HTTP/1.1\r\n", Protocol.HTTP1),  # starts like the preface, then is not it
    (b"\x17\x03\x03\x00\x05", Protocol.HTTP1),  # not a handshake record: plaintext for the HTTP/1 parser
    (b"", Protocol.UNKNOWN),
])
def test_first_bytes_decide(first: bytes, protocol: Protocol) -> None:
    assert detect_protocol(first) is protocol
    assert detect_protocol(memoryview(first)) is protocol


def test_a_short_preface_prefix_is_http2_only_when_the_caller_accepts_so_little() -> None:
    for short in (b"P", b"PR"):
        assert detect_protocol(short) is Protocol.H2C
        assert detect_protocol(short, min_preface_bytes=3) is Protocol.HTTP1  # a POST or PUT as well
    assert detect_protocol(b"PRI", min_preface_bytes=3) is Protocol.H2C
    assert detect_protocol(b"POST / HTTP/1.1\r\n", min_preface_bytes=3) is Protocol.HTTP1

"""TLS bytes built by hand for the tests of otel_envoy.protocols.tls, independently of the code under test:
length-prefixed vectors, hello bodies, handshake messages and records, and the ClientHello of FoxIO's JA4
specification example."""

from __future__ import annotations

import dataclasses

__all__ = [
    "SPEC_CIPHERS",
    "SPEC_EXT_ORDER",
    "SPEC_SIGALGS",
    "alpn_ext",
    "client_hello_body",
    "ext",
    "handshake",
    "hello_fields",
    "record",
    "server_hello_body",
    "sni_ext",
    "spec_client_hello",
    "split_records",
    "u16s",
    "vec",
]


def vec(n: int, data: bytes) -> bytes:
    """``data`` prefixed with its length in ``n`` big-endian bytes (a TLS vector)."""
    return len(data).to_bytes(n, "big") + data


def u16s(values: list[int]) -> bytes:
    """Big-endian uint16 values, concatenated."""
    return b"".join(v.to_bytes(2, "big") for v in values)


def ext(etype: int, data: bytes = b"") -> tuple[int, bytes]:
    """An extension as ``(type, data)``, for the hello builders."""
    return etype, data


def client_hello_body(ciphers: list[int], extensions: list[tuple[int, bytes]], *, version: int = 0x0303,
                      session_id: bytes = b"") -> bytes:
    """A ClientHello handshake body (no handshake header), null compression only."""
    exts = b"".join(t.to_bytes(2, "big") + vec(2, d) for t, d in extensions)
    return (version.to_bytes(2, "big") + bytes(range(32)) + vec(1, session_id) + vec(2, u16s(ciphers))
            + vec(1, b"\x00") + vec(2, exts))


def server_hello_body(*, cipher: int = 0x1301, version: int = 0x0303, random: bytes = b"\x01" * 32,
                      extensions: list[tuple[int, bytes]] = ()) -> bytes:  # type: ignore[assignment]
    """A ServerHello handshake body (no handshake header) with a 32-byte session id."""
    exts = b"".join(t.to_bytes(2, "big") + vec(2, d) for t, d in extensions)
    return (version.to_bytes(2, "big") + random + vec(1, b"\x07" * 32) + cipher.to_bytes(2, "big") + b"\x00"
            + vec(2, exts))


def handshake(msg_type: int, body: bytes) -> bytes:
    """A handshake message: type, 3-byte length, body."""
    return bytes([msg_type]) + len(body).to_bytes(3, "big") + body


def record(content_type: int, payload: bytes, version: int = 0x0303) -> bytes:
    """A TLS record: content type, version, 2-byte length, payload."""
    return bytes([content_type]) + version.to_bytes(2, "big") + vec(2, payload)


def sni_ext(name: bytes) -> tuple[int, bytes]:
    """A server_name extension holding one host name."""
    return ext(0x0000, vec(2, b"\x00" + vec(2, name)))


def alpn_ext(protocols: list[bytes]) -> tuple[int, bytes]:
    """An ALPN extension listing ``protocols``."""
    return ext(0x0010, vec(2, b"".join(vec(1, p) for p in protocols)))


def split_records(stream: bytes) -> list[bytes]:
    """Cut a byte stream into whole records (test-side parser)."""
    out, pos = [], 0
    while pos < len(stream):
        n = 5 + int.from_bytes(stream[pos + 3 : pos + 5], "big")
        out.append(stream[pos : pos + n])
        pos += n
    assert pos == len(stream)
    return out


# FoxIO's JA4 specification (technical_details/JA4.md, "Cipher hash", "Extension hash" and "Example"
# sections; the same values are asserted by the reference implementation's rust/ja4/src/tls.rs test
# test_client_stats_into_out): these lists give JA4 = t13d1516h2_8daaf6152771_e5627efa2ab1, and the
# same extensions with no signature algorithms hash to 6d807ffa2a79.
SPEC_CIPHERS = [0x1301, 0x1302, 0x1303, 0xC02B, 0xC02F, 0xC02C, 0xC030, 0xCCA9, 0xCCA8, 0xC013, 0xC014,
                0x009C, 0x009D, 0x002F, 0x0035]
SPEC_EXT_ORDER = [0x001B, 0x0000, 0x0033, 0x0010, 0x4469, 0x0017, 0x002D, 0x000D, 0x0005, 0x0023, 0x0012,
                  0x002B, 0xFF01, 0x000B, 0x000A, 0x0015]
SPEC_SIGALGS = [0x0403, 0x0804, 0x0401, 0x0503, 0x0805, 0x0501, 0x0806, 0x0601]


def spec_client_hello(sigalgs: list[int] = SPEC_SIGALGS, groups: list[int] = (29, 23, 24),  # type: ignore[assignment]
                      ext_order: list[int] = SPEC_EXT_ORDER, ciphers: list[int] = SPEC_CIPHERS) -> bytes:
    """A ClientHello body with the given lists, plus GREASE values sprinkled everywhere."""
    data = {
        0x0000: sni_ext(b"example.com")[1],
        0x0010: alpn_ext([b"h2", b"http/1.1"])[1],
        0x000A: vec(2, u16s([0x4A4A, *groups])),
        0x000B: vec(1, b"\x00"),
        0x000D: vec(2, u16s([0x5A5A, *sigalgs]) if sigalgs else b""),
        0x002B: vec(1, u16s([0x3A3A, 0x0304, 0x0303])),
        0x002D: vec(1, b"\x01"),
        0x0033: vec(2, b"\x00\x1d" + vec(2, bytes(32))),
        0x0005: b"\x01\x00\x00\x00\x00",
        0x001B: vec(1, b"\x00\x02"),
        0x0015: bytes(20),
        0xFF01: b"\x00",
    }
    exts = [ext(0x0A0A)] + [ext(t, data.get(t, b"")) for t in ext_order] + [ext(0x1A1A, b"\x00")]
    return client_hello_body([0x2A2A, *ciphers], exts)


def hello_fields(hello: object) -> tuple:
    """What a parsed hello says, for comparing two parses: its fields; for a ClientHello, its fingerprints in
    place of the memo that holds them (computed now when the hello has none yet)."""
    from otel_envoy.protocols.tls.hello import ClientHello, client_fingerprints

    if isinstance(hello, ClientHello):
        return (*dataclasses.astuple(hello)[:-1], client_fingerprints(hello))
    return dataclasses.astuple(hello)  # type: ignore[call-overload]

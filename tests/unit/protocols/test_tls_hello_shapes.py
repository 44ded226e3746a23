"""parse_client_hello_shaped: a client's later hellos reuse the parse of its first one where only the bytes
no parsed field depends on differ (random, session id, key shares, padding, PSK and ticket contents), and give
exactly what parse_client_hello gives for any other change (hellos from OpenSSL, Python's ssl module); the
same for parse_server_hello_shaped, which also sees a HelloRetryRequest's random every time."""

from __future__ import annotations

import contextlib
import dataclasses
import ssl

import pytest

from otel_envoy.protocols.tls.hello import HRR_RANDOM, TlsParseError, parse_client_hello, parse_server_hello
from otel_envoy.protocols.tls.hello_shapes import parse_client_hello_shaped, parse_server_hello_shaped
from tests.support.tls_bytes import ext, hello_fields, server_hello_body, vec


def openssl_hello(server_name: str = "shapes.example.com",
                  alpn: tuple[str, ...] = ("h2", "http/1.1")) -> bytes:
    """A fresh ClientHello body from OpenSSL: its own random, session id and key shares each time."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.set_alpn_protocols(list(alpn))
    c_in, c_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(c_in, c_out, server_hostname=server_name)
    with contextlib.suppress(ssl.SSLWantReadError):
        obj.do_handshake()
    return c_out.read()[9:]  # after the record (5) and handshake (4) headers


def fields(parse, body: bytes) -> object:
    try:
        return hello_fields(parse(body))
    except TlsParseError as exc:
        return f"TlsParseError: {exc}"


def test_a_clients_second_hello_reuses_the_first_ones_parse() -> None:
    first, second = openssl_hello(), openssl_hello()
    assert len(first) == len(second) and first != second  # the same shape, other random bytes
    a, b = parse_client_hello_shaped(first), parse_client_hello_shaped(second)
    assert b.cipher_suites is a.cipher_suites and b.extensions is a.extensions  # reused, not parsed again
    assert b.session_id == second[35:35 + second[34]] != a.session_id  # its own session id
    assert b.fingerprints is a.fingerprints is not None  # worked out once for the shape, handed on
    assert hello_fields(b) == hello_fields(parse_client_hello(second))


def test_another_name_of_the_same_length_is_parsed_again() -> None:
    parse_client_hello_shaped(openssl_hello("aaaa.example.com"))
    other = parse_client_hello_shaped(openssl_hello("bbbb.example.com"))
    assert other.server_name == "bbbb.example.com"


@pytest.mark.parametrize("value", [0x00, 0xFF, 0x5A])
def test_every_single_byte_change_parses_as_it_would_alone(value: int) -> None:
    template = openssl_hello()
    for i in range(len(template)):
        parse_client_hello_shaped(template)  # the shape of this length is the template's again
        body = template[:i] + bytes([value]) + template[i + 1:]
        assert fields(parse_client_hello_shaped, body) == fields(parse_client_hello, body), i


def server_hello(random: bytes, key_share: bytes) -> bytes:
    """A TLS 1.3 ServerHello body: supported_versions, key_share (x25519), a 32-byte session id."""
    return server_hello_body(random=random, extensions=[
        ext(43, b"\x03\x04"), ext(51, b"\x00\x1d" + vec(2, key_share)), ext(41, b"\x00\x00")])


def test_a_servers_answers_reuse_one_parse_and_a_retry_request_is_still_seen() -> None:
    first = parse_server_hello_shaped(server_hello(b"\x01" * 32, b"\x02" * 32))
    second = parse_server_hello_shaped(server_hello(b"\x03" * 32, b"\x04" * 32))
    assert second.extensions is first.extensions  # reused, not parsed again
    assert dataclasses.astuple(second) == dataclasses.astuple(parse_server_hello(server_hello(b"\x03" * 32,
                                                                                              b"\x04" * 32)))
    retry = parse_server_hello_shaped(server_hello(HRR_RANDOM, b"\x04" * 32))  # the same shape, HRR's random
    assert retry.is_hello_retry_request and not second.is_hello_retry_request


@pytest.mark.parametrize("value", [0x00, 0xFF, 0x5A])
def test_every_single_byte_change_of_a_server_hello_parses_as_it_would_alone(value: int) -> None:
    template = server_hello(b"\x01" * 32, b"\x02" * 32)
    for i in range(len(template)):
        parse_server_hello_shaped(template)
        body = template[:i] + bytes([value]) + template[i + 1:]
        assert fields(parse_server_hello_shaped, body) == fields(parse_server_hello, body), i

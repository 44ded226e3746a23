"""Tests of otel_envoy.protocols.tls.hello: ClientHello / ServerHello parsing and the JA3, JA4 and JA3S
fingerprints, on hand-built hellos with published fingerprints."""

from __future__ import annotations

import contextlib
import hashlib

import pytest

from otel_envoy.protocols.tls.hello import HRR_RANDOM, TlsParseError, parse_client_hello, parse_server_hello
from tests.support.tls_bytes import (
    SPEC_CIPHERS,
    SPEC_EXT_ORDER,
    SPEC_SIGALGS,
    alpn_ext,
    client_hello_body,
    ext,
    server_hello_body,
    spec_client_hello,
    u16s,
    vec,
)


def test_ja4_spec_example() -> None:
    ch = parse_client_hello(spec_client_hello())
    assert ch.cipher_suites == SPEC_CIPHERS  # GREASE removed
    assert ch.extensions == SPEC_EXT_ORDER
    assert ch.supported_versions == [0x0304, 0x0303]
    assert ch.signature_algorithms == SPEC_SIGALGS
    assert ch.server_name == "example.com"
    assert ch.alpn == ["h2", "http/1.1"]
    assert ch.max_version() == 0x0304
    assert ch.ja4() == "t13d1516h2_8daaf6152771_e5627efa2ab1"
    assert parse_client_hello(spec_client_hello(sigalgs=[])).ja4() == "t13d1516h2_8daaf6152771_6d807ffa2a79"


def test_ja3_computed_independently() -> None:
    ch = parse_client_hello(spec_client_hello())
    expected = ("771," + "-".join(str(c) for c in SPEC_CIPHERS) + ","
                + "-".join(str(e) for e in SPEC_EXT_ORDER) + ",29-23-24,0")
    assert ch.ja3_string() == expected
    assert ch.ja3() == hashlib.md5(expected.encode()).hexdigest()


def test_ja3_ja4_chrome_143_published_pair() -> None:
    """Chrome 143 values as reported by browserleaks' TLS page (JA3 text/hash, JA4, JA4_ro).

    Checked for internal consistency before use: md5(ja3_text) == ja3_hash, and sha256 of the sorted
    lists of JA4_r give the JA4 b/c parts.
    """
    ciphers = [0x1301, 0x1302, 0x1303, 0xC02B, 0xC02F, 0xC02C, 0xC030, 0xCCA9, 0xCCA8, 0xC013, 0xC014,
               0x009C, 0x009D, 0x002F, 0x0035]
    exts = [0x002D, 0x0033, 0x0010, 0xFE0D, 0x0017, 0x44CD, 0x0000, 0x000B, 0x000A, 0x002B, 0xFF01, 0x0023,
            0x0012, 0x0005, 0x000D, 0x001B]
    ch = parse_client_hello(spec_client_hello(groups=[4588, 29, 23, 24], ext_order=exts, ciphers=ciphers))
    assert ch.ja3_string() == (
        "771,4865-4866-4867-49195-49199-49196-49200-52393-52392-49171-49172-156-157-47-53,"
        "45-51-16-65037-23-17613-0-11-10-43-65281-35-18-5-13-27,4588-29-23-24,0")
    assert ch.ja3() == "98487aa16281980e7d1120d399efb6a4"
    assert ch.ja4() == "t13d1516h2_8daaf6152771_d8a2da3f94cd"


@pytest.mark.parametrize(("first_alpn", "expected"), [
    # the examples listed in JA4.md "ALPN Extension Value"
    (b"\xab", "ab"), (b"\x20", "20"), (b"\xab\xcd", "ad"), (b"\x20\x61", "21"), (b"\x30\xab", "3b"),
    (b"\x61\x20", "60"), (b"\x30\x31\xab\xcd", "3d"), (b"\x30\xab\xcd\x31", "01"),
    (b"h2", "h2"), (b"http/1.1", "h1"), (b"h", "hh"), (b"", "00"),
])
def test_ja4_alpn_chars(first_alpn: bytes, expected: str) -> None:
    body = client_hello_body([0x1301], [alpn_ext([first_alpn, b"h2"])])
    assert parse_client_hello(body).ja4()[8:10] == expected


def test_ja4_without_sni_alpn_extensions_or_ciphers() -> None:
    ch = parse_client_hello(client_hello_body([], [], version=0x0301))
    assert ch.ja4() == "t10i000000_000000000000_000000000000"
    sigalgs = ext(0x000D, vec(2, u16s([0x0401])))
    ch = parse_client_hello(client_hello_body([0x002F], [alpn_ext([b"h2"]), sigalgs], version=0x0303))
    assert ch.ja4().startswith("t12i0102h2_")
    assert ch.ja4().endswith("_" + hashlib.sha256(b"000d_0401").hexdigest()[:12])
    legacy_only = parse_client_hello(client_hello_body([0x0035], [ext(0x0000 + 0x0A0A)], version=0x0300))
    assert legacy_only.ja4().startswith("ts3i0100")
    assert legacy_only.extensions == []


def test_client_hello_flags_and_no_extension_block() -> None:
    body = client_hello_body([0x1301], [ext(0x0023, b"\x01\x02"), ext(0x002A), ext(0x0029, b"\x00")],
                             session_id=b"\x09" * 32)
    ch = parse_client_hello(body)
    assert ch.has_session_ticket and ch.offers_psk and ch.offers_early_data()
    assert ch.session_id == b"\x09" * 32
    assert not parse_client_hello(client_hello_body([1], [ext(0x0023)])).has_session_ticket
    bare = (0x0303).to_bytes(2, "big") + bytes(32) + b"\x00" + vec(2, u16s([0x002F])) + b"\x01\x00"
    ch = parse_client_hello(bare)
    assert ch.extensions == [] and ch.cipher_suites == [0x002F] and ch.max_version() == 0x0303


def test_parse_errors_are_tls_parse_errors() -> None:
    body = spec_client_hello()
    for cut in range(len(body)):
        with contextlib.suppress(TlsParseError):  # the only acceptable failure
            parse_client_hello(body[:cut])
    with pytest.raises(TlsParseError):
        parse_client_hello(b"")
    with pytest.raises(TlsParseError):  # odd-length cipher list
        parse_client_hello(b"\x03\x03" + bytes(32) + b"\x00" + b"\x00\x03\x13\x01\x00" + b"\x01\x00")
    with pytest.raises(TlsParseError):  # 33-byte session id
        parse_client_hello(b"\x03\x03" + bytes(32) + vec(1, bytes(33)) + b"\x00\x02\x13\x01\x01\x00")
    assert issubclass(TlsParseError, ValueError)
    sh = server_hello_body(extensions=[ext(0x002B, b"\x03\x04")])
    for cut in range(len(sh)):
        with contextlib.suppress(TlsParseError):
            parse_server_hello(sh[:cut])


def test_server_hello_fields_and_hello_retry_request() -> None:
    assert hashlib.sha256(b"HelloRetryRequest").digest() == HRR_RANDOM
    sh = parse_server_hello(server_hello_body(cipher=0x1302, extensions=[
        ext(0x002B, b"\x03\x04"), ext(0x0029, b"\x00\x00"), ext(0x0033, b"\x00\x1d" + vec(2, bytes(32)))]))
    assert (sh.selected_version, sh.cipher_suite, sh.psk_accepted, sh.is_hello_retry_request) == (
        0x0304, 0x1302, True, False)
    assert sh.extensions == [0x002B, 0x0029, 0x0033]
    assert sh.session_id == b"\x07" * 32
    hrr = parse_server_hello(server_hello_body(random=HRR_RANDOM, extensions=[ext(0x002B, b"\x03\x04")]))
    assert hrr.is_hello_retry_request
    tls12 = parse_server_hello(server_hello_body(cipher=0xC02F, extensions=[alpn_ext([b"h2"])]))
    assert (tls12.selected_version, tls12.alpn, tls12.psk_accepted) == (0x0303, "h2", False)
    assert tls12.ja3s() == hashlib.md5(b"771,49199,16").hexdigest()

"""Tests of otel_envoy.protocols.tls: hello parsing, fingerprints, record reassembly, handshake tracking.

Real handshakes are produced in memory by Python's ``ssl`` module (OpenSSL): the exact bytes each side
writes are fed to the tracker as Envoy's reads (client -> Envoy) and writes (Envoy -> client).
"""

from __future__ import annotations

import contextlib
import hashlib
import shutil
import ssl
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from otel_envoy.protocols.tls import (
    HRR_RANDOM,
    MAX_HANDSHAKE_MESSAGE,
    MAX_RECORD_LEN,
    HandshakeReassembler,
    TlsHandshakeTracker,
    TlsParseError,
    TlsRecordReader,
    cipher_suite_name,
    parse_client_hello,
    parse_server_hello,
    tls_version_name,
)
from tests.support.tls_memory import MemoryTls, Msg

# --------------------------------------------------------------------------------------------------
# Byte builders (independent of the module under test)
# --------------------------------------------------------------------------------------------------


def vec(n: int, data: bytes) -> bytes:
    return len(data).to_bytes(n, "big") + data


def u16s(values: list[int]) -> bytes:
    return b"".join(v.to_bytes(2, "big") for v in values)


def ext(etype: int, data: bytes = b"") -> tuple[int, bytes]:
    return etype, data


def client_hello_body(ciphers: list[int], extensions: list[tuple[int, bytes]], *, version: int = 0x0303,
                      session_id: bytes = b"") -> bytes:
    exts = b"".join(t.to_bytes(2, "big") + vec(2, d) for t, d in extensions)
    return (version.to_bytes(2, "big") + bytes(range(32)) + vec(1, session_id) + vec(2, u16s(ciphers))
            + vec(1, b"\x00") + vec(2, exts))


def server_hello_body(*, cipher: int = 0x1301, version: int = 0x0303, random: bytes = b"\x01" * 32,
                      extensions: list[tuple[int, bytes]] = ()) -> bytes:  # type: ignore[assignment]
    exts = b"".join(t.to_bytes(2, "big") + vec(2, d) for t, d in extensions)
    return (version.to_bytes(2, "big") + random + vec(1, b"\x07" * 32) + cipher.to_bytes(2, "big") + b"\x00"
            + vec(2, exts))


def handshake(msg_type: int, body: bytes) -> bytes:
    return bytes([msg_type]) + len(body).to_bytes(3, "big") + body


def record(content_type: int, payload: bytes, version: int = 0x0303) -> bytes:
    return bytes([content_type]) + version.to_bytes(2, "big") + vec(2, payload)


def sni_ext(name: bytes) -> tuple[int, bytes]:
    return ext(0x0000, vec(2, b"\x00" + vec(2, name)))


def alpn_ext(protocols: list[bytes]) -> tuple[int, bytes]:
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


# --------------------------------------------------------------------------------------------------
# JA3 / JA4 on hand-built ClientHellos with published fingerprints
# --------------------------------------------------------------------------------------------------

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


def test_names() -> None:
    assert [tls_version_name(v) for v in (0x0304, 0x0303, 0x0302, 0x0301, 0x0300, 0x7F1C)] == [
        "1.3", "1.2", "1.1", "1.0", "3.0", "0x7F1C"]
    assert cipher_suite_name(0x1301) == "TLS_AES_128_GCM_SHA256"
    assert cipher_suite_name(0xC02F) == "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256"
    assert cipher_suite_name(0xCCA9) == "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256"
    assert cipher_suite_name(0x002F) == "TLS_RSA_WITH_AES_128_CBC_SHA"
    assert cipher_suite_name(0x009D) == "TLS_RSA_WITH_AES_256_GCM_SHA384"
    assert cipher_suite_name(0xABCD) == "0xABCD"


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl CLI not installed")
def test_cipher_names_match_openssl_standard_names() -> None:
    out = subprocess.run(["openssl", "ciphers", "-V", "-stdname", "ALL:COMPLEMENTOFALL"], capture_output=True,
                         text=True, check=True).stdout
    checked = 0
    for line in out.splitlines():
        parts = line.split()
        if len(parts) < 3 or not parts[0].startswith("0x"):
            continue
        hi, lo = parts[0].split(",")
        code = (int(hi, 16) << 8) | int(lo, 16)
        name = cipher_suite_name(code)
        if not name.startswith("0x"):
            assert name == parts[2], hex(code)
            checked += 1
    assert checked >= 30


# --------------------------------------------------------------------------------------------------
# Record layer and handshake reassembly
# --------------------------------------------------------------------------------------------------


def test_record_reader_split_and_counters() -> None:
    stream = record(22, b"a" * 10) + record(20, b"\x01") + record(23, b"") + record(23, b"z" * 300)
    reader = TlsRecordReader()
    got = []
    for i in range(len(stream)):
        got += reader.feed(stream[i : i + 1])
        assert reader.buffered_bytes <= 5 + 300
    assert [(r.content_type, r.length, r.fragment, r.complete) for r in got] == [
        (22, 10, b"a" * 10, True), (20, 1, b"\x01", True), (23, 0, b"", True), (23, 300, b"z" * 300, True)]
    assert reader.records == {22: 1, 20: 1, 23: 2}
    assert reader.bytes == len(stream) and reader.error is None
    assert reader.buffered_bytes == 0


def test_record_reader_collect_types_skips_bodies() -> None:
    reader = TlsRecordReader(collect_types=[21])
    recs = reader.feed(record(23, b"x" * 1000) + record(21, b"\x02\x28"))
    assert [(r.content_type, r.fragment) for r in recs] == [(23, b""), (21, b"\x02\x28")]


def test_record_reader_gap_inside_body_stays_in_sync() -> None:
    rec1, rec2 = record(22, bytes(range(200))), record(20, b"\x01")
    reader = TlsRecordReader()
    assert reader.feed(rec1[:50], total_len=120) == []  # 70 body bytes missing, still inside rec1
    out = reader.feed(rec1[120:] + rec2)
    assert [(r.content_type, r.complete, len(r.fragment)) for r in out] == [(22, False, 45), (20, True, 1)]
    assert out[0].fragment == rec1[5:50]
    assert reader.error is None and reader.missing_bytes == 70


def test_record_reader_gap_over_header_desyncs() -> None:
    rec1 = record(22, b"q" * 20)
    reader = TlsRecordReader()
    out = reader.feed(rec1[:10], total_len=len(rec1) + 40)  # hole runs past rec1 into the next header
    assert [(r.length, r.complete, r.fragment) for r in out] == [(20, False, b"q" * 5)]
    assert reader.error is not None and "desynchronised" in reader.error and reader.desynced
    assert reader.feed(record(23, b"later")) == []  # no resync by default
    resyncing = TlsRecordReader(resync=True)
    resyncing.feed(rec1, total_len=len(rec1) + 3)
    assert resyncing.error is not None
    assert resyncing.feed(b"\x00\x01\x02") == []  # still lost: not a plausible header
    assert [r.fragment for r in resyncing.feed(record(23, b"later"))] == [b"later"]
    assert resyncing.error is None and resyncing.resyncs == 1


@pytest.mark.parametrize("bad", [b"\x17\x03\x03\xff\xff", b"\x19\x03\x03\x00\x01", b"\x16\x02\x00\x00\x01",
                                 b"GET / HTTP/1.1\r\n"])
def test_record_reader_rejects_non_tls(bad: bytes) -> None:
    reader = TlsRecordReader(resync=True)
    assert reader.feed(bad) == []
    assert reader.error is not None and reader.error.startswith("not a TLS record")
    assert reader.feed(record(22, b"ok")) == []  # invalid data is final, even with resync


def test_record_reader_max_length_accepted() -> None:
    reader = TlsRecordReader()
    big = record(23, bytes(MAX_RECORD_LEN))
    out = reader.feed(big[:9000]) + reader.feed(big[9000:])
    assert [r.length for r in out] == [MAX_RECORD_LEN] and reader.error is None


def test_handshake_reassembler_spanning_and_packed() -> None:
    m1, m2, m3 = handshake(1, b"A" * 10), handshake(11, b"B" * 3000), handshake(14, b"")
    hs = HandshakeReassembler()
    stream = m1 + m2 + m3
    got = []
    for frag in (stream[:7], stream[7:1000], stream[1000:2500], stream[2500:]):
        got += hs.feed(frag)
    assert got == [(1, b"A" * 10), (11, b"B" * 3000), (14, b"")]
    assert hs.buffered_bytes == 0 and hs.messages == 3


def test_handshake_reassembler_gap_inside_message_keeps_sync() -> None:
    m1, m2 = handshake(11, b"C" * 500), handshake(12, b"D" * 20)
    hs = HandshakeReassembler()
    assert hs.feed(m1[:100], missing=300) == []  # 100 of 504 captured, 300 missing: 104 still to come
    assert hs.feed(m1[400:] + m2) == [(12, b"D" * 20)]
    assert hs.lost == 1 and hs.error is None
    hs2 = HandshakeReassembler()
    assert hs2.feed(m1, missing=10) == [(11, b"C" * 500)]  # hole at a message boundary: header lost
    assert hs2.error is not None
    assert hs2.feed(m2) == []


def test_handshake_reassembler_skips_oversized_messages() -> None:
    hs = HandshakeReassembler(max_message=1000)
    big, small = handshake(11, b"E" * 5000), handshake(14, b"")
    got = []
    for i in range(0, len(big), 700):
        got += hs.feed(big[i : i + 700])
        assert hs.buffered_bytes <= 1000
    got += hs.feed(small)
    assert got == [(14, b"")] and hs.skipped == 1 and hs.error is None
    at_limit = handshake(11, bytes(MAX_HANDSHAKE_MESSAGE - 4))
    over = handshake(11, bytes(MAX_HANDSHAKE_MESSAGE - 3))
    assert [len(b) for _, b in HandshakeReassembler().feed(at_limit)] == [MAX_HANDSHAKE_MESSAGE - 4]
    assert HandshakeReassembler().feed(over) == []


# --------------------------------------------------------------------------------------------------
# Real handshakes (Python ssl / OpenSSL, in memory)
# --------------------------------------------------------------------------------------------------

# ("c", bytes the client sent = what Envoy read) / ("s", bytes the server sent = what Envoy wrote)


@dataclass
class Pki:
    cert: str
    key: str


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    if shutil.which("openssl") is None:
        pytest.skip("openssl CLI not installed")
    d: Path = tmp_path_factory.mktemp("tlscerts")
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-subj", "/CN=a.example.com", "-days", "1", "-addext",
                    "subjectAltName=DNS:a.example.com", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return Pki(str(cert), str(key))


@dataclass
class Contexts:
    client: ssl.SSLContext
    server: ssl.SSLContext


def make_contexts(pki: Pki, max_version: ssl.TLSVersion | None = None) -> Contexts:
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(pki.cert, pki.key)
    server.set_alpn_protocols(["h2", "http/1.1"])
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.load_verify_locations(pki.cert)
    client.set_alpn_protocols(["h2", "http/1.1"])
    if max_version is not None:
        client.maximum_version = max_version
    return Contexts(client, server)


@dataclass
class Transcript:
    msgs: list[Msg]
    client: ssl.SSLObject
    server: ssl.SSLObject
    errors: list[tuple[str, Exception]] = field(default_factory=list)


def run_handshake(ctx: Contexts, *, session: ssl.SSLSession | None = None, exchange: bool = True,
                  sni: str = "a.example.com") -> Transcript:
    """Drive client and server to the end of the handshake; record what each side wrote, in order."""
    pair = MemoryTls.wrap(ctx.client, ctx.server, sni=sni, session=session)
    pair.handshake()
    if exchange and not pair.errors:
        pair.exchange(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", b"HTTP/1.1 204 No Content\r\n\r\n")
    return Transcript(pair.msgs, pair.client, pair.server, pair.errors)


def ts_of(i: int) -> int:
    return 1_000_000 * (i + 1)


def feed(msgs: list[Msg], tracker: TlsHandshakeTracker | None = None,
         chunker: Callable[[bytes], list[bytes]] | None = None) -> TlsHandshakeTracker:
    t = tracker or TlsHandshakeTracker()
    for i, (d, data) in enumerate(msgs):
        for piece in (chunker(data) if chunker else [data]):
            if d == "c":
                t.on_client_data(ts_of(i), piece, len(piece))
            else:
                t.on_server_data(ts_of(i), piece, len(piece))
    return t


def index_of_first(msgs: list[Msg], direction: str, after: int, pred: Callable[[bytes], bool]) -> int:
    return next(i for i, (d, b) in enumerate(msgs) if i > after and d == direction and pred(b))


def cipher_code(obj: ssl.SSLObject, ctx: ssl.SSLContext) -> int:
    name = obj.cipher()[0]
    return next(c["id"] & 0xFFFF for c in ctx.get_ciphers() if c["name"] == name)


def assert_common(t: TlsHandshakeTracker, tr: Transcript) -> None:
    assert t.is_tls is True
    assert t.error is None, t.error
    assert t.client_hello is not None and t.server_hello is not None
    assert t.client_hello.server_name == "a.example.com"
    assert t.client_hello.alpn == ["h2", "http/1.1"]
    assert t.started_ns == ts_of(0)
    assert t.server_hello_ns is not None and t.completed_ns is not None
    assert t.started_ns <= t.server_hello_ns < t.completed_ns
    assert t.summary()["tls.established"] is True


def test_tls13_full_handshake(pki: Pki) -> None:
    ctx = make_contexts(pki)
    tr = run_handshake(ctx)
    t = feed(tr.msgs)
    assert_common(t, tr)
    assert tr.client.version() == "TLSv1.3"
    assert t.version == "1.3" and t.resumed is False and t.hello_retry_request is None
    assert t.cipher == tr.client.cipher()[0]  # OpenSSL names TLS 1.3 suites by their IANA names
    assert t.negotiated_alpn is None  # ALPN travels in the encrypted EncryptedExtensions
    sh_idx = index_of_first(tr.msgs, "s", 0, lambda b: True)
    assert t.server_hello_ns == ts_of(sh_idx)
    assert t.completed_ns == ts_of(sh_idx + 1)  # client CCS + encrypted Finished
    assert t.app_records_in == 1  # the HTTP request
    assert t.app_records_out >= 2  # session ticket(s) + the response
    assert t.records_in == sum(len(split_records(b)) for d, b in tr.msgs if d == "c")
    assert t.bytes_out == sum(len(b) for d, b in tr.msgs if d == "s")
    s = t.summary()
    assert s["tls.protocol.name"] == "tls" and s["tls.protocol.version"] == "1.3"
    assert s["tls.client.server_name"] == "a.example.com"
    assert s["tls.client.supported_alpn"] == ["h2", "http/1.1"]
    assert s["tls.cipher"] == tr.client.cipher()[0] and s["tls.resumed"] is False
    assert "tls.next_protocol" not in s
    assert s["tls.client.ja4"].startswith("t13d")  # type: ignore[union-attr]
    assert len(s["tls.client.ja3"]) == 32  # type: ignore[arg-type]
    assert all(isinstance(c, str) for c in s["tls.client.supported_ciphers"])  # type: ignore[union-attr]


def test_tls12_full_handshake(pki: Pki) -> None:
    ctx = make_contexts(pki, ssl.TLSVersion.TLSv1_2)
    tr = run_handshake(ctx)
    t = feed(tr.msgs)
    assert_common(t, tr)
    assert tr.client.version() == "TLSv1.2"
    assert t.version == "1.2" and t.resumed is False
    code = cipher_code(tr.client, ctx.client)
    assert t.server_hello is not None and t.server_hello.cipher_suite == code
    assert t.cipher == cipher_suite_name(code) and t.cipher.startswith("TLS_ECDHE_ECDSA_WITH_")
    assert t.negotiated_alpn == tr.client.selected_alpn_protocol() == "h2"
    # complete at the server's second flight (its CCS), after the client's CCS
    client_ccs = index_of_first(tr.msgs, "c", 0, lambda b: any(r[0] == 20 for r in split_records(b)))
    server_ccs = index_of_first(tr.msgs, "s", client_ccs, lambda b: any(r[0] == 20 for r in split_records(b)))
    assert t.completed_ns == ts_of(server_ccs)
    assert t.summary()["tls.next_protocol"] == "h2"
    assert t.app_records_in == 1 and t.app_records_out == 1


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_resumed_session(pki: Pki, version: ssl.TLSVersion) -> None:
    ctx = make_contexts(pki, version)
    first = run_handshake(ctx)
    assert first.client.session is not None
    tr = run_handshake(ctx, session=first.client.session)
    assert tr.client.session_reused
    t = feed(tr.msgs)
    assert_common(t, tr)
    assert t.resumed is True and t.summary()["tls.resumed"] is True
    assert t.client_hello is not None
    if version == ssl.TLSVersion.TLSv1_2:
        assert t.version == "1.2" and t.client_hello.has_session_ticket
        # abbreviated: server flight SH..CCS..Finished, then the client's CCS completes
        sh_idx = index_of_first(tr.msgs, "s", 0, lambda b: True)
        assert t.completed_ns == ts_of(sh_idx + 1) and tr.msgs[sh_idx + 1][0] == "c"
    else:
        assert t.version == "1.3" and t.client_hello.offers_psk
        assert t.server_hello is not None and t.server_hello.psk_accepted
    # the first handshake of the pair was not resumed
    assert feed(first.msgs).resumed is False


def test_hello_retry_request(pki: Pki) -> None:
    ctx = make_contexts(pki)
    ctx.server.set_ecdh_curve("secp384r1")  # client's default key share (x25519) is refused
    tr = run_handshake(ctx)
    assert not tr.errors
    t = feed(tr.msgs)
    assert_common(t, tr)
    assert t.hello_retry_request is not None and t.hello_retry_request.is_hello_retry_request
    assert t.version == "1.3" and t.server_hello is not None and not t.server_hello.is_hello_retry_request
    second_sh = [i for i, (d, _) in enumerate(tr.msgs) if d == "s"][1]
    assert t.server_hello_ns == ts_of(second_sh) and t.completed_ns == ts_of(second_sh + 1)


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_one_byte_at_a_time(pki: Pki, version: ssl.TLSVersion) -> None:
    ctx = make_contexts(pki, version)
    for tr in (run_handshake(ctx), run_handshake(ctx, session=run_handshake(ctx).client.session)):
        whole = feed(tr.msgs)
        t = TlsHandshakeTracker()
        peak = 0
        for i, (d, data) in enumerate(tr.msgs):
            for k in range(len(data)):
                (t.on_client_data if d == "c" else t.on_server_data)(ts_of(i), data[k : k + 1], 1)
                peak = max(peak, t.buffered_bytes())
        assert t.error is None and t.completed_ns is not None
        for attr in ("version", "cipher", "resumed", "negotiated_alpn", "completed_ns", "server_hello_ns",
                     "started_ns", "app_records_in", "app_records_out", "records_in", "records_out"):
            assert getattr(t, attr) == getattr(whole, attr), attr
        assert t.summary() == whole.summary()
        assert peak <= 2 * (MAX_RECORD_LEN + 5) + 2 * MAX_HANDSHAKE_MESSAGE


def test_peek_sets_start_without_consuming(pki: Pki) -> None:
    tr = run_handshake(make_contexts(pki))
    ch = tr.msgs[0][1]
    t = TlsHandshakeTracker()
    t.on_client_data(100, ch[:20], 20, peek=True)  # tls_inspector's first, short peek
    assert t.is_tls is True and t.client_hello is None and t.started_ns == 100
    t.on_client_data(200, ch, len(ch), peek=True)
    assert t.client_hello is not None and t.client_hello.server_name == "a.example.com"
    assert t.records_in == 0 and t.bytes_in == 0 and t.started_ns == 100
    for i, (d, data) in enumerate(tr.msgs):
        (t.on_client_data if d == "c" else t.on_server_data)(1000 + i, data, len(data))
    assert t.started_ns == 100 and t.completed_ns is not None and t.error is None
    assert t.records_in == sum(len(split_records(b)) for d, b in tr.msgs if d == "c")


def test_truncated_capture_gap_inside_certificate_record_still_completes(pki: Pki) -> None:
    tr = run_handshake(make_contexts(pki, ssl.TLSVersion.TLSv1_2))
    msgs: list[tuple[str, bytes, int]] = []  # (direction, captured, total_len): one write per record
    cert_seen = False
    for d, data in tr.msgs:
        for rec in split_records(data):
            if d == "s" and rec[0] == 22 and rec[5] == 11:  # the Certificate record
                msgs.append((d, rec[: len(rec) // 2], len(rec)))
                cert_seen = True
            else:
                msgs.append((d, rec, len(rec)))
    assert cert_seen
    t = TlsHandshakeTracker(resync=False)
    for i, (d, data, total) in enumerate(msgs):
        if d == "c":
            t.on_client_data(ts_of(i), data, total)
        else:
            t.on_server_data(ts_of(i), data, total)
    assert t.error is None and t.warnings == []
    assert t.completed_ns is not None and t.version == "1.2" and t.resumed is False
    assert t.bytes_out == sum(total for d, _, total in msgs if d == "s")


def test_truncated_tls13_server_flight_desyncs_but_completes(pki: Pki) -> None:
    tr = run_handshake(make_contexts(pki))
    t = TlsHandshakeTracker()
    sh_idx = index_of_first(tr.msgs, "s", 0, lambda b: True)
    for i, (d, data) in enumerate(tr.msgs):
        if i == sh_idx:
            first_len = len(split_records(data)[0])  # the ServerHello record is captured, the rest not
            t.on_server_data(ts_of(i), data[: first_len + 2], len(data))
            assert t.server_hello is not None
            assert t.error is not None and t.error.startswith("server stream: desynchronised")
        elif d == "c":
            t.on_client_data(ts_of(i), data, len(data))
        else:
            t.on_server_data(ts_of(i), data, len(data))
    assert t.completed_ns == ts_of(sh_idx + 1) and t.error is None and t.version == "1.3"


def test_truncated_tls12_server_flight_resyncs_on_next_write(pki: Pki) -> None:
    tr = run_handshake(make_contexts(pki, ssl.TLSVersion.TLSv1_2))
    sh_idx = index_of_first(tr.msgs, "s", 0, lambda b: True)

    def run(resync: bool) -> TlsHandshakeTracker:
        t = TlsHandshakeTracker(resync=resync)
        for i, (d, data) in enumerate(tr.msgs):
            if i == sh_idx:  # capture keeps the ServerHello and part of the Certificate, not the rest
                t.on_server_data(ts_of(i), data[:300], len(data))
            elif d == "c":
                t.on_client_data(ts_of(i), data, len(data))
            else:
                t.on_server_data(ts_of(i), data, len(data))
        return t

    t = run(resync=True)
    assert t.server_hello is not None and t.completed_ns is not None and t.error is None
    assert t.version == "1.2" and t._sr.resyncs == 1
    stuck = run(resync=False)  # gap covering a header: error set, no exception, no completion
    assert stuck.completed_ns is None
    assert stuck.error is not None and "desynchronised" in stuck.error
    assert stuck.summary()["tls.established"] is False


def test_gap_covering_client_header_sets_error_without_raising() -> None:
    body = spec_client_hello()
    ch_record = record(22, handshake(1, body), version=0x0301)
    t = TlsHandshakeTracker(resync=False)
    t.on_client_data(1, ch_record, len(ch_record) + 500)  # more bytes followed but were not captured
    assert t.client_hello is not None  # the record itself was whole
    assert t.error is not None and t.error.startswith("client stream: desynchronised")
    t.on_client_data(2, b"\x99" * 50, 50)
    t.on_server_data(3, b"\x16\x03\x03", 3)
    assert t.completed_ns is None and t.error is not None
    # ... and a ClientHello cut by such a gap is reported as not captured, not as malformed
    t2 = TlsHandshakeTracker()
    t2.on_client_data(1, ch_record[:100], len(ch_record) + 500)
    assert t2.client_hello is None and t2.warnings == ["ClientHello not fully captured"]
    assert t2.error is not None and "desynchronised" in t2.error


def test_not_tls() -> None:
    t = TlsHandshakeTracker()
    t.on_client_data(1, b"GET / HTTP/1.1\r\n", 16)
    assert t.is_tls is False and t.summary() == {} and t.error is None
    t.on_client_data(2, b"Host: x\r\n\r\n", 11)
    t.on_server_data(3, b"HTTP/1.1 200 OK\r\n", 17)
    assert t.is_tls is False and t.client_hello is None
    undecided = TlsHandshakeTracker()
    undecided.on_client_data(1, b"\x16", 1)
    assert undecided.is_tls is None and undecided.summary() == {}
    undecided.on_client_data(2, b"\x03\x01", 2)
    assert undecided.is_tls is True
    wrong_version = TlsHandshakeTracker()
    wrong_version.on_client_data(1, b"\x16\x07", 2)
    assert wrong_version.is_tls is False
    server_first = TlsHandshakeTracker()
    server_first.on_server_data(1, b"220 smtp ready\r\n", 16)
    assert server_first.is_tls is False


def test_alert_protocol_version(pki: Pki) -> None:
    ctx = make_contexts(pki, ssl.TLSVersion.TLSv1_2)
    ctx.server.minimum_version = ssl.TLSVersion.TLSv1_3
    tr = run_handshake(ctx)
    assert tr.errors
    t = feed(tr.msgs)
    assert t.error == "tls alert fatal/protocol_version"
    assert t.alerts == [("server", 2, 70)]
    assert t.completed_ns is None and t.summary()["tls.established"] is False


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_alert_unknown_ca_from_client(pki: Pki, version: ssl.TLSVersion) -> None:
    ctx = make_contexts(pki, version)
    ctx.client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # trusts nothing: rejects the self-signed cert
    ctx.client.maximum_version = version
    tr = run_handshake(ctx)
    t = feed(tr.msgs)
    assert t.error == "tls alert fatal/unknown_ca" and t.alerts == [("client", 2, 48)]
    assert t.completed_ns is None and t.server_hello is not None


def test_tls13_client_certificate_required_but_missing(pki: Pki) -> None:
    ctx = make_contexts(pki)
    ctx.server.verify_mode = ssl.CERT_REQUIRED
    ctx.server.load_verify_locations(pki.cert)
    tr = run_handshake(ctx)
    assert [name for name, _ in tr.errors] == ["s"]
    t = feed(tr.msgs)
    assert t.completed_ns is None
    assert t.error == "tls alert (encrypted) from the server after the client Finished"
    # with the client certificate the same handshake completes
    ctx.client.load_cert_chain(pki.cert, pki.key)
    tr = run_handshake(ctx)
    assert not tr.errors
    t = feed(tr.msgs)
    assert t.completed_ns is not None and t.error is None


def test_tls13_lone_short_client_record_is_an_encrypted_alert() -> None:
    ch = record(22, handshake(1, spec_client_hello()), version=0x0301)
    sh = record(22, handshake(2, server_hello_body(extensions=[ext(0x002B, b"\x03\x04")])))
    t = TlsHandshakeTracker()
    t.on_client_data(1, ch, len(ch))
    t.on_server_data(2, sh + record(20, b"\x01") + record(23, bytes(400)), len(sh) + 6 + 405)
    t.on_client_data(3, record(20, b"\x01") + record(23, bytes(19)), 6 + 24)
    assert t.completed_ns is None and t.error == "tls alert (encrypted)"
    t.on_client_data(4, record(23, bytes(53)), 58)  # it was not: e.g. an empty Certificate, then Finished
    assert t.completed_ns == 4 and t.error is None


def test_warning_alert_in_tls12_is_not_fatal() -> None:
    ch = record(22, handshake(1, spec_client_hello()), version=0x0301)
    t = TlsHandshakeTracker()
    t.on_client_data(1, ch, len(ch))
    t.on_server_data(2, record(21, b"\x01\x70"), 7)  # warning / unrecognized_name, handshake goes on
    assert t.error is None and t.alerts == [("server", 1, 112)]
    assert t.warnings == ["server sent tls alert warning/unrecognized_name"]
    t.on_server_data(3, record(21, b"\x01\x00"), 7)  # close_notify ends it whatever the level
    assert t.error == "tls alert warning/close_notify"


def test_malformed_client_hello_is_recorded() -> None:
    t = TlsHandshakeTracker()
    bad = record(22, handshake(1, b"\x03\x03" + bytes(10)), version=0x0301)
    t.on_client_data(1, bad, len(bad))
    assert t.client_hello is None and t.error is not None and t.error.startswith("malformed ClientHello")


def test_data_types_and_no_total_len() -> None:
    body = record(22, handshake(1, spec_client_hello()), version=0x0301)
    for data in (bytearray(body), memoryview(body)):
        t = TlsHandshakeTracker()
        t.on_client_data(1, data)  # type: ignore[arg-type]
        assert t.client_hello is not None and t.client_hello.server_name == "example.com"

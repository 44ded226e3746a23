"""Tests of otel_envoy.protocols.tls.handshake: handshake tracking from both directions of captured bytes.

Real handshakes are produced in memory by Python's ``ssl`` module (OpenSSL): the exact bytes each side
writes are fed to the tracker as Envoy's reads (client -> Envoy) and writes (Envoy -> client).
"""

from __future__ import annotations

import shutil
import ssl
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from otel_envoy.protocols.tls.handshake import TlsHandshakeTracker
from otel_envoy.protocols.tls.names import cipher_suite_name
from otel_envoy.protocols.tls.record_layer import MAX_HANDSHAKE_MESSAGE, MAX_RECORD_LEN
from tests.support.tls_bytes import (
    ext,
    handshake,
    record,
    server_hello_body,
    spec_client_hello,
    split_records,
)
from tests.support.tls_memory import MemoryTls, Msg

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


_OUTCOME = ("is_tls", "version", "cipher", "resumed", "negotiated_alpn", "completed_ns", "server_hello_ns",
            "started_ns", "app_records_in", "app_records_out", "records_in", "records_out", "bytes_out",
            "error")


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_whole_first_flight_is_read_without_a_record_reader(pki: Pki, version: ssl.TLSVersion) -> None:
    """A server's first flight of whole records starting with its ServerHello (what a traced connection's
    handshake summary holds) is read without a record reader, to the reader's outcome: the same bytes cut in
    two go through one. Full and resumed handshakes (TLS 1.2's resumed flight holds the server's CCS)."""
    ctx = make_contexts(pki, version)
    for tr in (run_handshake(ctx), run_handshake(ctx, session=run_handshake(ctx).client.session)):
        flight = index_of_first(tr.msgs, "s", -1, lambda b: True)
        whole = feed(tr.msgs[: flight + 1])
        cut = feed(tr.msgs[: flight + 1], chunker=lambda b: [b[: len(b) - 1], b[len(b) - 1 :]])
        assert whole._sr is None and cut._sr is not None  # the reader was needed only for the cut flight
        assert whole.server_hello is not None and whole.records_out == len(split_records(tr.msgs[flight][1]))
        for t in (whole, cut):  # the rest of the connection, the same way for both
            feed(tr.msgs[flight + 1 :], t)
        assert whole.completed_ns is not None and whole.resumed is tr.client.session_reused
        for attr in _OUTCOME:
            assert getattr(whole, attr) == getattr(cut, attr), attr
        assert whole.summary() is cut.summary()


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


def test_handshakes_with_the_same_outcome_share_one_read_only_summary(pki: Pki) -> None:
    ctx = make_contexts(pki)
    first, second = feed(run_handshake(ctx).msgs), feed(run_handshake(ctx).msgs)
    assert first.client_hello is not second.client_hello  # two connections, each parsed
    assert first.summary() is second.summary()  # the same outcome: one object, encoded once
    with pytest.raises(TypeError):
        first.summary()["tls.cipher"] = "changed"  # type: ignore[index]
    first.completed_ns = None  # another outcome (not established): another object
    assert first.summary() is not second.summary()
    assert first.summary()["tls.established"] is False and second.summary()["tls.established"] is True

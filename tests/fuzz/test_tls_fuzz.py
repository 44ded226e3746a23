"""Property tests: whatever bytes arrive, in whatever chunking and with whatever capture gaps, the TLS
tracker never raises, never records an internal error and keeps its buffers bounded."""

from __future__ import annotations

import contextlib
import functools
import itertools
import shutil
import ssl
import subprocess
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from otel_envoy.protocols.tls.handshake import TlsHandshakeTracker
from otel_envoy.protocols.tls.hello import TlsParseError, parse_client_hello, parse_server_hello
from otel_envoy.protocols.tls.hello_shapes import parse_client_hello_shaped
from otel_envoy.protocols.tls.record_layer import (
    MAX_HANDSHAKE_MESSAGE,
    MAX_RECORD_LEN,
    HandshakeReassembler,
    TlsRecordReader,
)
from tests.support.tls_bytes import hello_fields
from tests.support.tls_memory import MemoryTls

BUFFER_BOUND = 2 * (MAX_RECORD_LEN + 5) + 2 * MAX_HANDSHAKE_MESSAGE + 3
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --------------------------------------------------------------------------------------------------
# Real material from OpenSSL (via Python's ssl module, in memory)
# --------------------------------------------------------------------------------------------------


@functools.cache
def real_client_hello() -> bytes:
    """The first flight of a real TLS 1.3 client (a ClientHello record); needs no server."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    c_in, c_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(c_in, c_out, server_hostname="fuzz.example.com")
    with contextlib.suppress(ssl.SSLWantReadError):
        obj.do_handshake()
    return c_out.read()


@functools.cache
def real_transcripts() -> tuple[tuple[tuple[str, bytes], ...], ...]:
    """Full TLS 1.2 and 1.3 handshakes (+ one request/response); empty when openssl is unavailable."""
    if shutil.which("openssl") is None:
        return ()
    d = Path(tempfile.mkdtemp(prefix="tlsfuzz"))
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-subj", "/CN=a.example.com", "-days", "1", "-addext",
                    "subjectAltName=DNS:a.example.com", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    out = []
    for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
        server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server.load_cert_chain(str(cert), str(key))
        client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        client.load_verify_locations(str(cert))
        client.maximum_version = version
        out.append(tuple(_handshake(client, server)))
    return tuple(out)


def _handshake(cctx: ssl.SSLContext, sctx: ssl.SSLContext) -> list[tuple[str, bytes]]:
    pair = MemoryTls.wrap(cctx, sctx)
    pair.handshake()
    pair.exchange(b"GET / HTTP/1.1\r\n\r\n", b"HTTP/1.1 204 No Content\r\n\r\n")
    return pair.msgs


def check(t: TlsHandshakeTracker) -> None:
    assert t.buffered_bytes() <= BUFFER_BOUND
    assert not (t.error or "").startswith("internal error"), t.error
    assert len(t.alerts) <= 8 and len(t.warnings) <= 8
    t.summary()  # must not raise either


# --------------------------------------------------------------------------------------------------
# Strategies
# --------------------------------------------------------------------------------------------------

chunk = st.tuples(
    st.sampled_from(["c", "s", "peek"]),
    st.binary(max_size=600),
    st.integers(min_value=0, max_value=20000),  # uncaptured tail
)


@st.composite
def split_points(draw: st.DrawFn, n: int) -> list[int]:
    """Sorted cut positions inside a buffer of n bytes."""
    if n <= 1:
        return []
    return sorted(set(draw(st.lists(st.integers(min_value=1, max_value=n - 1), max_size=12))))


def cut(data: bytes, points: list[int]) -> list[bytes]:
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds) if b > a]


@st.composite
def mutated(draw: st.DrawFn, data: bytes) -> bytes:
    """``data`` with a few byte flips, insertions, deletions and maybe a truncation."""
    buf = bytearray(data)
    for _ in range(draw(st.integers(min_value=0, max_value=6))):
        if not buf:
            break
        op = draw(st.sampled_from(["flip", "set", "insert", "delete"]))
        i = draw(st.integers(min_value=0, max_value=len(buf) - 1))
        if op == "flip":
            buf[i] ^= 1 << draw(st.integers(min_value=0, max_value=7))
        elif op == "set":
            buf[i] = draw(st.sampled_from([0x00, 0xFF, 0x7F, 0x80, 0x16, 0x03, 0x01]))
        elif op == "insert":
            buf[i:i] = draw(st.binary(min_size=1, max_size=8))
        else:
            del buf[i : i + draw(st.integers(min_value=1, max_value=8))]
    if draw(st.booleans()):
        buf = buf[: draw(st.integers(min_value=0, max_value=len(buf)))]
    return bytes(buf)


# --------------------------------------------------------------------------------------------------
# Properties
# --------------------------------------------------------------------------------------------------


@FUZZ
@given(st.lists(chunk, max_size=25), st.booleans())
def test_random_bytes_never_raise(chunks: list[tuple[str, bytes, int]], tls_prefix: bool) -> None:
    t = TlsHandshakeTracker()
    if tls_prefix:  # get past the is_tls gate so the random bytes reach the record layer
        t.on_client_data(0, b"\x16\x03\x01", 3)
    for i, (kind, data, gap) in enumerate(chunks):
        if kind == "s":
            t.on_server_data(i, data, len(data) + gap)
        else:
            t.on_client_data(i, data, len(data) + gap, peek=kind == "peek")
        check(t)


@FUZZ
@given(st.data())
def test_mutated_client_hello_in_random_chunks(data: st.DataObject) -> None:
    ch = data.draw(mutated(real_client_hello()))
    pieces = cut(ch, data.draw(split_points(len(ch))))
    t = TlsHandshakeTracker()
    if data.draw(st.booleans()):
        t.on_client_data(0, ch, len(ch) + data.draw(st.integers(0, 100)), peek=True)
        check(t)
    for i, piece in enumerate(pieces):
        capture = data.draw(st.integers(min_value=0, max_value=len(piece)))
        t.on_client_data(i + 1, piece[:capture], len(piece))
        check(t)
    # and the hello body straight into the parser: only TlsParseError may come out
    body = ch[9:]
    with contextlib.suppress(TlsParseError):
        parse_client_hello(body)
    with contextlib.suppress(TlsParseError):
        parse_server_hello(body)


@FUZZ
@given(st.data())
def test_unmutated_client_hello_any_chunking_parses(data: st.DataObject) -> None:
    ch = real_client_hello()
    t = TlsHandshakeTracker()
    for piece in cut(ch, data.draw(split_points(len(ch)))):
        t.on_client_data(1, piece, len(piece))
    assert t.error is None and t.client_hello is not None
    assert t.client_hello.server_name == "fuzz.example.com" and t.client_hello.alpn == ["h2", "http/1.1"]


@FUZZ
@given(st.data())
def test_real_transcripts_chunked_with_gaps(data: st.DataObject) -> None:
    transcripts = real_transcripts()
    if not transcripts:
        pytest.skip("openssl CLI not installed")
    msgs = transcripts[data.draw(st.integers(0, len(transcripts) - 1))]
    reference = TlsHandshakeTracker()
    for i, (d, m) in enumerate(msgs):
        (reference.on_client_data if d == "c" else reference.on_server_data)(i, m, len(m))
    assert reference.completed_ns is not None and reference.error is None
    with_gaps = data.draw(st.booleans())
    t = TlsHandshakeTracker(resync=data.draw(st.booleans()))
    for i, (d, m) in enumerate(msgs):
        for piece in cut(m, data.draw(split_points(len(m)))):
            capture = data.draw(st.integers(0, len(piece))) if with_gaps else len(piece)
            if d == "c":
                t.on_client_data(i, piece[:capture], len(piece))
            else:
                t.on_server_data(i, piece[:capture], len(piece))
            check(t)
    if not with_gaps:  # chunking alone changes nothing
        for attr in ("completed_ns", "version", "cipher", "resumed", "server_hello_ns", "records_in",
                     "records_out", "app_records_in", "app_records_out", "error"):
            assert getattr(t, attr) == getattr(reference, attr), attr


record_headers = st.tuples(
    st.one_of(st.integers(20, 24), st.integers(0, 255)),  # mostly valid content types
    st.one_of(st.just(b"\x03\x03"), st.binary(min_size=2, max_size=2)),
    st.one_of(st.integers(0, 300), st.integers(0, MAX_RECORD_LEN + 10)),
)


@FUZZ
@given(st.lists(record_headers, max_size=8), st.data(), st.booleans())
def test_record_reader_bounded(headers: list[tuple[int, bytes, int]], data: st.DataObject,
                               resync: bool) -> None:
    stream = b"".join(bytes([ct]) + ver + n.to_bytes(2, "big") + bytes([ct]) * n for ct, ver, n in headers)
    reader = TlsRecordReader(resync=resync)
    for piece in cut(stream, data.draw(split_points(len(stream)))):
        capture = data.draw(st.integers(0, len(piece)))
        for rec in reader.feed(piece[:capture], len(piece)):
            assert len(rec.fragment) <= rec.length <= MAX_RECORD_LEN
            assert set(rec.fragment) <= {rec.content_type}
            if rec.complete:
                assert len(rec.fragment) == rec.length
        assert reader.buffered_bytes <= MAX_RECORD_LEN + 5
        assert reader.error is None or reader.buffered_bytes == 0


@FUZZ
@given(st.lists(st.tuples(st.binary(max_size=20000), st.integers(0, 70000)), max_size=12),
       st.integers(min_value=16, max_value=MAX_HANDSHAKE_MESSAGE))
def test_handshake_reassembler_bounded(fragments: list[tuple[bytes, int]], limit: int) -> None:
    hs = HandshakeReassembler(max_message=limit)
    for frag, missing in fragments:
        for _msg_type, body in hs.feed(frag, missing):
            assert len(body) + 4 <= limit
        assert hs.buffered_bytes <= limit


# --------------------------------------------------------------------------------------------------
# A kept connection's record (EV_CONNECTION_KEPT): whatever the kernel held
# --------------------------------------------------------------------------------------------------


def _mutated(data: bytes, flips: list[tuple[int, int]], cut: int) -> bytes:
    out = bytearray(data[:cut] if cut else data)
    for at, value in flips:
        if out:
            out[at % len(out)] = value
    return bytes(out)


@FUZZ
@given(flips=st.lists(st.tuples(st.integers(0, 4095), st.integers(0, 255)), max_size=8),
       cut=st.integers(0, 600), flight=st.binary(max_size=600), reason=st.integers(0, 7),
       hello_ret=st.integers(0, 1 << 20), peeked=st.booleans(), hs_end=st.integers(0, 10**10),
       established=st.integers(0, 10**10))
def test_a_kept_connection_record_with_any_held_bytes_becomes_one_connection(
        flips, cut, flight, reason, hello_ret, peeked, hs_end, established) -> None:
    """The held hello (a real one, damaged and cut), any server flight bytes, any reason number, lengths and
    times: neither the correlator nor the span builder raises, and the record becomes one connection span
    marked kept; or, with the reason of a traced connection's handshake summary, one connection left open
    (its close record follows), not marked kept."""
    from otel_envoy.correlate.kept_connections import KEEP_CONN_SAMPLED
    from tests.support.correlation import Harness, build
    from tests.support.events import connection_kept

    hello = _mutated(real_client_hello(), flips, cut)
    ev = connection_kept(10**10 + 5_000, 31, 40001, "TLS_FAILED", open_ts=10**10, established_ns=established,
                         hello=hello, hello_ts=10**10 + 1_000, peeked=peeked, flight=flight,
                         flight_ts=10**10 + 2_000, hs_start=10**10 + 1_000, hs_end=hs_end, hs_state=1)
    ev = ev._replace(reason=reason, hello_ret=max(hello_ret, ev.hello_len), flight_ret=len(flight))
    h = Harness()
    h.c.handle(ev)
    if reason == KEEP_CONN_SAMPLED:
        assert h.drain() == [] and h.c.downstream.open[(ev.tgid, ev.fd)].kept == ""
        h.c.flush(ev.ts_ns + 1)
        (conn,) = h.out
        assert conn.still_open and [s.name for s in build(conn)].count("envoy.downstream.connection") == 1
        return
    (conn,) = h.drain()
    assert conn.kept and conn.close_ns == ev.ts_ns
    root = [s for s in build(conn) if s.name == "envoy.downstream.connection"]
    assert len(root) == 1 and root[0].attributes["otel_envoy.kept"] == conn.kept


@st.composite
def flipped(draw: st.DrawFn, data: bytes) -> bytes:
    """``data`` with a few bytes changed in place (same length: the same shape key)."""
    buf = bytearray(data)
    for _ in range(draw(st.integers(min_value=1, max_value=6))):
        buf[draw(st.integers(min_value=0, max_value=len(buf) - 1))] = draw(st.integers(0, 255))
    return bytes(buf)


def _parsed(body: bytes) -> object:
    """What parse_client_hello makes of ``body``: the hello's fields, or the error's text."""
    try:
        return hello_fields(parse_client_hello(body))
    except TlsParseError as exc:
        return f"TlsParseError: {exc}"


def _shaped(body: bytes) -> object:
    try:
        return hello_fields(parse_client_hello_shaped(body))
    except TlsParseError as exc:
        return f"TlsParseError: {exc}"


@FUZZ
@given(st.data())
def test_a_hello_of_a_known_shape_parses_as_it_would_alone(data: st.DataObject) -> None:
    """parse_client_hello_shaped reuses an earlier hello's parse only where the bytes the parse reads are
    the same: whatever a hello of that length differs in, its result is parse_client_hello's."""
    template = real_client_hello()[9:]  # the ClientHello body (record header 5, handshake header 4)
    parse_client_hello_shaped(template)  # the shape of its length
    body = data.draw(st.one_of(flipped(template), mutated(template)))
    assert _shaped(body) == _parsed(body)
    assert _shaped(template) == _parsed(template)  # and the remembered shape was never changed

"""Tests of otel_envoy.protocols.tls.record_layer: record reassembly across captured messages and capture
gaps, and handshake-message reassembly."""

from __future__ import annotations

import pytest

from otel_envoy.protocols.tls.record_layer import (
    MAX_HANDSHAKE_MESSAGE,
    MAX_RECORD_LEN,
    HandshakeReassembler,
    TlsRecordReader,
)
from tests.support.tls_bytes import handshake, record


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

"""Shortcuts on the per-event path keep the results of the general code they bypass, and the per-thread
queue of TLS reads waiting for an upstream write forgets what can no longer be taken without calling it a
drop."""

from __future__ import annotations

import ssl

import pytest

from otel_envoy.correlate.connections import MAX_TLS_DEMAND, TLS_DEMAND_ROUNDS, ConnectionCorrelator
from otel_envoy.correlate.model import ConnectionRecord
from otel_envoy.protocols.tls import (
    HandshakeReassembler,
    TlsRecordReader,
    _first_handshake_message,
)
from tests.support.events import LISTEN_FD, LPORT, PEER, TGID, TID, read

# ------------------------------------------------------------------------------ TLS demand queue


def _tls_conn(fd: int, ready_round: int) -> ConnectionRecord:
    """A TLS downstream connection whose handshake completed in ``ready_round``."""
    return ConnectionRecord(TGID, fd, TID, "worker_0", LISTEN_FD, PEER, 40000 + fd, LPORT, 1_000 * fd,
                            tls_ready_round=ready_round)


def _read_in_round(c: ConnectionCorrelator, conn: ConnectionRecord, round_: int) -> None:
    """A post-handshake read of ``conn`` (no bytes captured) in ``round_``."""
    c._note_tls_read(conn, read(1_000 * round_, conn.fd, b"", ret=100)._replace(round=round_))


def test_direct_responses_age_out_of_the_tls_demand_queue_without_drops() -> None:
    # Envoy answers every request itself: no upstream write ever takes a queued read
    c = ConnectionCorrelator(lambda conn: None)
    for i in range(3 * MAX_TLS_DEMAND):
        _read_in_round(c, _tls_conn(100 + i, ready_round=2 * i), 2 * i + 1)
    assert "tls_demand_queue_full" not in c.drops
    queue = c.tls_demand[TID]
    assert len(queue) <= TLS_DEMAND_ROUNDS  # only reads a later write could still take
    newest = 2 * (3 * MAX_TLS_DEMAND - 1) + 1
    assert all(newest - r <= TLS_DEMAND_ROUNDS for r, _ in queue)


def test_aged_out_reads_can_queue_again() -> None:
    c = ConnectionCorrelator(lambda conn: None)
    old, other = _tls_conn(30, ready_round=1), _tls_conn(31, ready_round=1)
    _read_in_round(c, old, 2)
    assert old.tls_demand
    _read_in_round(c, other, 2 + TLS_DEMAND_ROUNDS + 1)  # old's read can no longer be taken
    assert not old.tls_demand and [q for _, q in c.tls_demand[TID]] == [other]


def test_closed_connections_leave_the_tls_demand_queue() -> None:
    c = ConnectionCorrelator(lambda conn: None)
    gone, live = _tls_conn(30, ready_round=1), _tls_conn(31, ready_round=1)
    _read_in_round(c, gone, 2)
    gone.close_ns = 2_500
    _read_in_round(c, live, 3)
    assert [q for _, q in c.tls_demand[TID]] == [live]


def test_a_full_queue_of_reads_that_can_still_be_taken_counts_a_drop() -> None:
    c = ConnectionCorrelator(lambda conn: None)
    conns = [_tls_conn(100 + i, ready_round=1) for i in range(MAX_TLS_DEMAND + 5)]
    for conn in conns:
        _read_in_round(c, conn, 2)  # all in one round: each could still be taken
    assert c.drops["tls_demand_queue_full"] == 5
    assert len(c.tls_demand[TID]) == MAX_TLS_DEMAND
    assert not any(conn.tls_demand for conn in conns[:5])


def test_upstream_writes_still_take_queued_reads_in_order() -> None:
    c = ConnectionCorrelator(lambda conn: None)
    a, b = _tls_conn(30, ready_round=1), _tls_conn(31, ready_round=1)
    _read_in_round(c, a, 5)
    _read_in_round(c, b, 6)
    assert c._take_tls_demand(TGID, TID, 6) is a  # the next round's write takes the oldest read
    assert c._take_tls_demand(TGID, TID, 6 + TLS_DEMAND_ROUNDS + 1) is None  # b is too old by then
    assert not a.tls_demand and not b.tls_demand


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
    assert _first_handshake_message(hello) == _general_first_message(hello) is not None
    for data in _variants(hello):
        fast = _first_handshake_message(data)
        if fast is not None:  # None: the general path decides
            assert fast == _general_first_message(data), data[:9].hex()

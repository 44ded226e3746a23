"""Upstream attribution (correlate/attribution.py): the per-thread queue of TLS reads waiting for an upstream
write forgets what can no longer be taken without calling it a drop, and upstream writes take it in order."""

from __future__ import annotations

from collections import Counter

from otel_envoy.correlate.attribution import MAX_TLS_DEMAND, TLS_DEMAND_ROUNDS, UpstreamAttribution
from otel_envoy.correlate.identity import IdSource
from otel_envoy.correlate.records import ConnectionRecord, DownstreamTls
from tests.support.events import LISTEN_FD, LPORT, PEER, TGID, TID, read


def _attribution() -> UpstreamAttribution:
    return UpstreamAttribution(IdSource(), Counter(), Counter())


def _tls_conn(fd: int, ready_round: int) -> ConnectionRecord:
    """A TLS downstream connection whose handshake completed in ``ready_round``."""
    return ConnectionRecord(TGID, fd, TID, "worker_0", LISTEN_FD, PEER, 40000 + fd, LPORT, 1_000 * fd,
                            tls=DownstreamTls(ready_round=ready_round))


def _read_in_round(c: UpstreamAttribution, conn: ConnectionRecord, round_: int) -> None:
    """A post-handshake read of ``conn`` (no bytes captured) in ``round_``."""
    c.note_tls_read(conn, read(1_000 * round_, conn.fd, b"", ret=100)._replace(round=round_))


def test_direct_responses_age_out_of_the_tls_demand_queue_without_drops() -> None:
    # Envoy answers every request itself: no upstream write ever takes a queued read
    c = _attribution()
    for i in range(3 * MAX_TLS_DEMAND):
        _read_in_round(c, _tls_conn(100 + i, ready_round=2 * i), 2 * i + 1)
    assert "tls_demand_queue_full" not in c.drops
    queue = c.tls_demand[TID]
    assert len(queue) <= TLS_DEMAND_ROUNDS  # only reads a later write could still take
    newest = 2 * (3 * MAX_TLS_DEMAND - 1) + 1
    assert all(newest - r <= TLS_DEMAND_ROUNDS for r, _ in queue)


def test_aged_out_reads_can_queue_again() -> None:
    c = _attribution()
    old, other = _tls_conn(30, ready_round=1), _tls_conn(31, ready_round=1)
    _read_in_round(c, old, 2)
    assert old.tls.demand
    _read_in_round(c, other, 2 + TLS_DEMAND_ROUNDS + 1)  # old's read can no longer be taken
    assert not old.tls.demand and [q for _, q in c.tls_demand[TID]] == [other]


def test_closed_connections_leave_the_tls_demand_queue() -> None:
    c = _attribution()
    gone, live = _tls_conn(30, ready_round=1), _tls_conn(31, ready_round=1)
    _read_in_round(c, gone, 2)
    gone.close_ns = 2_500
    _read_in_round(c, live, 3)
    assert [q for _, q in c.tls_demand[TID]] == [live]


def test_a_full_queue_of_reads_that_can_still_be_taken_counts_a_drop() -> None:
    c = _attribution()
    conns = [_tls_conn(100 + i, ready_round=1) for i in range(MAX_TLS_DEMAND + 5)]
    for conn in conns:
        _read_in_round(c, conn, 2)  # all in one round: each could still be taken
    assert c.drops["tls_demand_queue_full"] == 5
    assert len(c.tls_demand[TID]) == MAX_TLS_DEMAND
    assert not any(conn.tls.demand for conn in conns[:5])


def test_upstream_writes_still_take_queued_reads_in_order() -> None:
    c = _attribution()
    a, b = _tls_conn(30, ready_round=1), _tls_conn(31, ready_round=1)
    _read_in_round(c, a, 5)
    _read_in_round(c, b, 6)
    assert c.take_tls_demand(TGID, TID, 6) is a  # the next round's write takes the oldest read
    assert c.take_tls_demand(TGID, TID, 6 + TLS_DEMAND_ROUNDS + 1) is None  # b is too old by then
    assert not a.tls.demand and not b.tls.demand

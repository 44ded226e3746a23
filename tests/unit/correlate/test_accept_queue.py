"""The accept queue (correlate/accept_queue.py): connections established before Envoy accepted them, their
depth at the accept and on arrival, SYN-ACK retransmits of handshakes not complete yet, the table bound.
"""

from __future__ import annotations

import random

import pytest

from tests.support.correlation import SYN_RECV, Harness
from tests.support.events import LISTEN_FD, LPORT, PEER, TGID, accept, close, established, listen_sockets, tcp


def test_accept_queue_depth_three_established_then_three_accepts() -> None:
    h = Harness().feed([
        established(1_000, 40001), established(1_100, 40002), established(1_200, 40003),
        accept(2_000, 31, 40001), accept(2_100, 32, 40002), accept(2_200, 33, 40003),
    ])
    for fd in (31, 32, 33):
        h.c.handle(close(3_000 + fd, fd))
    by_port = {r.peer_port: r for r in h.drain()}
    assert [by_port[p].accept_queue.at_accept for p in (40001, 40002, 40003)] == [3, 2, 1]
    assert [by_port[p].accept_queue.on_arrival for p in (40001, 40002, 40003)] == [1, 2, 3]
    assert [by_port[p].tcp.established_ns for p in (40001, 40002, 40003)] == [1_000, 1_100, 1_200]
    assert h.c.accept_queue.queued[LPORT] == {}


def test_accept_queue_is_per_listening_port() -> None:
    h = Harness()
    h.c.set_listen_sockets(listen_sockets((TGID, LISTEN_FD, "0.0.0.0", LPORT, None),
                                          (TGID, 11, "0.0.0.0", 9443, None)))
    h.feed([established(1_000, 40001), established(1_100, 40002, lport=9443),
            accept(2_000, 31, 40001), accept(2_100, 32, 40002, listen_fd=11)])
    a, b = h.c.downstream.open[(TGID, 31)], h.c.downstream.open[(TGID, 32)]
    assert (a.local_port, a.accept_queue.at_accept) == (LPORT, 1)
    assert (b.local_port, b.accept_queue.at_accept, b.tcp.established_ns) == (9443, 1, 1_100)


def test_duplicate_established_makes_one_queue_entry() -> None:
    h = Harness().feed([established(1_000, 40001), established(1_000, 40001)])
    assert len(h.c.accept_queue.queued[LPORT]) == 1
    h.feed([accept(2_000, 30, 40001), established(2_500, 40002), accept(3_000, 31, 40002)])
    assert h.c.downstream.open[(TGID, 30)].accept_queue.at_accept == 1
    assert h.c.downstream.open[(TGID, 30)].tcp.established_ns == 1_000
    assert h.c.downstream.open[(TGID, 31)].accept_queue.at_accept == 1
    assert h.c.accept_queue.queued[LPORT] == {}


def test_duplicate_established_does_not_change_depth_on_arrival() -> None:
    h = Harness().feed([established(1_000, 40001), established(1_000, 40001), accept(2_000, 30, 40001)])
    assert h.c.downstream.open[(TGID, 30)].accept_queue.on_arrival == 1


@pytest.mark.parametrize("when", ["after_accept", "while_lingering"])
def test_duplicate_established_after_the_accept_leaves_no_stale_queue_entry(when: str) -> None:
    h = Harness().feed([established(1_000, 40001), accept(2_000, 30, 40001)])
    if when == "while_lingering":
        h.feed([close(2_500, 30)])
    h.feed([established(1_000, 40001)])  # the same event, delivered a second time
    h.feed([established(3_000, 40002), accept(3_100, 31, 40002)])
    nxt = h.c.downstream.open[(TGID, 31)]
    assert (nxt.accept_queue.at_accept, nxt.accept_queue.on_arrival) == (1, 1)
    assert h.c.accept_queue.queued[LPORT] == {}


def test_synack_retransmits_before_established_become_marks() -> None:
    h = Harness().feed([
        tcp(500, "TCP_SYNACK_RETRANSMIT", 40000, tcp_state=SYN_RECV),
        tcp(700, "TCP_SYNACK_RETRANSMIT", 40000, tcp_state=SYN_RECV),
        tcp(700, "TCP_SYNACK_RETRANSMIT", 40099, tcp_state=SYN_RECV),  # another (never completed) peer
        established(1_000, 40000),
        tcp(1_500, "TCP_SYNACK_RETRANSMIT", 40000),  # queued already: still attributed
        accept(2_000, 30, 40000),
        close(3_000, 30),
    ])
    r = h.only()
    assert [(m.ts_ns, m.name) for m in r.tcp.marks] == [
        (500, "tcp.synack_retransmit"), (700, "tcp.synack_retransmit"), (1_500, "tcp.synack_retransmit")]
    assert r.aborted() is None
    assert list(h.c.accept_queue.early_synack) == [(PEER, 40099, LPORT)]


def test_synack_retransmit_without_established_reaches_the_accept() -> None:
    r = Harness().feed([tcp(500, "TCP_SYNACK_RETRANSMIT", 40000), accept(2_000, 30, 40000),
                        close(3_000, 30)]).only()
    assert [m.name for m in r.tcp.marks] == ["tcp.synack_retransmit"]


def test_accept_queue_table_bound_evicts_the_oldest() -> None:
    h = Harness(max_queued=2).feed([established(1_000, 40001), established(1_001, 40002),
                                    established(1_002, 40003)])
    assert h.c.drops["accept_queue_table_full"] == 1
    assert list(h.c.accept_queue.queued[LPORT]) == [(PEER, 40002), (PEER, 40003)]
    h.feed([accept(2_000, 30, 40001), close(2_100, 30)])
    assert h.only().tcp.established_ns is None


def test_an_entry_no_accept_takes_is_let_go_and_counted() -> None:
    """A lost accept (or a listener of the same port in another namespace): the entry goes after a minute,
    so it neither inflates the depth of later connections nor lingers."""
    from otel_envoy.correlate.accept_queue import MAX_AGE_NS

    h = Harness().feed([established(1_000, 40001)])  # never accepted
    h.c.expire(1_000 + MAX_AGE_NS // 2)
    assert len(h.c.accept_queue.queued[LPORT]) == 1
    later = 1_000 + MAX_AGE_NS + 1
    h.c.expire(later)
    assert h.c.accept_queue.queued[LPORT] == {} and h.c.drops["accept_queue_expired"] == 1
    h.feed([established(later + 1_000, 40002), accept(later + 2_000, 31, 40002)])
    conn = h.c.downstream.open[(TGID, 31)]
    assert (conn.accept_queue.on_arrival, conn.accept_queue.at_accept) == (1, 1)


def test_a_reused_client_port_does_not_inherit_an_old_established_time() -> None:
    h = Harness().feed([established(1_000, 40001)])  # its accept was lost
    t = 1_000 + 30_000_000_000  # 30 s later, the same client port connects again (not yet expired)
    h.feed([established(t, 40001), accept(t + 5_000, 31, 40001)])
    conn = h.c.downstream.open[(TGID, 31)]
    assert conn.tcp.established_ns == t and conn.accept_queue.at_accept == 1
    assert h.c.drops["accept_queue_expired"] == 1


Depths = dict[int, tuple[int, int, int, str | None]]


def _depths(folded: bool, timeline: list[tuple[int, str, int]]) -> Depths:
    """Each connection's (at_accept, on_arrival, established_ns, local address) after ``timeline`` of
    (time, "est" or "acc", peer port): ESTABLISHED records, or (``folded``) the handshake's completion
    carried on the accept record alone, as for a listener sampled whole."""
    established_at = {port: ts for ts, what, port in timeline if what == "est"}
    events = []
    for ts, what, port in timeline:
        if what == "acc":
            completion = established_at[port] if folded else 0
            events.append(accept(ts, port - 40000 + 30, port, established=completion, local="10.0.0.9"))
        elif not folded:
            events.append(established(ts, port, local="10.0.0.9"))
    h = Harness().feed(events)
    h.feed([close(10**9 + port, port - 40000 + 30) for port in established_at])
    return {r.peer_port: (r.accept_queue.at_accept, r.accept_queue.on_arrival, r.tcp.established_ns,
                          r.local_address) for r in h.drain()}


def test_accepts_carrying_their_completion_count_the_depths_the_records_did() -> None:
    """A listener sampled whole sends no ESTABLISHED record; the depths counted from the accepts alone are
    the ones the records gave, for queues that fill and drain in any order (FIFO per queue; two queues
    of one port interleave, as SO_REUSEPORT workers' do)."""
    timeline = [(1_000, "est", 40001), (1_100, "est", 40002), (1_200, "acc", 40001), (1_300, "est", 40003),
                (1_400, "acc", 40002), (1_500, "acc", 40003), (1_600, "est", 40004), (1_700, "acc", 40004)]
    assert _depths(True, timeline) == _depths(False, timeline) == {
        40001: (2, 1, 1_000, "10.0.0.9"), 40002: (2, 2, 1_100, "10.0.0.9"), 40003: (1, 2, 1_300, "10.0.0.9"),
        40004: (1, 1, 1_600, "10.0.0.9")}
    rng = random.Random(13)
    for _ in range(200):
        t, queues, timeline, port = 0, ([], []), [], 40001
        for _ in range(rng.randrange(1, 30)):
            t += rng.randrange(1, 50)
            queue = queues[rng.randrange(2)]
            if queue and rng.random() < 0.5:
                timeline.append((t, "acc", queue.pop(0)))
            else:
                queue.append(port)
                timeline.append((t, "est", port))
                port += 1
        for queue in queues:
            for waiting in queue:
                t += 10
                timeline.append((t, "acc", waiting))
        assert _depths(True, timeline) == _depths(False, timeline), timeline


def test_a_connection_never_accepted_does_not_count_in_the_depths_from_accepts() -> None:
    """With the completion on the accept, a handshake no accept takes (another namespace's listener on the
    same port) is never seen: it neither waits in the model nor inflates the next connections' depths."""
    h = Harness().feed([accept(2_000, 31, 40001, established=1_000),
                        accept(2_100, 32, 40002, established=2_050)])
    a, b = h.c.downstream.open[(TGID, 31)], h.c.downstream.open[(TGID, 32)]
    assert (a.accept_queue.at_accept, a.accept_queue.on_arrival) == (1, 1)
    assert (b.accept_queue.at_accept, b.accept_queue.on_arrival) == (1, 1)
    assert h.c.accept_queue.queued == {}

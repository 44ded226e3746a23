"""Downstream connections (correlate/downstream.py), driven by typed kernel events (no root, no BPF).

Each test tells a connection's story as the kernel reports it and checks the ConnectionRecord the
correlator emits: the listener hand-off, TCP timing and resets, fd reuse, the table bound.
"""

from __future__ import annotations

from otel_envoy.envoy.listen_socket import ListenSocket
from otel_envoy.events.types import ListenEvent, ProcessEvent, SocketSetupEvent
from otel_envoy.protocols.detect import Protocol
from tests.support.correlation import (
    CLOSE_WAIT,
    ESTABLISHED,
    REQUEST,
    RESPONSE,
    TCP_CLOSE,
    Harness,
    build,
    client_hello,
    plain_story,
)
from tests.support.events import (
    DIR_READ,
    LISTEN_FD,
    LOCAL,
    LPORT,
    PEER,
    TGID,
    TID,
    C,
    accept,
    addr,
    close,
    data,
    established,
    listen_sockets,
    read,
    state,
    tcp,
)


def test_plain_connection_gives_one_complete_record() -> None:
    h = Harness().feed(plain_story())
    assert h.out == []  # closed, but still lingering
    r = h.only()
    assert (r.tgid, r.fd, r.tid, r.thread_name) == (TGID, 30, TID, "wrk:worker_0")
    assert (r.peer_address, r.peer_port, r.local_port, r.local_address) == (PEER, 40000, LPORT, LOCAL)
    assert r.listen_fd == LISTEN_FD and r.listener_name == "plain_http"
    assert r.tcp.established_ns == 1_000 and r.start_ns == 1_000
    assert r.accept_ns == 2_000
    # no re-registration: the first ADD was the hand-off
    assert r.listener.first_epoll_add_ns == 3_000 and r.listener.handoff_ns == 3_000
    assert r.listener.first_io_ns == 4_000
    assert r.tcp.peer_fin_ns == 6_000 and r.tcp.eof_ns == 7_000 and r.tcp.envoy_fin_ns is None
    assert r.close_ns == 8_000
    assert (r.traffic.bytes_received, r.traffic.bytes_sent) == (len(REQUEST), len(RESPONSE))
    assert r.accept_queue.at_accept == 1 and r.accept_queue.on_arrival == 1
    assert r.close_initiator() == "peer" and r.aborted() is None
    assert r.socket_options == ((6, 1, 1),)
    assert r.protocol is Protocol.HTTP1 and r.tls.handshake is None
    assert r.listener.peeks == 0 and r.listener.peeked_bytes == 0
    assert not r.still_open and r.partial == []
    assert h.c.downstream.open == {} and h.c.downstream.by_tuple == {}
    assert h.c.accept_queue.queued[LPORT] == {}
    assert h.c.stats["connections"] == 1 and not h.c.drops


def test_a_connection_sampled_out_after_its_accept_ends_without_a_record() -> None:
    """An h2c connection the kernel decided whole at its preface and did not trace: its accept came, then
    only its close, marked ``sampled_out``. No record is emitted, it leaves both tables, it is counted
    (the accounting's ``connections`` stage), and a later TCP state change of its 4-tuple finds nothing."""
    h = Harness().feed([
        established(1_000, 40000), accept(2_000, 30, 40000),
        close(8_000, 30, rx=24, sampled_out=1),
        state(8_100, 40000, ESTABLISHED, CLOSE_WAIT),
        established(9_000 + 10**9, 40001),  # event time moves past any linger
    ])
    assert h.out == []
    assert h.c.downstream.open == {} and h.c.downstream.by_tuple == {}
    assert h.c.stats["connections_sampled_out"] == 1 and h.c.stats["connections"] == 0
    assert h.c.stats["accepts"] == 1


def test_tls_inspector_sequence_sets_handoff_at_the_second_add() -> None:
    hello = client_hello()
    h = Harness().feed([
        established(1_000, 40000),
        accept(2_000, 30, 40000),
        read(4_000, 30, hello, peek=True),  # tls_inspector peeks the ClientHello
        read(7_000, 30, hello),  # BoringSSL reads the ClientHello for real
        # the fd's epoll ADDs before its first real I/O, kept by the kernel: the listener filter waits for
        # data (3 000), then, after a DEL, ConnectionImpl registers the fd (6 000): the hand-off
        close(8_000, 30, rx=len(hello), epoll_adds=(3_000, 6_000)),
    ])
    r = h.only()
    assert r.listener.first_epoll_add_ns == 3_000 and r.listener.saw_epoll_del
    assert r.listener.handoff_ns == 6_000
    assert r.listener.first_io_ns == 7_000
    assert r.listener.peeks == 1 and r.listener.peeked_bytes == len(hello)
    assert r.tls.handshake is not None and r.tls.handshake.client_hello is not None
    assert r.tls.handshake.client_hello.server_name == "a.example.com"
    assert r.tls.handshake.started_ns == 4_000  # the handshake started when the ClientHello was first seen


def test_the_close_record_s_second_add_is_the_handoff_and_its_options_are_the_connection_s() -> None:
    """The kernel keeps the fd's ADDs before its first I/O (the first two timed, a third counted) and its
    socket options for the close record."""
    hello = client_hello()
    story = [established(1_000, 40000), accept(2_000, 30, 40000), read(4_000, 30, hello, peek=True),
             read(7_000, 30, hello)]
    r = Harness().feed([*story, close(8_000, 30, rx=len(hello), epoll_adds=(3_000, 6_000, 6_500),
                                      sockopts=((6, 1, 1), (1, 9, 1)))]).only()
    assert r.listener.first_epoll_add_ns == 3_000 and r.listener.saw_epoll_del
    assert r.listener.handoff_ns == 6_000 and r.listener.first_io_ns == 7_000
    assert r.socket_options == ((6, 1, 1), (1, 9, 1)) and r.partial == []
    one_add = Harness().feed([*story, close(8_000, 30, epoll_adds=(3_000,))]).only()
    assert one_add.listener.handoff_ns == 3_000 and not one_add.listener.saw_epoll_del
    closed_early = Harness().feed([*story[:2], close(4_000, 30, epoll_adds=(3_000,))]).only()
    assert closed_early.listener.handoff_ns == 3_000 and closed_early.listener.first_io_ns is None


def test_socket_options_beyond_what_the_close_record_keeps_are_marked() -> None:
    kept = C["SOCKOPTS_KEPT"]
    options = tuple((6, n, 1) for n in range(kept))
    r = Harness().feed([established(1_000, 40000), accept(2_000, 30, 40000),
                        close(3_000, 30, sockopts=options, sockopt_count=kept + 3)]).only()
    assert r.socket_options == tuple(options)
    assert r.partial == ["socket_options_not_all_kept"]


def test_repeated_peeks_count_and_keep_the_largest() -> None:
    hello = client_hello()
    h = Harness().feed([
        established(1_000, 40000), accept(2_000, 30, 40000),
        read(4_000, 30, hello[:100], peek=True),  # only part of the ClientHello had arrived
        read(4_500, 30, hello, peek=True),
        close(8_000, 30, epoll_adds=(3_000, 6_000)),
    ])
    r = h.only()
    assert r.listener.peeks == 2 and r.listener.peeked_bytes == len(hello)
    assert r.listener.handoff_ns == 6_000


def test_handoff_is_the_first_add_when_closed_before_any_io() -> None:
    h = Harness().feed([established(1_000, 40000), accept(2_000, 30, 40000),
                        close(4_000, 30, epoll_adds=(3_000,))])
    r = h.only()
    assert r.listener.handoff_ns == 3_000 and r.listener.first_io_ns is None


def test_established_after_the_accept_still_sets_established() -> None:
    # The ESTABLISHED tracepoint fired first (earlier timestamp) on another CPU, but reached user space
    # after the accept.
    events = plain_story()
    events[0], events[1] = events[1], events[0]
    r = Harness().feed(events).only()
    assert r.tcp.established_ns == 1_000 and r.accept_ns == 2_000
    assert r.start_ns == 1_000
    assert r.local_address == LOCAL
    assert r.accept_queue is None  # nobody saw it queued
    assert "established_not_seen" not in r.partial


def test_missing_established_is_partial() -> None:
    events = [e for e in plain_story() if not (e.kind == C["EV_SOCK_STATE"] and e.newstate == ESTABLISHED)]
    r = Harness().feed(events).only()
    assert r.tcp.established_ns is None and r.start_ns == r.accept_ns == 2_000
    assert r.partial == ["established_not_seen"]
    assert r.accept_queue is None
    assert r.local_address is None  # the wildcard listener does not say which local address
    assert r.listener_name == "plain_http"


def test_unknown_listening_socket_is_partial() -> None:
    h = Harness()
    h.c.set_listen_sockets({})
    h.feed([accept(2_000, 30, 40000), close(3_000, 30)])
    r = h.only()
    assert r.local_port == 0 and r.listener_name is None
    assert sorted(r.partial) == ["established_not_seen", "listener_unknown"]


def test_fd_reuse_without_close_finishes_the_old_connection() -> None:
    h = Harness().feed([
        established(1_000, 40001), accept(2_000, 30, 40001), read(2_500, 30, REQUEST),
        # the close of fd 30 was lost; the fd comes back for another connection
        established(3_000, 40002), accept(4_000, 30, 40002),
    ])
    assert len(h.out) == 1  # the stale one is finished at once (no linger: its close is unknown)
    old = h.out[0]
    assert old.peer_port == 40001 and "close_not_seen" in old.partial
    assert old.close_ns == 4_000
    assert h.c.drops["fd_reused_without_close"] == 1
    new = h.c.downstream.open[(TGID, 30)]
    assert new is not old and new.peer_port == 40002
    assert new.tcp.established_ns == 3_000 and new.listener.first_io_ns is None and new.partial == []
    h.feed([read(5_000, 30, REQUEST), close(6_000, 30, rx=len(REQUEST))])
    done = h.drain()
    assert [r.peer_port for r in done] == [40001, 40002]
    assert done[1].listener.first_io_ns == 5_000 and done[1].traffic.bytes_received == len(REQUEST)
    assert done[0].listener.first_io_ns == 2_500  # the later I/O did not leak into the old record


def test_reset_received_before_fin_is_a_peer_abort() -> None:
    h = Harness().feed([
        established(1_000, 40000), accept(2_000, 30, 40000),
        read(4_000, 30, REQUEST[:20]),
        tcp(5_000, "TCP_RESET_RECEIVED", 40000),
        state(5_001, 40000, ESTABLISHED, TCP_CLOSE),
        data(5_100, 30, DIR_READ, -104),  # ECONNRESET
        close(6_000, 30, rx=20, epoll_adds=(3_000,)),
    ])
    r = h.only()
    assert [m.name for m in r.tcp.marks] == ["tcp.reset_received"]
    assert r.aborted() == "peer"
    assert r.close_initiator() == "peer"
    assert r.tcp.eof_ns is None and r.tcp.peer_fin_ns is None


def test_reset_after_the_peers_fin_is_not_an_abort() -> None:
    h = Harness().feed([
        established(1_000, 40000), accept(2_000, 30, 40000), read(3_000, 30, REQUEST),
        state(4_000, 40000, ESTABLISHED, CLOSE_WAIT),
        read(4_100, 30, b""),
        tcp(4_200, "TCP_RESET_RECEIVED", 40000),
        close(5_000, 30),
    ])
    r = h.only()
    assert [m.name for m in r.tcp.marks] == ["tcp.reset_received"]
    assert r.aborted() is None
    assert r.close_initiator() == "peer"


def test_reset_sent_is_an_envoy_abort() -> None:
    h = Harness().feed([
        established(1_000, 40000), accept(2_000, 30, 40000), read(3_000, 30, REQUEST),
        close(4_000, 30), tcp(4_100, "TCP_RESET_SENT", 40000, tcp_state=ESTABLISHED),
    ])
    r = h.only()
    assert r.aborted() == "envoy" and r.close_initiator() == "envoy"
    assert r.tcp.marks[0].state == ESTABLISHED


def test_the_peers_fin_and_reset_folded_into_the_close_are_as_their_own_records_were() -> None:
    """A traced connection decided whole: the kernel keeps its peer's FIN (CLOSE_WAIT) and the first reset it
    received for its close record instead of a record each. The connection ends as with those records."""
    def run(events):
        h = Harness().feed([established(1_000, 40000), accept(2_000, 30, 40000), read(3_000, 30, REQUEST),
                            *events])
        return h.only()

    with_records = run([state(4_000, 40000, ESTABLISHED, CLOSE_WAIT), tcp(4_200, "TCP_RESET_RECEIVED", 40000),
                        close(5_000, 30)])
    folded = run([close(5_000, 30, peer_fin_ns=4_000, reset_rx_ns=4_200)])
    for r in (with_records, folded):
        assert r.tcp.peer_fin_ns == 4_000
        assert [(m.ts_ns, m.name) for m in r.tcp.marks] == [(4_200, "tcp.reset_received")]
        assert r.aborted() is None and r.close_initiator() == "peer"
    abort = run([close(5_000, 30, reset_rx_ns=4_200)])  # a reset before any FIN: the peer aborted
    assert abort.aborted() == "peer" and abort.close_initiator() == "peer"


def test_a_fact_both_folded_and_sent_is_kept_once_in_time_order() -> None:
    """When the close met the softirq in the kernel, the fact comes in the close record and as its own record
    too (before or after the close): one FIN, one reset mark, between the marks around it."""
    for late in (False, True):
        own = [state(4_000, 40000, ESTABLISHED, CLOSE_WAIT), tcp(4_200, "TCP_RESET_RECEIVED", 40000)]
        before, after = ([], own) if late else (own, [])
        h = Harness().feed([
            established(1_000, 40000), accept(2_000, 30, 40000), read(3_000, 30, REQUEST),
            tcp(3_500, "TCP_RETRANSMIT", 40000, tcp_state=ESTABLISHED), *before,
            close(5_000, 30, peer_fin_ns=4_000, reset_rx_ns=4_200), *after,
            tcp(5_100, "TCP_RESET_SENT", 40000),
        ])
        r = h.only()
        assert r.tcp.peer_fin_ns == 4_000
        assert [(m.ts_ns, m.name) for m in r.tcp.marks] == [
            (3_500, "tcp.retransmit"), (4_200, "tcp.reset_received"), (5_100, "tcp.reset_sent")], late


def test_connection_table_bound_evicts_the_oldest() -> None:
    h = Harness(max_connections=2).feed([
        established(1_000, 40001), established(1_001, 40002), established(1_002, 40003),
        accept(2_000, 30, 40001), accept(2_001, 31, 40002), accept(2_002, 32, 40003),
    ])
    assert h.c.drops["connection_table_full"] == 1
    assert len(h.out) == 1
    victim = h.out[0]
    assert victim.fd == 30 and victim.peer_port == 40001
    assert victim.still_open and "evicted" in victim.partial and victim.close_ns == 2_002
    assert set(h.c.downstream.open) == {(TGID, 31), (TGID, 32)}
    h.feed([tcp(2_100, "TCP_RESET_RECEIVED", 40001)])
    assert victim.tcp.marks == []  # the evicted record is gone from the 4-tuple index too


def test_processes_with_the_same_fd_are_separate() -> None:
    other = TGID + 1000
    h = Harness()
    h.c.set_listen_sockets(listen_sockets((TGID, LISTEN_FD, "0.0.0.0", LPORT, None),
                                          (other, LISTEN_FD, "0.0.0.0", 9090, None)))
    h.feed([
        established(1_000, 40001), established(1_001, 40002, lport=9090),
        accept(2_000, 30, 40001), accept(2_001, 30, 40002, tgid=other),
        read(3_000, 30, REQUEST, tgid=other),
        close(4_000, 30, rx=0),
    ])
    assert set(h.c.downstream.open) == {(other, 30)}
    mine = h.drain()[0]
    assert (mine.tgid, mine.peer_port, mine.local_port, mine.listener.first_io_ns) == (
        TGID, 40001, LPORT, None)
    theirs = h.c.downstream.open[(other, 30)]
    assert (theirs.peer_port, theirs.local_port, theirs.tcp.established_ns) == (40002, 9090, 1_001)
    assert theirs.listener.first_io_ns == 3_000
    assert h.c.drops["fd_reused_without_close"] == 0


def test_ipv6_peers_and_specific_listener_address() -> None:
    h = Harness()
    h.c.set_listen_sockets(listen_sockets((TGID, LISTEN_FD, "::1", LPORT, None),
                                          (TGID, 11, "::", 9443, None)))
    h.c.set_listener_names({("::1", LPORT): "v6_loopback", ("::", 9443): "v6_any"})
    h.feed([
        established(1_000, 40000, peer="::1", local="::1"), accept(2_000, 30, 40000, peer="::1"),
        # a v4 client of a dual-stack wildcard listener: IPv4-mapped addresses are shown as IPv4
        established(1_100, 40001, peer="::ffff:10.0.0.2", local="::ffff:10.0.0.1", lport=9443),
        accept(2_100, 31, 40001, peer="::ffff:10.0.0.2", listen_fd=11),
        close(3_000, 30), close(3_100, 31),
    ])
    a, b = h.drain()
    assert (a.peer_address, a.local_address, a.listener_name, a.tcp.established_ns) == (
        "::1", "::1", "v6_loopback", 1_000)
    assert (b.peer_address, b.local_address, b.local_port, b.tcp.established_ns) == (
        "10.0.0.2", "10.0.0.1", 9443, 1_100)
    assert b.listener_name == "v6_any"
    assert build(a)[0].attributes["network.type"] == "ipv6"
    assert build(b)[0].attributes["network.type"] == "ipv4"


# ------------------------------------------------------------ accepts before the rescan found the listener

NEW, NEW_WORKER = TGID + 50, TGID + 56  # the next process: a hot restart's new epoch, or a fresh start


def test_an_accept_on_a_socket_handed_over_finds_its_listener_from_the_queued_handshake() -> None:
    """An Envoy hot restart: the new process accepts on a socket the old one handed over (its fd 23)
    before the daemon's rescan found that fd. The handshake queued for the peer names the local port; the
    old process's socket on that port, the listener."""
    h = Harness().feed([
        established(1_000, 40000),
        accept(2_000, 30, 40000, tgid=NEW, tid=NEW_WORKER, listen_fd=23),
        established(2_500, 40001),
        accept(3_000, 31, 40001, tgid=NEW, tid=NEW_WORKER, listen_fd=23),  # the same fd: inferred already
        close(8_000, 30, tgid=NEW, tid=NEW_WORKER),
        close(8_000, 31, tgid=NEW, tid=NEW_WORKER),
    ])
    first, second = sorted(h.drain(), key=lambda r: r.fd)
    for r in (first, second):
        assert r.tgid == NEW and r.listen_fd == 23
        assert (r.local_address, r.local_port, r.listener_name) == (LOCAL, LPORT, "plain_http")
        assert "listener_unknown" not in r.partial and r.tcp.established_ns is not None
    assert h.c.stats["listeners_inferred"] == 1
    assert h.c.downstream.listen_socket(NEW, 23) == ListenSocket("0.0.0.0", LPORT, "plain_http")
    h.c.set_listen_sockets(listen_sockets((NEW, 23, "0.0.0.0", LPORT, None)))  # the rescan: what it read
    assert h.c.downstream.inferred_listeners == {}


def test_no_listener_is_inferred_without_a_queued_handshake_or_with_two_addresses_on_the_port() -> None:
    h = Harness().feed([accept(2_000, 30, 40000, tgid=NEW, listen_fd=23), close(3_000, 30, tgid=NEW)])
    assert "listener_unknown" in h.only().partial  # its handshake was not seen
    h = Harness()
    h.c.set_listen_sockets(listen_sockets((TGID, LISTEN_FD, "0.0.0.0", LPORT, None),
                                          (TGID, LISTEN_FD + 1, "::", LPORT, None)))
    h.feed([established(1_000, 40000), accept(2_000, 30, 40000, tgid=NEW, listen_fd=23),
            close(3_000, 30, tgid=NEW)])
    assert "listener_unknown" in h.only().partial  # which of the two sockets it came through: unknown
    assert h.c.stats["listeners_inferred"] == 0


def test_an_accept_on_a_socket_the_kernel_saw_bound_finds_its_listener() -> None:
    """A process that just started accepts before the daemon's rescan after its listen(): the bind the
    kernel reported names the socket's address."""
    family, raw = addr(LOCAL)
    h = Harness().feed([
        ProcessEvent(100, C["EV_EXEC"], NEW, NEW, 0, NEW, b"envoy"),
        SocketSetupEvent(200, C["EV_SOCKET_SETUP"], NEW, NEW, 0, 24, -1, 0, C["SETUP_BIND"], family, LPORT,
                         raw, b"envoy"),
        ListenEvent(300, C["EV_LISTEN"], NEW, NEW, 0, 24, 128),
        accept(2_000, 30, 40000, tgid=NEW, tid=NEW_WORKER, listen_fd=24),  # its handshake not seen
        close(3_000, 30, tgid=NEW, tid=NEW_WORKER),
    ])
    r = h.only()
    assert (r.local_address, r.local_port, r.listener_name) == (LOCAL, LPORT, "plain_http")
    assert r.partial == ["established_not_seen"]
    assert h.c.stats["listeners_inferred"] == 1

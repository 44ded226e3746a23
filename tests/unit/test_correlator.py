"""ConnectionCorrelator and ConnectionSpanBuilder, driven by typed kernel events (no root, no BPF).

Each test tells a connection's story as the kernel reports it (tests/support/events.py builds the events)
and checks the ConnectionRecord the correlator emits, or the spans built from it.
"""

from __future__ import annotations

import random
import shutil
import ssl
import subprocess
from collections.abc import Iterable
from pathlib import Path

import pytest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanKind
from opentelemetry.trace.status import StatusCode

from otel_envoy.correlate.connections import ConnectionCorrelator
from otel_envoy.correlate.model import ConnectionRecord, RequestRecord, UpstreamRecord
from otel_envoy.events.types import Event
from otel_envoy.protocols.http1 import HttpExchange, HttpMessage
from otel_envoy.protocols.tracecontext import trace_context
from otel_envoy.spans.clock import MonotonicClock
from otel_envoy.spans.connection import ConnectionSpanBuilder
from otel_envoy.spans.requests import RequestSpanBuilder
from tests.support.events import (
    DIR_READ,
    DIR_WRITE,
    EPOLL_CTL_ADD,
    EPOLL_CTL_DEL,
    LISTEN_FD,
    LOCAL,
    LPORT,
    PEER,
    TGID,
    TID,
    C,
    accept,
    close,
    data,
    epoll,
    established,
    listen_sockets,
    read,
    setsockopt,
    state,
    tcp,
    write,
)
from tests.support.sdk_oracle import readable_connection_spans
from tests.support.tls_memory import MemoryTls

LINGER = 1_000
OFFSET = 1_700_000_000_000_000_000  # wall - monotonic of the fixed test clock
RESOURCE = Resource.create({"service.name": "envoy-test"})
REQUEST = b"GET / HTTP/1.1\r\nHost: lab\r\nUser-Agent: curl\r\nAccept: */*\r\n\r\n"
RESPONSE = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
ESTABLISHED, CLOSE_WAIT, FIN_WAIT1 = C["TCP_ESTABLISHED"], C["TCP_CLOSE_WAIT"], C["TCP_FIN_WAIT1"]
TCP_CLOSE, SYN_RECV = C["TCP_CLOSE"], C["TCP_SYN_RECV"]


class Harness:
    """A correlator with one Envoy (TGID) listening on 0.0.0.0:LPORT (listener "plain_http")."""

    def __init__(self, **kwargs: int) -> None:
        self.out: list[ConnectionRecord] = []
        kwargs.setdefault("linger_ns", LINGER)
        self.c = ConnectionCorrelator(self.out.append, **kwargs)
        self.c.set_listen_sockets(listen_sockets((TGID, LISTEN_FD, "0.0.0.0", LPORT, None)))
        self.c.set_listener_names({("0.0.0.0", LPORT): "plain_http"})

    def feed(self, events: Iterable[Event]) -> Harness:
        for ev in events:
            self.c.handle(ev)
        return self

    def drain(self) -> list[ConnectionRecord]:
        """Let the linger of every closed connection pass (in event time) and return what was emitted."""
        self.c.expire(self.c.latest_ns + LINGER)
        return self.out

    def only(self) -> ConnectionRecord:
        out = self.drain()
        assert len(out) == 1, out
        return out[0]


def plain_story(fd: int = 30, pport: int = 40000, t0: int = 1_000) -> list[Event]:
    """ESTABLISHED -> accept -> epoll ADD -> setsockopt -> read -> write -> CLOSE_WAIT -> EOF -> close."""
    return [
        established(t0, pport),
        accept(t0 + 1_000, fd, pport),
        epoll(t0 + 2_000, fd, EPOLL_CTL_ADD),
        setsockopt(t0 + 2_500, fd, 6, 1),  # IPPROTO_TCP, TCP_NODELAY
        read(t0 + 3_000, fd, REQUEST),
        write(t0 + 4_000, fd, RESPONSE),
        state(t0 + 5_000, pport, ESTABLISHED, CLOSE_WAIT),
        read(t0 + 6_000, fd, b""),
        close(t0 + 7_000, fd, rx=len(REQUEST), tx=len(RESPONSE)),
    ]


def client_hello(sni: str = "a.example.com") -> bytes:
    """A real ClientHello (TLS 1.3 capable, ALPN h2/http1.1) from Python's ssl module."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=sni)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


# ---------------------------------------------------------------------------------------------- records


def test_plain_connection_gives_one_complete_record() -> None:
    h = Harness().feed(plain_story())
    assert h.out == []  # closed, but still lingering
    r = h.only()
    assert (r.tgid, r.fd, r.tid, r.thread_name) == (TGID, 30, TID, "wrk:worker_0")
    assert (r.peer_address, r.peer_port, r.local_port, r.local_address) == (PEER, 40000, LPORT, LOCAL)
    assert r.listen_fd == LISTEN_FD and r.listener_name == "plain_http"
    assert r.established_ns == 1_000 and r.start_ns == 1_000
    assert r.accept_ns == 2_000
    assert r.first_epoll_add_ns == 3_000 and r.handoff_ns == 3_000  # no re-registration: the first ADD
    assert r.first_io_ns == 4_000
    assert r.peer_fin_ns == 6_000 and r.eof_ns == 7_000 and r.envoy_fin_ns is None
    assert r.close_ns == 8_000
    assert (r.bytes_received, r.bytes_sent) == (len(REQUEST), len(RESPONSE))
    assert r.accept_queue_depth == 1 and r.accept_queue_depth_on_arrival == 1
    assert r.close_initiator() == "peer" and r.aborted() is None
    assert r.socket_options == [(6, 1, 1)]
    assert r.not_tls and r.tls is None
    assert r.peeks == 0 and r.peeked_bytes == 0
    assert not r.still_open and r.partial == []
    assert h.c.open == {} and h.c.by_tuple == {} and h.c.queued[LPORT] == {}
    assert h.c.stats["connections"] == 1 and not h.c.drops


def test_tls_inspector_sequence_sets_handoff_at_the_second_add() -> None:
    hello = client_hello()
    h = Harness().feed([
        established(1_000, 40000),
        accept(2_000, 30, 40000),
        epoll(3_000, 30, EPOLL_CTL_ADD),  # the listener filter waits for data
        read(4_000, 30, hello, peek=True),  # tls_inspector peeks the ClientHello
        epoll(5_000, 30, EPOLL_CTL_DEL),  # listener filters done ...
        epoll(6_000, 30, EPOLL_CTL_ADD),  # ... ConnectionImpl registers the fd: the hand-off
        read(7_000, 30, hello),  # BoringSSL reads the ClientHello for real
        epoll(7_500, 30, EPOLL_CTL_DEL),  # later re-registrations change nothing
        epoll(7_600, 30, EPOLL_CTL_ADD),
        close(8_000, 30, rx=len(hello)),
    ])
    r = h.only()
    assert r.first_epoll_add_ns == 3_000 and r.saw_epoll_del
    assert r.handoff_ns == 6_000
    assert r.first_io_ns == 7_000
    assert r.peeks == 1 and r.peeked_bytes == len(hello)
    assert r.tls is not None and r.tls.client_hello is not None
    assert r.tls.client_hello.server_name == "a.example.com"
    assert r.tls.started_ns == 4_000  # the handshake started when the ClientHello was first seen


def test_second_add_is_the_handoff_when_the_kernel_sends_adds_only() -> None:
    """The kernel side sends only ADDs (a DEL between two ADDs of one fd is implied)."""
    hello = client_hello()
    h = Harness().feed([
        established(1_000, 40000),
        accept(2_000, 30, 40000),
        epoll(3_000, 30, EPOLL_CTL_ADD),
        read(4_000, 30, hello, peek=True),
        epoll(6_000, 30, EPOLL_CTL_ADD),
        read(7_000, 30, hello),
        close(8_000, 30, rx=len(hello)),
    ])
    r = h.only()
    assert r.first_epoll_add_ns == 3_000 and r.saw_epoll_del
    assert r.handoff_ns == 6_000 and r.first_io_ns == 7_000


def test_repeated_peeks_count_and_keep_the_largest() -> None:
    hello = client_hello()
    h = Harness().feed([
        established(1_000, 40000), accept(2_000, 30, 40000), epoll(3_000, 30, EPOLL_CTL_ADD),
        read(4_000, 30, hello[:100], peek=True),  # only part of the ClientHello had arrived
        read(4_500, 30, hello, peek=True),
        epoll(5_000, 30, EPOLL_CTL_DEL), epoll(6_000, 30, EPOLL_CTL_ADD),
        close(8_000, 30),
    ])
    r = h.only()
    assert r.peeks == 2 and r.peeked_bytes == len(hello)
    assert r.handoff_ns == 6_000


def test_handoff_is_the_first_add_when_closed_before_any_io() -> None:
    h = Harness().feed([established(1_000, 40000), accept(2_000, 30, 40000), epoll(3_000, 30, EPOLL_CTL_ADD),
                        close(4_000, 30)])
    r = h.only()
    assert r.handoff_ns == 3_000 and r.first_io_ns is None


def test_established_after_the_accept_still_sets_established() -> None:
    # The ESTABLISHED tracepoint fired first (earlier timestamp) on another CPU, but reached user space
    # after the accept.
    events = plain_story()
    events[0], events[1] = events[1], events[0]
    r = Harness().feed(events).only()
    assert r.established_ns == 1_000 and r.accept_ns == 2_000
    assert r.start_ns == 1_000
    assert r.local_address == LOCAL
    assert r.accept_queue_depth is None  # nobody saw it queued
    assert "established_not_seen" not in r.partial


def test_accept_queue_depth_three_established_then_three_accepts() -> None:
    h = Harness().feed([
        established(1_000, 40001), established(1_100, 40002), established(1_200, 40003),
        accept(2_000, 31, 40001), accept(2_100, 32, 40002), accept(2_200, 33, 40003),
    ])
    for fd in (31, 32, 33):
        h.c.handle(close(3_000 + fd, fd))
    by_port = {r.peer_port: r for r in h.drain()}
    assert [by_port[p].accept_queue_depth for p in (40001, 40002, 40003)] == [3, 2, 1]
    assert [by_port[p].accept_queue_depth_on_arrival for p in (40001, 40002, 40003)] == [1, 2, 3]
    assert [by_port[p].established_ns for p in (40001, 40002, 40003)] == [1_000, 1_100, 1_200]
    assert h.c.queued[LPORT] == {}


def test_accept_queue_is_per_listening_port() -> None:
    h = Harness()
    h.c.set_listen_sockets(listen_sockets((TGID, LISTEN_FD, "0.0.0.0", LPORT, None),
                                          (TGID, 11, "0.0.0.0", 9443, None)))
    h.feed([established(1_000, 40001), established(1_100, 40002, lport=9443),
            accept(2_000, 31, 40001), accept(2_100, 32, 40002, listen_fd=11)])
    a, b = h.c.open[(TGID, 31)], h.c.open[(TGID, 32)]
    assert (a.local_port, a.accept_queue_depth) == (LPORT, 1)
    assert (b.local_port, b.accept_queue_depth, b.established_ns) == (9443, 1, 1_100)


def test_missing_established_is_partial() -> None:
    events = [e for e in plain_story() if not (e.kind == C["EV_SOCK_STATE"] and e.newstate == ESTABLISHED)]
    r = Harness().feed(events).only()
    assert r.established_ns is None and r.start_ns == r.accept_ns == 2_000
    assert r.partial == ["established_not_seen"]
    assert r.accept_queue_depth is None
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
    new = h.c.open[(TGID, 30)]
    assert new is not old and new.peer_port == 40002
    assert new.established_ns == 3_000 and new.first_io_ns is None and new.partial == []
    h.feed([read(5_000, 30, REQUEST), close(6_000, 30, rx=len(REQUEST))])
    done = h.drain()
    assert [r.peer_port for r in done] == [40001, 40002]
    assert done[1].first_io_ns == 5_000 and done[1].bytes_received == len(REQUEST)
    assert done[0].first_io_ns == 2_500  # the later I/O did not leak into the old record


def test_duplicate_established_makes_one_queue_entry() -> None:
    h = Harness().feed([established(1_000, 40001), established(1_000, 40001)])
    assert len(h.c.queued[LPORT]) == 1
    h.feed([accept(2_000, 30, 40001), established(2_500, 40002), accept(3_000, 31, 40002)])
    assert h.c.open[(TGID, 30)].accept_queue_depth == 1
    assert h.c.open[(TGID, 30)].established_ns == 1_000
    assert h.c.open[(TGID, 31)].accept_queue_depth == 1
    assert h.c.queued[LPORT] == {}


def test_duplicate_established_does_not_change_depth_on_arrival() -> None:
    h = Harness().feed([established(1_000, 40001), established(1_000, 40001), accept(2_000, 30, 40001)])
    assert h.c.open[(TGID, 30)].accept_queue_depth_on_arrival == 1


@pytest.mark.parametrize("when", ["after_accept", "while_lingering"])
def test_duplicate_established_after_the_accept_leaves_no_stale_queue_entry(when: str) -> None:
    h = Harness().feed([established(1_000, 40001), accept(2_000, 30, 40001)])
    if when == "while_lingering":
        h.feed([close(2_500, 30)])
    h.feed([established(1_000, 40001)])  # the same event, delivered a second time
    h.feed([established(3_000, 40002), accept(3_100, 31, 40002)])
    nxt = h.c.open[(TGID, 31)]
    assert (nxt.accept_queue_depth, nxt.accept_queue_depth_on_arrival) == (1, 1)
    assert h.c.queued[LPORT] == {}


def test_reset_received_before_fin_is_a_peer_abort() -> None:
    h = Harness().feed([
        established(1_000, 40000), accept(2_000, 30, 40000), epoll(3_000, 30, EPOLL_CTL_ADD),
        read(4_000, 30, REQUEST[:20]),
        tcp(5_000, "TCP_RESET_RECEIVED", 40000),
        state(5_001, 40000, ESTABLISHED, TCP_CLOSE),
        data(5_100, 30, DIR_READ, -104),  # ECONNRESET
        close(6_000, 30, rx=20),
    ])
    r = h.only()
    assert [m.name for m in r.tcp_marks] == ["tcp.reset_received"]
    assert r.aborted() == "peer"
    assert r.close_initiator() == "peer"
    assert r.eof_ns is None and r.peer_fin_ns is None


def test_reset_after_the_peers_fin_is_not_an_abort() -> None:
    h = Harness().feed([
        established(1_000, 40000), accept(2_000, 30, 40000), read(3_000, 30, REQUEST),
        state(4_000, 40000, ESTABLISHED, CLOSE_WAIT),
        read(4_100, 30, b""),
        tcp(4_200, "TCP_RESET_RECEIVED", 40000),
        close(5_000, 30),
    ])
    r = h.only()
    assert [m.name for m in r.tcp_marks] == ["tcp.reset_received"]
    assert r.aborted() is None
    assert r.close_initiator() == "peer"


def test_reset_sent_is_an_envoy_abort() -> None:
    h = Harness().feed([
        established(1_000, 40000), accept(2_000, 30, 40000), read(3_000, 30, REQUEST),
        close(4_000, 30), tcp(4_100, "TCP_RESET_SENT", 40000, tcp_state=ESTABLISHED),
    ])
    r = h.only()
    assert r.aborted() == "envoy" and r.close_initiator() == "envoy"
    assert r.tcp_marks[0].state == ESTABLISHED


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
    assert [(m.ts_ns, m.name) for m in r.tcp_marks] == [
        (500, "tcp.synack_retransmit"), (700, "tcp.synack_retransmit"), (1_500, "tcp.synack_retransmit")]
    assert r.aborted() is None
    assert list(h.c.early_synack) == [(PEER, 40099, LPORT)]


def test_synack_retransmit_without_established_reaches_the_accept() -> None:
    r = Harness().feed([tcp(500, "TCP_SYNACK_RETRANSMIT", 40000), accept(2_000, 30, 40000),
                        close(3_000, 30)]).only()
    assert [m.name for m in r.tcp_marks] == ["tcp.synack_retransmit"]


def test_linger_emits_after_linger_ns_of_event_time_and_applies_late_events() -> None:
    h = Harness().feed([
        established(1_000, 40000), accept(2_000, 30, 40000), read(3_000, 30, REQUEST),
        write(3_500, 30, RESPONSE),
        close(8_000, 30, rx=len(REQUEST), tx=len(RESPONSE)),
        state(8_100, 40000, ESTABLISHED, FIN_WAIT1, tgid=TGID),  # Envoy's FIN, right after the close
        tcp(8_200, "TCP_RESET_SENT", 40000, tcp_state=TCP_CLOSE),
        established(8_999, 40001),  # unrelated traffic moves event time forward
    ])
    assert h.out == []
    assert h.c.closing and h.c.closing[0].close_ns == 8_000
    h.feed([established(9_000, 40002)])  # 8_000 + linger
    assert len(h.out) == 1
    r = h.out[0]
    assert r.envoy_fin_ns == 8_100
    assert [(m.name, m.state) for m in r.tcp_marks] == [("tcp.reset_sent", TCP_CLOSE)]
    assert r.close_initiator() == "envoy"
    assert (PEER, 40000, LPORT) not in h.c.by_tuple
    # after it was emitted, events of that 4-tuple no longer touch the record
    h.feed([tcp(9_100, "TCP_RESET_SENT", 40000)])
    assert len(r.tcp_marks) == 1


def test_expire_uses_the_given_time() -> None:
    h = Harness().feed(plain_story())
    h.c.expire(8_000 + LINGER - 1)
    assert h.out == []
    h.c.expire(8_000 + LINGER)
    assert len(h.out) == 1


def test_flush_ends_open_connections_as_still_open() -> None:
    h = Harness().feed([
        established(1_000, 40001), accept(2_000, 30, 40001), read(3_000, 30, REQUEST),
        established(1_500, 40002), accept(2_500, 31, 40002), close(4_000, 31),
    ])
    h.c.flush(10_000)
    assert len(h.out) == 2
    by_fd = {r.fd: r for r in h.out}
    assert by_fd[30].still_open and by_fd[30].close_ns == 10_000
    assert not by_fd[31].still_open and by_fd[31].close_ns == 4_000
    assert h.c.open == {} and not h.c.closing
    h.c.flush(20_000)
    assert len(h.out) == 2  # nothing is emitted twice


def test_flush_never_ends_before_the_accept() -> None:
    h = Harness().feed([accept(5_000, 30, 40000)])
    h.c.flush(1_000)
    assert h.out[0].close_ns == 5_000


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
    assert set(h.c.open) == {(TGID, 31), (TGID, 32)}
    h.feed([tcp(2_100, "TCP_RESET_RECEIVED", 40001)])
    assert victim.tcp_marks == []  # the evicted record is gone from the 4-tuple index too


def test_accept_queue_table_bound_evicts_the_oldest() -> None:
    h = Harness(max_queued=2).feed([established(1_000, 40001), established(1_001, 40002),
                                    established(1_002, 40003)])
    assert h.c.drops["accept_queue_table_full"] == 1
    assert list(h.c.queued[LPORT]) == [(PEER, 40002), (PEER, 40003)]
    h.feed([accept(2_000, 30, 40001), close(2_100, 30)])
    assert h.only().established_ns is None


def test_events_for_unknown_fds_are_ignored() -> None:
    h = Harness().feed([
        read(1_000, 99, REQUEST), write(1_100, 99, RESPONSE), epoll(1_200, 99, EPOLL_CTL_ADD),
        setsockopt(1_300, 99, 6, 1), close(1_400, 99, rx=5),
        state(1_500, 40000, ESTABLISHED, CLOSE_WAIT), tcp(1_600, "TCP_RETRANSMIT", 40000),
        established(2_000, 40000), accept(2_100, 30, 40000),
        read(2_200, 30, REQUEST, tgid=TGID + 1),  # same fd, other process
        close(2_300, 30, tgid=TGID + 1),
        data(2_400, 30, DIR_READ, 10, b"x" * 10, role=C["ROLE_UPSTREAM"]),  # not a downstream fd event
        close(2_500, 30, role=C["ROLE_UPSTREAM"]),
    ])
    assert h.drain() == []
    conn = h.c.open[(TGID, 30)]
    assert conn.first_io_ns is None and conn.close_ns is None and conn.tcp_marks == []
    assert conn.socket_options == []
    h.c.flush(3_000)
    assert [r.fd for r in h.out] == [30] and h.out[0].still_open


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
    assert set(h.c.open) == {(other, 30)}
    mine = h.drain()[0]
    assert (mine.tgid, mine.peer_port, mine.local_port, mine.first_io_ns) == (TGID, 40001, LPORT, None)
    theirs = h.c.open[(other, 30)]
    assert (theirs.peer_port, theirs.local_port, theirs.established_ns) == (40002, 9090, 1_001)
    assert theirs.first_io_ns == 3_000
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
    assert (a.peer_address, a.local_address, a.listener_name, a.established_ns) == (
        "::1", "::1", "v6_loopback", 1_000)
    assert (b.peer_address, b.local_address, b.local_port, b.established_ns) == (
        "10.0.0.2", "10.0.0.1", 9443, 1_100)
    assert b.listener_name == "v6_any"
    assert build(a)[0].attributes["network.type"] == "ipv6"
    assert build(b)[0].attributes["network.type"] == "ipv4"


# ---------------------------------------------------------------------------------------------- spans


def build(r: ConnectionRecord) -> list[ReadableSpan]:
    builder = ConnectionSpanBuilder(RESOURCE, MonotonicClock(OFFSET), rng=random.Random(7))
    return readable_connection_spans(builder, r)


def by_name(spans: list[ReadableSpan]) -> dict[str, ReadableSpan]:
    out = {s.name: s for s in spans}
    assert len(out) == len(spans), [s.name for s in spans]
    return out


def assert_shape(spans: list[ReadableSpan]) -> ReadableSpan:
    """Root first, every other span a child of it, inside its interval, all in one trace and resource."""
    root = spans[0]
    assert root.name == "envoy.downstream.connection" and root.parent is None
    assert root.kind == SpanKind.SERVER
    assert len({s.context.span_id for s in spans}) == len(spans)
    for s in spans:
        assert s.resource is RESOURCE
        assert s.context.trace_id == root.context.trace_id
        assert s.context.trace_flags.sampled
        assert s.start_time <= s.end_time
        if s is not root:
            assert s.parent is not None and s.parent.span_id == root.context.span_id
            assert s.kind == SpanKind.INTERNAL
            assert root.start_time <= s.start_time <= s.end_time <= root.end_time, s.name
    return root


def test_plain_connection_spans() -> None:
    r = Harness().feed(plain_story()).only()
    spans = build(r)
    root = assert_shape(spans)
    assert [s.name for s in spans] == ["envoy.downstream.connection", "tcp.accept_queue",
                                       "envoy.listener_filters"]
    named = by_name(spans)
    assert root.start_time == OFFSET + 1_000 and root.end_time == OFFSET + 8_000
    q, lf = named["tcp.accept_queue"], named["envoy.listener_filters"]
    assert (q.start_time, q.end_time) == (OFFSET + 1_000, OFFSET + 2_000)
    assert (lf.start_time, lf.end_time) == (OFFSET + 2_000, OFFSET + 3_000)
    assert dict(root.attributes) == {
        "network.transport": "tcp",
        "network.type": "ipv4",
        "network.peer.address": PEER,
        "network.peer.port": 40000,
        "network.local.address": LOCAL,
        "network.local.port": LPORT,
        "process.pid": TGID,
        "thread.id": TID,
        "thread.name": "wrk:worker_0",
        "envoy.connection.fd": 30,
        "envoy.connection.bytes_received": len(REQUEST),
        "envoy.connection.bytes_sent": len(RESPONSE),
        "envoy.listener.name": "plain_http",
        "envoy.connection.close_initiator": "peer",
        "envoy.connection.socket_options": ["TCP_NODELAY"],
        "envoy.connection.requests": 1,
    }
    assert dict(q.attributes) == {"tcp.accept_queue.depth": 1, "tcp.accept_queue.depth_on_arrival": 1}
    assert dict(lf.attributes) == {"envoy.listener_filters.peeked_bytes": 0,
                                   "envoy.listener_filters.peeks": 0}
    assert root.status.status_code == StatusCode.UNSET
    assert all(s.status.status_code == StatusCode.UNSET for s in spans)
    assert root.events == ()


def test_span_ids_differ_between_connections() -> None:
    builder = ConnectionSpanBuilder(RESOURCE, MonotonicClock(OFFSET))
    h = Harness().feed(plain_story(fd=30, pport=40001) + plain_story(fd=31, pport=40002, t0=20_000))
    a, b = (readable_connection_spans(builder, r) for r in h.drain())
    assert a[0].context.trace_id != b[0].context.trace_id
    assert {s.context.span_id for s in a}.isdisjoint({s.context.span_id for s in b})


def test_abort_spans_have_error_status_and_reset_event() -> None:
    r = Harness().feed([
        established(1_000, 40000), accept(2_000, 30, 40000), epoll(3_000, 30, EPOLL_CTL_ADD),
        read(4_000, 30, REQUEST[:20]),
        tcp(5_000, "TCP_RESET_RECEIVED", 40000),
        close(6_000, 30, rx=20),
    ]).only()
    spans = build(r)
    root = assert_shape(spans)
    assert root.status.status_code == StatusCode.ERROR
    assert root.status.description == "connection reset by peer"
    assert [(e.name, e.timestamp) for e in root.events] == [("tcp.reset_received", OFFSET + 5_000)]
    assert not root.events[0].attributes  # tcp_receive_reset has no state
    assert root.attributes["envoy.connection.close_initiator"] == "peer"
    assert all(s.status.status_code == StatusCode.UNSET for s in spans[1:])


def test_reset_sent_by_the_close_extends_the_root() -> None:
    r = Harness().feed([
        established(1_000, 40000), accept(2_000, 30, 40000), read(3_000, 30, REQUEST),
        close(4_000, 30), tcp(4_500, "TCP_RESET_SENT", 40000, tcp_state=TCP_CLOSE),
    ]).only()
    root = assert_shape(build(r))
    assert root.end_time == OFFSET + 4_500
    assert root.status.status_code == StatusCode.ERROR
    assert root.status.description == "connection reset by envoy"
    assert dict(root.events[0].attributes) == {"tcp.state": TCP_CLOSE}
    assert root.attributes["envoy.connection.close_initiator"] == "envoy"


def test_reset_after_fin_is_not_an_error() -> None:
    r = Harness().feed([
        established(1_000, 40000), accept(2_000, 30, 40000), read(3_000, 30, REQUEST),
        state(4_000, 40000, ESTABLISHED, CLOSE_WAIT), read(4_100, 30, b""),
        tcp(4_200, "TCP_RESET_RECEIVED", 40000), close(5_000, 30),
    ]).only()
    root = assert_shape(build(r))
    assert root.status.status_code == StatusCode.UNSET
    assert [e.name for e in root.events] == ["tcp.reset_received"]


def test_partial_connection_spans() -> None:
    # no ESTABLISHED, no epoll, no I/O: no accept-queue span, hand-off unknown
    h = Harness()
    h.c.set_listener_names({})
    r = h.feed([accept(2_000, 30, 40000), close(5_000, 30)]).only()
    spans = build(r)
    root = assert_shape(spans)
    named = by_name(spans)
    assert set(named) == {"envoy.downstream.connection", "envoy.listener_filters"}
    assert root.start_time == OFFSET + 2_000
    assert tuple(root.attributes["otel_envoy.partial"]) == ("established_not_seen",)
    for key in ("network.local.address", "envoy.listener.name", "envoy.connection.socket_options",
                "envoy.connection.still_open", "tls.client.server_name"):
        assert key not in root.attributes, key
    lf = named["envoy.listener_filters"]
    assert tuple(lf.attributes["otel_envoy.partial"]) == ("handoff_not_seen",)
    assert lf.end_time == root.end_time == OFFSET + 5_000


def test_still_open_connection_spans() -> None:
    h = Harness().feed([established(1_000, 40000), accept(2_000, 30, 40000), epoll(3_000, 30, EPOLL_CTL_ADD),
                        read(4_000, 30, REQUEST)])
    h.c.flush(9_000)
    spans = build(h.out[0])
    root = assert_shape(spans)
    assert root.attributes["envoy.connection.still_open"] is True
    assert "envoy.connection.close_initiator" not in root.attributes
    assert root.end_time == OFFSET + 9_000
    assert by_name(spans)["envoy.listener_filters"].end_time == OFFSET + 3_000


def test_multiple_partials_are_sorted_and_unique() -> None:
    h = Harness()
    h.c.set_listen_sockets({})
    h.feed([accept(2_000, 30, 40000), accept(3_000, 30, 40001)])
    root = build(h.out[0])[0]
    assert tuple(root.attributes["otel_envoy.partial"]) == (
        "close_not_seen", "established_not_seen", "listener_unknown")


def test_synack_retransmits_are_root_events() -> None:
    r = Harness().feed([tcp(500, "TCP_SYNACK_RETRANSMIT", 40000, tcp_state=SYN_RECV),
                        established(1_000, 40000), accept(2_000, 30, 40000), close(3_000, 30)]).only()
    root = build(r)[0]
    assert [e.name for e in root.events] == ["tcp.synack_retransmit"]
    assert root.status.status_code == StatusCode.UNSET


def test_incomplete_tls_handshake_span_is_an_error() -> None:
    hello = client_hello("b.example.com")
    r = Harness().feed([
        established(1_000, 40000), accept(2_000, 30, 40000), epoll(3_000, 30, EPOLL_CTL_ADD),
        read(4_000, 30, hello, peek=True), epoll(5_000, 30, EPOLL_CTL_DEL), epoll(6_000, 30, EPOLL_CTL_ADD),
        read(7_000, 30, hello), state(7_500, 40000, ESTABLISHED, CLOSE_WAIT), read(7_600, 30, b""),
        close(8_000, 30, rx=len(hello)),
    ]).only()
    spans = build(r)
    root = assert_shape(spans)
    named = by_name(spans)
    assert set(named) == {"envoy.downstream.connection", "tcp.accept_queue", "envoy.listener_filters",
                          "tls.handshake"}
    assert root.attributes["tls.client.server_name"] == "b.example.com"
    hs = named["tls.handshake"]
    assert hs.start_time == OFFSET + 4_000 and hs.end_time == root.end_time
    assert hs.status.status_code == StatusCode.ERROR
    assert hs.status.description == "connection closed during the TLS handshake"
    assert hs.attributes["tls.established"] is False
    assert named["envoy.listener_filters"].attributes["envoy.listener_filters.peeked_bytes"] == len(hello)


# --------------------------------------------------------------------- a complete TLS handshake, in memory


@pytest.fixture(scope="module")
def server_cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl CLI not installed")
    d = tmp_path_factory.mktemp("correlator-tls")
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-subj", "/CN=a.example.com", "-days", "1", "-addext",
                    "subjectAltName=DNS:a.example.com", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return cert, key


def tls_transcript(cert: Path, key: str | Path) -> list[tuple[str, bytes]]:
    """("c", bytes Envoy read) / ("s", bytes Envoy wrote) of a TLS 1.3 handshake plus one request."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.load_verify_locations(cert)
    client_ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    pair = MemoryTls.wrap(client_ctx, server_ctx)
    assert pair.handshake(rounds=10) and not pair.errors and pair.client.version() == "TLSv1.3"
    pair.client.write(REQUEST)
    pair.msgs.append(("c", pair.c_out.read()))
    return pair.msgs


def test_complete_tls_handshake_span(server_cert: tuple[Path, Path]) -> None:
    msgs = tls_transcript(*server_cert)
    hello = msgs[0][1]
    events: list[Event] = [
        established(1_000, 40000), accept(2_000, 30, 40000), epoll(3_000, 30, EPOLL_CTL_ADD),
        read(4_000, 30, hello, peek=True), epoll(5_000, 30, EPOLL_CTL_DEL), epoll(6_000, 30, EPOLL_CTL_ADD),
    ]
    t = 7_000
    for direction, chunk in msgs:
        events.append(data(t, 30, DIR_READ if direction == "c" else DIR_WRITE, len(chunk), chunk))
        t += 1_000
    events += [state(t, 40000, ESTABLISHED, CLOSE_WAIT), read(t + 100, 30, b""), close(t + 1_000, 30)]
    r = Harness().feed(events).only()
    spans = build(r)
    root = assert_shape(spans)
    named = by_name(spans)
    hs = named["tls.handshake"]
    assert hs.attributes["tls.protocol.version"] == "1.3"
    assert hs.attributes["tls.client.server_name"] == "a.example.com"
    assert hs.attributes["tls.established"] is True
    assert hs.status.status_code == StatusCode.UNSET
    assert hs.start_time == OFFSET + 4_000  # the peeked ClientHello
    assert OFFSET + 7_000 < hs.end_time < root.end_time
    assert root.attributes["tls.client.server_name"] == "a.example.com"
    lf = named["envoy.listener_filters"]
    assert lf.end_time == OFFSET + 6_000 and lf.start_time <= hs.start_time <= lf.end_time
    assert root.status.status_code == StatusCode.UNSET


def test_requests_are_parsed_after_a_listener_filter_peeked_the_first_bytes() -> None:
    """An http_inspector-like peek before the first real read must not stop request parsing."""
    requests: list[tuple[str | None, int | None]] = []
    h = Harness(on_request=lambda rr, ex: requests.append(
        (ex.request.path, ex.response.status if ex.response else None)))
    req = b"GET /peeked HTTP/1.1\r\nHost: lab\r\n\r\n"
    resp = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    h.feed([
        established(1_000, 40000), accept(2_000, 30, 40000), epoll(3_000, 30, EPOLL_CTL_ADD),
        read(4_000, 30, req, peek=True), epoll(5_000, 30, EPOLL_CTL_ADD),
        read(6_000, 30, req), write(7_000, 30, resp), close(8_000, 30, rx=len(req), tx=len(resp)),
    ])
    assert requests == [("/peeked", 200)]
    assert h.only().request_count == 1


# ---------------------------------------------------------------------------------------------- request spans

CLIENT_B3 = "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1"
CLIENT_TP = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
ENVOY_TP = "00-49fd87ded2f9503d30abce705d98e55e-27ab0fe9fa7fdb29-01"  # a trace Envoy's tracer started
ENVOY_CHILD_TP = "00-4bf92f3577b34da6a3ce929d0e0e4736-b031a366acd1a2e9-01"  # Envoy's span, client's trace


def _request_spans(down_headers: dict[str, str], up_headers: dict[str, str]) -> tuple:
    """Our SERVER and CLIENT span of one proxied GET /hello (request headers as given)."""
    conn = ConnectionRecord(TGID, 30, TID, "wrk:worker_0", LISTEN_FD, PEER, 40000, LPORT, 1_000,
                            trace_id="1" * 32, span_id="2" * 16)
    down = HttpMessage(2_000, 2_100, method="GET", path="/hello", version="1.1", headers=down_headers)
    up_req = HttpMessage(3_000, 3_100, method="GET", path="/hello", version="1.1", headers=up_headers)
    up_req.response = HttpMessage(4_000, 4_100, status=200, version="1.1", body_bytes=2)
    resp = HttpMessage(5_000, 5_100, status=200, version="1.1", body_bytes=2)
    up = UpstreamRecord(TGID, 31, TID, "wrk:worker_0", "127.0.0.1", 8080, 2_500, 0, "3" * 32, "4" * 16,
                        "5" * 16)
    rr = RequestRecord(conn, down, "6" * 16, trace_context(down_headers))
    up.cause = rr
    rr.upstream.append((up, up_req, "7" * 16))
    builder = RequestSpanBuilder(ConnectionSpanBuilder(RESOURCE, MonotonicClock(OFFSET)))
    server, client = builder.downstream(rr, HttpExchange(down, resp))
    return conn, server, client


def _links(span) -> list[tuple[str, str, str]]:
    return [(t, s, a["otel_envoy.link"]) for t, s, a in span.links]


def test_upstream_request_in_envoys_other_trace_links_to_its_downstream_request() -> None:
    """A b3 client in front of Envoy's W3C-only OpenTelemetry tracer: Envoy starts a trace of its own and
    sends its traceparent upstream (the b3 header passes through). The request span stays in the client's
    trace, the upstream request span in Envoy's; each links to the other, so neither half is lost."""
    conn, server, client = _request_spans({"b3": CLIENT_B3}, {"b3": CLIENT_B3, "traceparent": ENVOY_TP})
    assert f"{server.trace_id}-{server.parent_span_id}-1" == CLIENT_B3
    assert f"00-{client.trace_id}-{client.parent_span_id}-01" == ENVOY_TP
    assert _links(server) == [(conn.trace_id, conn.span_id, "downstream_connection"),
                              (client.trace_id, client.span_id, "upstream_request")]
    # the upstream connection this request opened sits under it, in the client's trace
    assert _links(client) == [(server.trace_id, "4" * 16, "upstream_connection"),
                              (server.trace_id, server.span_id, "downstream_request")]


@pytest.mark.parametrize(("down", "up", "parent"), [
    ({"traceparent": CLIENT_TP}, {"traceparent": ENVOY_CHILD_TP}, "b031a366acd1a2e9"),  # Envoy continued it
    ({"traceparent": CLIENT_TP}, {"traceparent": CLIENT_TP}, "6" * 16),  # no tracer: passed through
    ({}, {}, "6" * 16),  # no trace context anywhere: the connection's trace
])
def test_upstream_request_in_the_same_trace_gets_no_request_links(down: dict[str, str], up: dict[str, str],
                                                                  parent: str) -> None:
    _, server, client = _request_spans(down, up)
    assert client.trace_id == server.trace_id and client.parent_span_id == parent
    assert "upstream_request" not in [k for _, _, k in _links(server)]
    assert "downstream_request" not in [k for _, _, k in _links(client)]

"""The correlator's dispatch (correlate/correlator.py): closed connections linger in event time, expire and
flush emit each one once, events of fds and roles no part tracks change nothing.
"""

from __future__ import annotations

from tests.support.correlation import (
    CLOSE_WAIT,
    ESTABLISHED,
    FIN_WAIT1,
    LINGER,
    REQUEST,
    RESPONSE,
    TCP_CLOSE,
    Harness,
    plain_story,
)
from tests.support.events import (
    DIR_READ,
    LPORT,
    PEER,
    TGID,
    C,
    accept,
    close,
    data,
    established,
    read,
    state,
    tcp,
    write,
)


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
    assert h.c.downstream.closing and h.c.downstream.closing[0].close_ns == 8_000
    h.feed([established(9_000, 40002)])  # 8_000 + linger
    assert len(h.out) == 1
    r = h.out[0]
    assert r.tcp.envoy_fin_ns == 8_100
    assert [(m.name, m.state) for m in r.tcp.marks] == [("tcp.reset_sent", TCP_CLOSE)]
    assert r.close_initiator() == "envoy"
    assert (PEER, 40000, LPORT) not in h.c.downstream.by_tuple
    # after it was emitted, events of that 4-tuple no longer touch the record
    h.feed([tcp(9_100, "TCP_RESET_SENT", 40000)])
    assert len(r.tcp.marks) == 1


def test_a_reset_the_listener_sent_is_counted_apart_from_marks_that_found_no_connection() -> None:
    """tcp:tcp_send_reset on the listening socket gives the listener's addresses (peer port 0): it belongs
    to no connection. Any other mark that finds none is counted too, not silently dropped."""
    h = Harness().feed([
        tcp(1_000, "TCP_RESET_SENT", 0, tcp_state=10, peer="0.0.0.0"),  # TCP_LISTEN
        tcp(1_100, "TCP_RESET_RECEIVED", 40123, tcp_state=ESTABLISHED),  # a peer nothing knows
    ])
    assert h.c.stats["tcp_resets_sent_by_listener"] == 1
    assert h.c.stats["tcp_marks_without_connection"] == 1
    assert h.out == []


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
    assert h.c.downstream.open == {} and not h.c.downstream.closing
    h.c.flush(20_000)
    assert len(h.out) == 2  # nothing is emitted twice


def test_flush_never_ends_before_the_accept() -> None:
    h = Harness().feed([accept(5_000, 30, 40000)])
    h.c.flush(1_000)
    assert h.out[0].close_ns == 5_000


def test_events_for_unknown_fds_are_ignored() -> None:
    h = Harness().feed([
        read(1_000, 99, REQUEST), write(1_100, 99, RESPONSE),
        close(1_400, 99, rx=5, epoll_adds=(1_200,), sockopts=((6, 1, 1),)),
        state(1_500, 40000, ESTABLISHED, CLOSE_WAIT), tcp(1_600, "TCP_RETRANSMIT", 40000),
        established(2_000, 40000), accept(2_100, 30, 40000),
        read(2_200, 30, REQUEST, tgid=TGID + 1),  # same fd, other process
        close(2_300, 30, tgid=TGID + 1),
        data(2_400, 30, DIR_READ, 10, b"x" * 10, role=C["ROLE_UPSTREAM"]),  # not a downstream fd event
        close(2_500, 30, role=C["ROLE_UPSTREAM"]),
    ])
    assert h.drain() == []
    conn = h.c.downstream.open[(TGID, 30)]
    assert conn.listener.first_io_ns is None and conn.close_ns is None and conn.tcp.marks == []
    assert conn.socket_options == ()
    h.c.flush(3_000)
    assert [r.fd for r in h.out] == [30] and h.out[0].still_open

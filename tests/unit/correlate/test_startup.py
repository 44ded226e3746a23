"""Socket setup steps -> startup records -> startup traces, from event sequences Envoy 1.40 produced
(strace of ``envoy --concurrency 2`` with one SO_REUSEPORT listener and one without)."""

from __future__ import annotations

import socket

from opentelemetry.sdk.resources import Resource

from otel_envoy.correlate.startup import QUIET_NS, STARTUP_WAIT_NS, ProcessStartups, StartupRecord
from otel_envoy.envoy.listen_socket import ListenSocket
from otel_envoy.events.layout import load_layout
from otel_envoy.events.types import ListenEvent, ProcessEvent, SocketSetupEvent
from otel_envoy.spans.clock import MonotonicClock
from otel_envoy.spans.connection import ConnectionSpanBuilder
from otel_envoy.spans.model import STATUS_CODE_ERROR
from otel_envoy.spans.startup_spans import StartupSpanBuilder

C = load_layout().constants
PID, MAIN, W0, W1 = 900, 900, 906, 907
LOOPBACK = socket.inet_aton("127.0.0.1") + bytes(12)
MS = 1_000_000


def setup(ts: int, op: str, fd: int, *, other: int = -1, result: int = 0, port: int = 0, tid: int = MAIN,
          comm: str = "envoy") -> SocketSetupEvent:
    return SocketSetupEvent(ts, C["EV_SOCKET_SETUP"], PID, tid, 0, fd, other, result, C[f"SETUP_{op}"],
                            socket.AF_INET if port else 0, port, LOOPBACK if port else bytes(16),
                            comm.encode())


def listen(ts: int, fd: int) -> ListenEvent:
    return ListenEvent(ts, C["EV_LISTEN"], PID, MAIN, 0, fd, -1)


def process(ts: int, kind: str) -> ProcessEvent:
    return ProcessEvent(ts, C[kind], PID, PID, 0, PID, b"envoy")


def _builder() -> StartupSpanBuilder:
    return StartupSpanBuilder(ConnectionSpanBuilder(Resource.create({}), MonotonicClock(0)))


def envoy_start(startups: ProcessStartups, t0: int = 0) -> None:
    """What the kernel reports of an Envoy start: exec, then per listener its sockets, listen, workers."""
    startups.on_process(process(t0, "EV_EXEC"))
    steps = [
        setup(t0 + 70 * MS, "REUSEPORT", 24, result=1), setup(t0 + 71 * MS, "BIND", 24, port=19100),
        setup(t0 + 72 * MS, "REUSEPORT", 25, result=1), setup(t0 + 73 * MS, "BIND", 25, port=19100),
        setup(t0 + 74 * MS, "BIND", 26, port=19101), setup(t0 + 75 * MS, "DUP", 27, other=26, port=19101),
    ]
    for ev in steps:
        startups.on_setup(ev)
    for i, fd in enumerate((24, 25, 26, 27)):
        startups.on_listen(listen(t0 + 76 * MS + i, fd))
    for ts, fd, tid, comm in ((78, 24, W0, "wrk:worker_0"), (78, 26, W0, "wrk:worker_0"),
                              (79, 25, W1, "wrk:worker_1"), (79, 27, W1, "wrk:worker_1")):
        startups.on_setup(setup(t0 + ts * MS, "WATCH", fd, other=15, port=19100 if fd < 26 else 19101,
                                tid=tid, comm=comm))


def test_a_start_is_one_record_once_quiet() -> None:
    got: list[StartupRecord] = []
    startups = ProcessStartups(got.append)
    envoy_start(startups)
    startups.expire(79 * MS + QUIET_NS - 1)
    assert got == []  # not quiet long enough yet
    startups.expire(79 * MS + QUIET_NS)
    [rec] = got
    assert rec.exec_ns == 0 and rec.comm == "envoy" and len(rec.sockets) == 4
    by_fd = {s.fd: s for s in rec.sockets}
    assert by_fd[24].reuse_port and by_fd[25].reuse_port and by_fd[26].reuse_port is None
    assert by_fd[27].duplicate_of == 26 and by_fd[27].address == "127.0.0.1" and by_fd[27].port == 19101
    assert [w.thread_name for w in by_fd[25].watches] == ["wrk:worker_1"]
    assert rec.workers == {(W0, "wrk:worker_0"), (W1, "wrk:worker_1")}


def test_the_startup_trace() -> None:
    got: list[StartupRecord] = []
    startups = ProcessStartups(got.append)
    envoy_start(startups, t0=1_000)
    startups.flush(0)
    names = {("127.0.0.1", 19100): "plain", ("127.0.0.1", 19101): "dup_listener"}
    builder = StartupSpanBuilder(ConnectionSpanBuilder(Resource.create({}), MonotonicClock(5)),
                                 lambda a, p: names.get((a, p)))
    root, *sockets = builder.spans(got[0])
    assert root.name == "envoy.startup" and root.parent_span_id is None
    assert root.start_ns == 1_005 and root.end_ns == 1_005 + 79 * MS
    assert root.attributes["envoy.startup.workers"] == 2
    assert root.attributes["envoy.startup.reuse_port_sockets"] == 2
    assert root.attributes["envoy.startup.duplicated_sockets"] == 1
    assert root.attributes["envoy.startup.first_listen_ns"] == 76 * MS
    assert root.attributes["envoy.startup.ready_ns"] == 79 * MS
    assert all(s.trace_id == root.trace_id and s.parent_span_id == root.span_id for s in sockets)
    first = sockets[0].attributes
    assert first["server.port"] == 19100 and first["envoy.listener.name"] == "plain"
    assert first["envoy.listen_socket.accepted_by"] == ["wrk:worker_0"]
    assert [e[1] for e in sockets[0].events] == ["setsockopt SO_REUSEPORT", "bind", "listen",
                                                 "epoll registration"]
    copy = sockets[3]
    assert copy.attributes["envoy.listen_socket.duplicate_of"] == 26
    assert [e[1] for e in copy.events] == ["dup", "listen", "epoll registration"]


def test_shutdown_carries_the_sockets_without_their_history() -> None:
    got: list[StartupRecord] = []
    startups = ProcessStartups(got.append)
    envoy_start(startups)
    startups.expire(10 * QUIET_NS)
    t = 20 * QUIET_NS
    for i, fd in enumerate((24, 25, 26, 27)):
        startups.on_setup(setup(t + i, "CLOSE", fd, port=19100))
    startups.on_process(process(t + 10, "EV_EXIT"))
    assert len(got) == 2
    builder = StartupSpanBuilder(ConnectionSpanBuilder(Resource.create({}), MonotonicClock(0)))
    root, *sockets = builder.spans(got[1])
    assert root.name == "envoy.shutdown" and root.attributes["envoy.startup.exited"] is True
    assert root.start_ns == t and root.end_ns == t + 10
    assert len(sockets) == 4 and all([e[1] for e in s.events] == ["close"] for s in sockets)


def test_a_failed_bind_is_an_error() -> None:
    got: list[StartupRecord] = []
    startups = ProcessStartups(got.append)
    startups.on_setup(setup(5, "BIND", 30, port=80, result=-98))
    startups.flush(0)
    root, sock = _builder().spans(got[0])
    assert root.name == "envoy.listeners.setup" and root.status_code == STATUS_CODE_ERROR
    assert "EADDRINUSE" in root.status_message
    assert sock.attributes["error.type"] == "EADDRINUSE" and sock.status_code == STATUS_CODE_ERROR


def test_a_start_waits_for_its_workers() -> None:
    """An Envoy busy with its configuration before it binds anything is not handed on as an empty start."""
    got: list[StartupRecord] = []
    startups = ProcessStartups(got.append)
    startups.on_process(process(0, "EV_EXEC"))
    startups.expire(5 * QUIET_NS)
    assert got == []
    startups.expire(STARTUP_WAIT_NS)
    assert len(got) == 1 and got[0].sockets == []


def test_a_listener_added_later_is_its_own_trace() -> None:
    got: list[StartupRecord] = []
    startups = ProcessStartups(got.append)
    envoy_start(startups)
    startups.expire(10 * QUIET_NS)
    t = 30 * QUIET_NS
    startups.on_setup(setup(t, "REUSEPORT", 40, result=1))
    startups.on_setup(setup(t + 1, "BIND", 40, port=19200))
    startups.on_listen(listen(t + 2, 40))
    startups.on_setup(setup(t + 3, "WATCH", 40, port=19200, tid=W0, comm="wrk:worker_0"))
    startups.expire(t + 3 + QUIET_NS)
    assert len(got) == 2 and got[1].exec_ns is None
    root, sock = _builder().spans(got[1])
    assert root.name == "envoy.listeners.setup" and sock.attributes["server.port"] == 19200


def test_sockets_handed_over_at_a_hot_restart_are_received_not_bound() -> None:
    """What Envoy 1.40's next epoch did under strace: each listening socket arrives over the hot-restart
    unix socket (SCM_RIGHTS, not traced), gets SO_REUSEPORT, listen(), and one worker's registration (the
    kernel follows a socket it sees listened on without a bind: its address unknown). The admin socket is
    bound anew. The trace says which sockets were received and takes their address from /proc."""
    got: list[StartupRecord] = []
    startups = ProcessStartups(got.append)
    startups.on_process(process(0, "EV_EXEC"))
    startups.on_setup(setup(60 * MS, "BIND", 22, port=19000))  # the admin API
    for fd in (23, 24):
        startups.on_setup(setup(61 * MS, "REUSEPORT", fd, result=1))  # no address: never bound here
    for fd in (22, 23, 24):
        startups.on_listen(listen(62 * MS, fd))
    startups.on_setup(setup(63 * MS, "WATCH", 22, other=10, port=19000))
    startups.on_setup(setup(64 * MS, "WATCH", 23, other=14, tid=W0, comm="wrk:worker_0"))
    startups.on_setup(setup(64 * MS, "WATCH", 24, other=18, tid=W1, comm="wrk:worker_1"))
    startups.expire(64 * MS + QUIET_NS)
    [rec] = got
    by_fd = {s.fd: s for s in rec.sockets}
    assert not by_fd[22].received and by_fd[23].received and by_fd[24].received
    assert by_fd[23].bind_ns is None and by_fd[23].address == ""
    assert rec.workers == {(MAIN, "envoy"), (W0, "wrk:worker_0"), (W1, "wrk:worker_1")}
    table = {(PID, fd): ListenSocket("127.0.0.1", 19100, None) for fd in (23, 24)}
    builder = StartupSpanBuilder(ConnectionSpanBuilder(Resource.create({}), MonotonicClock(0)),
                                 lambda a, p: "plain" if p == 19100 else None,
                                 lambda pid, fd: table.get((pid, fd)))
    root, *sockets = builder.spans(rec)
    assert root.attributes["envoy.startup.received_sockets"] == 2
    assert root.attributes["envoy.startup.workers"] == 2
    received = [s for s in sockets if s.attributes.get("envoy.listen_socket.received")]
    assert len(received) == 2 and len(sockets) == 3
    for s in received:
        assert s.attributes["server.address"] == "127.0.0.1" and s.attributes["server.port"] == 19100
        assert s.attributes["envoy.listener.name"] == "plain"
        assert [e[1] for e in s.events] == ["setsockopt SO_REUSEPORT", "listen", "epoll registration"]
    # without the address from /proc, nothing tells a received TCP listener from a unix one: left out
    root, *sockets = _builder().spans(rec)
    assert [s.attributes["server.port"] for s in sockets] == [19000]
    assert "envoy.startup.received_sockets" not in root.attributes


def test_a_listen_on_an_unknown_socket_of_a_process_found_running_is_not_called_received() -> None:
    got: list[StartupRecord] = []
    startups = ProcessStartups(got.append)
    startups.on_listen(listen(10 * MS, 23))  # the daemon came after this process's exec
    startups.flush(0)
    assert got == []

"""Adoption of connections open before the daemon (envoy/adoption.py), on real sockets of this process:
a listener, a client connected to it and the accepted side, as Envoy would hold them."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager

from otel_envoy.envoy.adoption import adopt_open_connections, open_downstream_connections
from otel_envoy.envoy.listen_socket import ListenSocket
from otel_envoy.envoy.process import established_sockets_from_proc
from otel_envoy.envoy.sockdiag import established_tcp_sockets
from otel_envoy.events.recording_context import AdoptedContext
from otel_envoy.sampling import peer_hash
from tests.support.sockets import listening_socket

PID = os.getpid()


@contextmanager
def served() -> Iterator[tuple[socket.socket, socket.socket, socket.socket]]:
    """(listener, client, accepted) on 127.0.0.1."""
    with listening_socket() as listener:
        client = socket.create_connection(listener.getsockname())
        accepted, _ = listener.accept()
        try:
            yield listener, client, accepted
        finally:
            client.close()
            accepted.close()


def _listeners(listener: socket.socket) -> dict[tuple[int, int], ListenSocket]:
    return {(PID, listener.fileno()): ListenSocket("127.0.0.1", listener.getsockname()[1])}


def test_sock_diag_lists_established_sockets_with_their_peers() -> None:
    with served() as (listener, client, accepted):
        found = {s.inode: s for s in established_tcp_sockets(PID)}
        ours = found[os.fstat(accepted.fileno()).st_ino]
        assert (ours.local_port, ours.peer_port) == (listener.getsockname()[1], client.getsockname()[1])
        assert ours.peer_address == "127.0.0.1" and ours.peer_raw == bytes([127, 0, 0, 1])
        assert os.fstat(client.fileno()).st_ino in found  # the client's side too (its port is no listener)


def test_only_the_accepted_side_is_a_downstream_connection() -> None:
    with served() as (listener, client, accepted):
        found = open_downstream_connections(PID, _listeners(listener))
        assert [(c.fd, c.listen_fd) for c in found] == [(accepted.fileno(), listener.fileno())]
        assert found[0].socket.peer_port == client.getsockname()[1]
        assert found[0].still_held()
    assert not found[0].still_held()  # closed since


def test_a_process_without_listeners_has_nothing_to_adopt() -> None:
    with served():
        assert open_downstream_connections(PID, {}) == []


def test_adoption_follows_the_sampler_the_room_and_the_kernel() -> None:
    with served() as (listener, client, accepted):
        handed: list[tuple[int, int, int, int]] = []

        def adopt(tgid: int, fd: int, listen_fd: int, ts_ns: int) -> bool:
            handed.append((tgid, fd, listen_fd, ts_ns))
            return True

        def run(adopt=adopt, sampled=lambda s: True, room=10):
            return adopt_open_connections([PID], _listeners(listener), adopt, lambda t, f: None,
                                          sampled=sampled, room=room)

        ts_ns, conns, counts = run()
        assert counts["adopted"] == 1 and [(t, f, lf) for t, f, lf, _ in handed] == [
            (PID, accepted.fileno(), listener.fileno())]
        (conn,) = AdoptedContext.of(ts_ns, conns).connections
        assert (conn.peer_port, conn.local_port) == (client.getsockname()[1], listener.getsockname()[1])
        assert ts_ns == handed[0][3]
        assert run(sampled=lambda s: False)[2] == {"not_sampled": 1, "adopted": 0}
        assert run(room=0)[2] == {"no_room": 1, "adopted": 0}
        assert run(adopt=lambda *a: False)[2] == {"already_tracked": 1, "adopted": 0}


def test_a_vanished_process_is_one_count_not_an_error() -> None:
    with served() as (listener, _client, _accepted):
        dead = 2**22 + 12345  # above pid_max's default: no such process
        sockets = {(dead, listener.fileno()): ListenSocket("127.0.0.1", listener.getsockname()[1])}
        _, conns, counts = adopt_open_connections([dead], sockets, lambda *a: True, lambda t, f: None,
                                                  sampled=lambda s: True, room=10)
    assert conns == [] and counts["unreadable"] == 1


def test_the_peer_hash_samples_about_the_ratio() -> None:
    hashes = [peer_hash(bytes([10, 0, i // 250, i % 250]), socket.AF_INET, 40000 + i) for i in range(20000)]
    below = sum(h < (1 << 32) // 10 for h in hashes)
    assert 1700 < below < 2300  # 10 % of 20 000, loosely
    assert all(0 <= h < 1 << 32 for h in hashes)


def test_proc_gives_the_same_established_sockets_as_sock_diag() -> None:
    """The fallback where sock_diag cannot enter a namespace: /proc/<pid>/net/tcp{,6}, read the same way."""
    with served() as (_listener, _client, accepted), listening_socket(socket.AF_INET6, "::1") as v6:
        c6 = socket.create_connection(v6.getsockname()[:2])
        a6, _ = v6.accept()
        try:
            ours = {os.fstat(s.fileno()).st_ino for s in (accepted, a6)}
            diag = {s.inode: s for s in established_tcp_sockets(PID) if s.inode in ours}
            proc = {s.inode: s for s in established_sockets_from_proc(PID) if s.inode in ours}
            assert len(diag) == 2 and proc == diag
            assert peer_hash(proc[os.fstat(a6.fileno()).st_ino].peer_raw, socket.AF_INET6, 1) == peer_hash(
                socket.inet_pton(socket.AF_INET6, "::1"), socket.AF_INET6, 1)
        finally:
            c6.close()
            a6.close()

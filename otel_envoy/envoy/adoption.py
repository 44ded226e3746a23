"""Connections a traced Envoy already had open when the daemon started: found in the kernel's socket table.

The daemon sees a connection from its accept on. One accepted before it started is found here instead:
the ESTABLISHED TCP sockets of the process's network namespace (sock_diag, inside the namespace), kept
when the process holds one under an fd and its local port is one of the process's listeners (a downstream
connection; Envoy's own upstream connections are left out). The daemon hands each to the kernel
(``ConnectionProbes.adopt_connection``) and to the correlator, which marks its span
``envoy.connection.adopted=true`` and starts it at the adoption, not at a start it never saw.

Which worker accepted it is not in the socket table: with one listening socket per worker
(``SO_REUSEPORT``) the lowest fd of the listener's port stands for all of them.

An adopted connection holds a kernel table entry for the rest of its life, and the daemon cannot tell a TLS
one from a plaintext one before it sees its bytes: adopted connections are sampled whole (the caller's
``sampled``: the daemon's is the hash of their peer the kernel uses for TLS connections,
``sampling.peer_hash``); with ``always_on`` every open connection is adopted. At most half of the kernel's
connection table is given to them.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from .listen_socket import ListenSocket
from .process import established_sockets_from_proc, socket_inode, socket_inodes
from .sockdiag import SockDiagError, TcpSocket, established_tcp_sockets

__all__ = ["OpenConnection", "adopt_open_connections", "open_downstream_connections"]

log = logging.getLogger(__name__)

#: Hands a connection (tgid, fd, listening fd, adoption time) to the kernel; False when it tracks it already.
Adopt = Callable[[int, int, int, int], bool]
#: Takes it back (tgid, fd): it closed before it was handed over.
Forget = Callable[[int, int], None]

WILDCARDS = ("0.0.0.0", "::")


@dataclass(frozen=True, slots=True)
class OpenConnection:
    """A downstream connection of process ``tgid`` under ``fd``, accepted before the daemon started."""

    tgid: int
    fd: int
    listen_fd: int  # the listening socket of its port (the lowest fd when workers have one each)
    socket: TcpSocket

    def still_held(self) -> bool:
        """Whether the process still holds the same socket under ``fd`` (it may have closed it since)."""
        return socket_inode(f"/proc/{self.tgid}/fd/{self.fd}") == self.socket.inode


def open_downstream_connections(pid: int, listen_sockets: Mapping[tuple[int, int], ListenSocket],
                                ) -> list[OpenConnection]:
    """The open downstream connections of ``pid``, by fd, given its listening sockets ((pid, fd) ->
    socket). The socket table is sock_diag's, else /proc's; ProcessLookupError when the process is gone."""
    listeners = sorted((fd, s) for (p, fd), s in listen_sockets.items() if p == pid)
    if not listeners:
        return []
    by_port: dict[int, list[tuple[int, str]]] = {}
    for fd, s in listeners:
        by_port.setdefault(s.port, []).append((fd, s.address))
    try:
        established = established_tcp_sockets(pid)
    except SockDiagError:  # not in that namespace (no setns without CAP_SYS_ADMIN): /proc shows it
        established = established_sockets_from_proc(pid)
    candidates = [s for s in established if s.local_port in by_port]
    if not candidates:
        return []
    held = socket_inodes(pid)
    out: list[OpenConnection] = []
    for sock in candidates:
        fds = held.get(sock.inode)
        if not fds:
            continue  # another process's (or a connection not accepted yet)
        listen_fd = next((fd for fd, address in by_port[sock.local_port]
                          if address == sock.local_address or address in WILDCARDS), None)
        if listen_fd is not None:
            out.append(OpenConnection(pid, min(fds), listen_fd, sock))
    return sorted(out, key=lambda c: c.fd)


def adopt_open_connections(pids: Iterable[int], listen_sockets: Mapping[tuple[int, int], ListenSocket],
                           adopt: Adopt, forget: Forget, *, sampled: Callable[[TcpSocket], bool], room: int,
                           ) -> tuple[int, list[OpenConnection], Counter[str]]:
    """Hand the open downstream connections of ``pids`` to the kernel (``adopt``): those ``sampled`` keeps,
    ``room`` at most. Returns the time of the hand-over (monotonic ns), the connections handed over and the
    counts (adopted, not_sampled, already_tracked, closed_meanwhile, no_room, unreadable), each process's
    failure logged in one line."""
    ts_ns = time.monotonic_ns()
    counts: Counter[str] = Counter()
    adopted: list[OpenConnection] = []
    for pid in pids:
        try:
            found = open_downstream_connections(pid, listen_sockets)
        except (SockDiagError, ProcessLookupError) as exc:  # no sock_diag, or the process is gone
            log.warning("pid %d: its open connections are not adopted: %s", pid, exc)
            counts["unreadable"] += 1
            continue
        for conn in found:
            if not sampled(conn.socket):
                counts["not_sampled"] += 1
            elif len(adopted) >= room:
                counts["no_room"] += 1
            elif not adopt(conn.tgid, conn.fd, conn.listen_fd, ts_ns):
                counts["already_tracked"] += 1
            elif not conn.still_held():  # closed between the scan and the hand-over
                forget(conn.tgid, conn.fd)
                counts["closed_meanwhile"] += 1
            else:
                adopted.append(conn)
    counts["adopted"] = len(adopted)
    return ts_ns, adopted, counts

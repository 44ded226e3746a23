"""Listening and established TCP sockets of a network namespace, from the kernel's sock_diag netlink
interface.

``/proc/<pid>/net/tcp`` lists every TCP socket of the namespace (on a busy proxy, tens of thousands of
connections and TIME_WAIT entries) and the reader parses them all to find a handful of listeners. A
sock_diag dump asks the kernel for LISTEN sockets only (the state filter is applied in the kernel), which is
what ``ss -lt`` does. The namespace is the target's: the netlink socket is opened inside it (``setns`` on a
short-lived thread, so the daemon's own threads never change namespace: :mod:`.netns`).

Layouts: ``linux/netlink.h`` (nlmsghdr), ``linux/sock_diag.h`` and ``linux/inet_diag.h`` (inet_diag_req_v2,
inet_diag_msg): stable user-space ABI.
"""

from __future__ import annotations

import os
import socket
import struct
from dataclasses import dataclass

from .netns import socket_in_netns

__all__ = ["SockDiagError", "TcpSocket", "established_tcp_sockets", "listening_tcp_sockets"]

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
TCP_ESTABLISHED, TCP_LISTEN = 1, 10

_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
# inet_diag_req_v2: family, protocol, ext, pad, states; inet_diag_sockid: sport, dport (network order),
# src[4], dst[4] (network order), if, cookie[2]
_REQ = struct.Struct("=BBBBI2s2s16s16sI8s")
# inet_diag_msg: family, state, timer, retrans, sockid (as above), expires, rqueue, wqueue, uid, inode
_MSG = struct.Struct("=BBBB2s2s16s16sI8sIIIII")


class SockDiagError(OSError):
    """sock_diag is not usable here (no netlink, no permission to enter the namespace)."""


@dataclass(frozen=True, slots=True)
class TcpSocket:
    """One TCP socket as sock_diag reports it. ``peer_raw``: the peer address's bytes as the kernel's
    sockaddr holds them (4 for IPv4, 16 for IPv6), for hashes that must match the BPF programs'."""

    family: int
    local_address: str
    local_port: int
    peer_address: str
    peer_port: int
    peer_raw: bytes
    inode: int


def _open_in_netns(pid: int) -> socket.socket:
    """A sock_diag netlink socket in the network namespace of ``pid``; ProcessLookupError when it is gone."""
    try:
        return socket_in_netns(pid, socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG)
    except ProcessLookupError:
        raise
    except OSError as exc:
        raise SockDiagError(f"cannot open sock_diag in the network namespace of {pid}: {exc}") from exc


def _address(family: int, raw: bytes) -> str:
    """Text form, as /proc-based code gave it: IPv4-mapped IPv6 addresses as plain IPv4."""
    if family == socket.AF_INET:
        return socket.inet_ntop(socket.AF_INET, raw[:4])
    text = socket.inet_ntop(socket.AF_INET6, raw)
    return text.removeprefix("::ffff:") if text.startswith("::ffff:") and "." in text else text


def _dump(sock: socket.socket, family: int, state: int) -> list[TcpSocket]:
    """The TCP sockets of one address family in ``state`` (the kernel filters by it)."""
    req = _REQ.pack(family, socket.IPPROTO_TCP, 0, 0, 1 << state, b"", b"", b"", b"", 0, b"")
    sock.send(_NLMSGHDR.pack(_NLMSGHDR.size + len(req), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, 1, 0)
              + req)
    out: list[TcpSocket] = []
    while True:
        data = sock.recv(1 << 16)
        if not data:
            return out
        off = 0
        while off + _NLMSGHDR.size <= len(data):
            length, kind, _flags, _seq, _pid = _NLMSGHDR.unpack_from(data, off)
            if length < _NLMSGHDR.size:
                raise SockDiagError("sock_diag: malformed reply")
            if kind == NLMSG_DONE:
                return out
            if kind == NLMSG_ERROR:
                (err,) = struct.unpack_from("=i", data, off + _NLMSGHDR.size)
                raise SockDiagError(-err, f"sock_diag: {os.strerror(-err)}")
            if kind == SOCK_DIAG_BY_FAMILY:
                fam, got, _t, _r, sport, dport, src, dst, _if, _cookie, _e, _rq, _wq, _uid, inode = \
                    _MSG.unpack_from(data, off + _NLMSGHDR.size)
                if got == state:
                    raw = dst[:4] if fam == socket.AF_INET else dst
                    out.append(TcpSocket(fam, _address(fam, src), int.from_bytes(sport, "big"),
                                         _address(fam, dst), int.from_bytes(dport, "big"), raw, inode))
            off += (length + 3) & ~3


def _sockets(pid: int, state: int) -> list[TcpSocket]:
    sock = _open_in_netns(pid)
    try:
        sock.settimeout(5.0)
        return _dump(sock, socket.AF_INET, state) + _dump(sock, socket.AF_INET6, state)
    except OSError as exc:
        raise SockDiagError(f"sock_diag: {exc}") from exc
    finally:
        sock.close()


def listening_tcp_sockets(pid: int) -> list[tuple[str, int, int]]:
    """(local address, port, socket inode) of every LISTEN TCP socket in the network namespace of ``pid``.

    Raises :class:`SockDiagError` when sock_diag cannot be used (the caller falls back to /proc),
    ProcessLookupError when ``pid`` is gone (its namespace with it).
    """
    return [(s.local_address, s.local_port, s.inode) for s in _sockets(pid, TCP_LISTEN)]


def established_tcp_sockets(pid: int) -> list[TcpSocket]:
    """Every ESTABLISHED TCP socket in the network namespace of ``pid`` (whoever holds it).

    Raises :class:`SockDiagError` when sock_diag cannot be used, ProcessLookupError when ``pid`` is gone.
    """
    return _sockets(pid, TCP_ESTABLISHED)

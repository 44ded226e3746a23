"""Finding Envoy processes and their listening sockets through /proc (no root needed to read most)."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .listen_socket import ListenSocket
from .sockdiag import SockDiagError, TcpSocket, listening_tcp_sockets

__all__ = ["EnvoyProcess", "ListenerFinder", "TargetError", "established_sockets_from_proc", "find_by_comm",
           "find_by_exe", "is_envoy", "listening_sockets", "listening_sockets_from_proc", "resolve_targets",
           "socket_inode", "socket_inodes", "watch_exits"]

log = logging.getLogger("otel_envoy.process")

PROC = Path("/proc")
_TCP_LISTEN = "0A"
_TCP_ESTABLISHED = "01"


class TargetError(RuntimeError):
    """A --pid/--comm argument does not name a traceable Envoy (message is one line)."""


@dataclass(frozen=True, slots=True)
class EnvoyProcess:
    """A target process."""

    pid: int
    comm: str
    exe: str


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def is_envoy(pid: int) -> tuple[bool, str, str]:
    """(looks like Envoy, its comm, its executable); comm "" when the process is gone."""
    comm = _read(PROC / str(pid) / "comm").strip()
    try:
        exe = os.readlink(PROC / str(pid) / "exe")
    except OSError:
        exe = ""
    name = Path(exe.removesuffix(" (deleted)")).name
    return ("envoy" in comm.lower() or "envoy" in name.lower()), comm, exe


def find_by_comm(comm: str) -> list[int]:
    """Pids whose main-thread comm equals ``comm`` (the kernel truncates comm to 15 bytes)."""
    want = comm[:15]
    pids = []
    for entry in PROC.iterdir():
        if entry.name.isdigit() and _read(entry / "comm").strip() == want:
            pids.append(int(entry.name))
    return sorted(pids)


def find_by_exe(exe: str) -> list[int]:
    """Pids running the executable ``exe`` (the same file, whatever path started it)."""
    pids = []
    for entry in PROC.iterdir():
        if entry.name.isdigit():
            try:
                if os.path.samefile(entry / "exe", exe):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return sorted(pids)


def resolve_targets(pids: list[int], comm: str | None, *, require_envoy: bool = True,
                    follow: bool = False, exe: str | None = None) -> list[EnvoyProcess]:
    """Validate explicit pids and/or find processes by comm (or by ``exe``, the executable's path).
    Raises TargetError with a one-line reason. ``follow``: processes that start under ``comm`` later are
    traced too, so none running now is fine."""
    if exe is not None and not os.path.isfile(exe):
        raise TargetError(f"--exe {exe}: no such file")
    found: dict[int, EnvoyProcess] = {}
    for pid in pids:
        if not (PROC / str(pid)).is_dir():
            raise TargetError(f"pid {pid} does not exist")
        ok, pcomm, path = is_envoy(pid)
        if require_envoy and not ok:
            raise TargetError(f"pid {pid} is not an Envoy process (comm {pcomm!r}, exe {path or 'unknown'})")
        found[pid] = EnvoyProcess(pid, pcomm, path)
    if exe:
        for pid in find_by_exe(exe):
            if pid != os.getpid():
                ok, pcomm, path = is_envoy(pid)
                found.setdefault(pid, EnvoyProcess(pid, pcomm, path))
    elif comm:
        for pid in find_by_comm(comm):
            if pid != os.getpid():
                ok, pcomm, path = is_envoy(pid)
                found.setdefault(pid, EnvoyProcess(pid, pcomm, path))
        if not found and not follow:
            raise TargetError(f"no process with comm {comm!r} is running")
    if not found and not ((comm or exe) and follow):
        raise TargetError("no target: give --pid PID, --comm NAME or --exe PATH")
    return [found[p] for p in sorted(found)]


def watch_exits(loop: asyncio.AbstractEventLoop, pids: Iterable[int], on_all_exited: Callable[[], None]
                ) -> Callable[[], None]:
    """Call ``on_all_exited`` (on ``loop``) once every one of ``pids`` has exited; returns the function that
    stops watching. Each process is watched through a pidfd (readable when it exits), so a pid reused by
    another process later cannot keep the daemon attached to nothing. A pid already gone counts as exited."""
    live: dict[int, int] = {}  # pidfd -> pid
    for pid in pids:
        try:
            live[os.pidfd_open(pid)] = pid
        except ProcessLookupError:
            continue

    def close() -> None:
        for fd in list(live):
            loop.remove_reader(fd)
            os.close(fd)
        live.clear()

    def exited(fd: int) -> None:
        loop.remove_reader(fd)
        os.close(fd)
        live.pop(fd, None)
        if not live:
            on_all_exited()

    if not live:
        loop.call_soon(on_all_exited)
    for fd in live:
        loop.add_reader(fd, exited, fd)
    return close


def socket_inode(fd_path: str | Path) -> int | None:
    """The socket inode an fd (``/proc/<pid>/fd/<n>``) refers to; None for other files and closed fds."""
    try:
        link = os.readlink(fd_path)
    except OSError:
        return None
    return int(link[8:-1]) if link.startswith("socket:[") else None


def socket_inodes(pid: int) -> dict[int, list[int]]:
    """inode -> fds for the socket fds of ``pid`` (a socket duplicated with dup() has several: Envoy gives
    each worker a copy of a listener's socket when it does not use SO_REUSEPORT). Raises
    ProcessLookupError when ``pid`` is gone."""
    out: dict[int, list[int]] = {}
    try:
        entries = list(os.scandir(PROC / str(pid) / "fd"))
    except (FileNotFoundError, ProcessLookupError) as exc:
        raise ProcessLookupError(errno.ESRCH, f"process {pid} is gone") from exc
    except OSError:
        return out
    for entry in entries:
        inode = socket_inode(entry.path)
        if inode is not None:
            out.setdefault(inode, []).append(int(entry.name))
    return out


def _addr_bytes(hex_addr: str) -> bytes:
    """An address of /proc/net/tcp{,6} in network byte order: the kernel prints it as host-order 32-bit
    words (one for IPv4, four for IPv6)."""
    raw = bytes.fromhex(hex_addr)
    return b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))


def _parse_addr(hex_addr: str, v6: bool) -> str:
    text = socket.inet_ntop(socket.AF_INET6 if v6 else socket.AF_INET, _addr_bytes(hex_addr))
    return text.removeprefix("::ffff:") if text.startswith("::ffff:") and "." in text else text


def _proc_tcp_rows(pid: int, state: str) -> Iterator[tuple[bool, list[str]]]:
    """(IPv6, the row's fields) of each TCP socket in ``state`` (its hex code) of the network namespace of
    ``pid``, from /proc/<pid>/net/tcp and tcp6 (every socket of the namespace is parsed)."""
    for name, v6 in (("tcp", False), ("tcp6", True)):
        for line in _read(PROC / str(pid) / "net" / name).splitlines()[1:]:
            parts = line.split()
            if len(parts) >= 10 and parts[3] == state:
                yield v6, parts


def listening_sockets_from_proc(pid: int) -> dict[tuple[int, int], ListenSocket]:
    """(pid, fd) -> ListenSocket for every TCP socket of ``pid`` in LISTEN state, the /proc way. For where
    sock_diag cannot be used. Raises ProcessLookupError when ``pid`` is gone."""
    inodes = socket_inodes(pid)
    out: dict[tuple[int, int], ListenSocket] = {}
    for v6, parts in _proc_tcp_rows(pid, _TCP_LISTEN):
        addr_hex, port_hex = parts[1].split(":")
        for fd in inodes.get(int(parts[9]), ()):
            out[(pid, fd)] = ListenSocket(_parse_addr(addr_hex, v6), int(port_hex, 16))
    return out


def established_sockets_from_proc(pid: int) -> list[TcpSocket]:
    """Every ESTABLISHED TCP socket of the network namespace of ``pid``, the /proc way (the namespace the
    process sees, readable without entering it). For where sock_diag cannot be used in that namespace (no
    CAP_SYS_ADMIN for setns)."""
    out: list[TcpSocket] = []
    for v6, parts in _proc_tcp_rows(pid, _TCP_ESTABLISHED):
        (local_hex, local_port), (peer_hex, peer_port) = (x.split(":") for x in parts[1:3])
        out.append(TcpSocket(socket.AF_INET6 if v6 else socket.AF_INET, _parse_addr(local_hex, v6),
                             int(local_port, 16), _parse_addr(peer_hex, v6), int(peer_port, 16),
                             _addr_bytes(peer_hex), int(parts[9])))
    return out


class ListenerFinder:
    """Finds the listening TCP sockets of target processes, cheaply enough to do every few seconds.

    The namespace's LISTEN sockets come from sock_diag (the kernel filters by state; see
    :mod:`.sockdiag`); which of them the target holds, and under which fd, needs a walk of its fds, done
    again only when the namespace's set of listeners changed, or :meth:`refresh` says the process may hold
    new ones: otherwise each known listener fd is checked with one readlink. A busy proxy holds tens of
    thousands of connection fds; /proc/<pid>/net/tcp lists every connection and TIME_WAIT socket. Falls
    back to /proc where sock_diag cannot be used.

    A process can come to hold a socket that already listened, without the namespace's set changing: an
    Envoy hot restart hands the old process's listening sockets to the new one over a unix socket
    (SCM_RIGHTS). Hence :meth:`refresh` (the daemon calls it when a process starts and when it calls
    ``listen()``, which Envoy does on every socket it was handed), and a walk at least every
    :data:`WALK_EVERY_S` for anything else that passes fds around.

    A process that exits while it is looked at (its namespace gone with it) has no listeners: one log line
    says so, and the caller goes on.
    """

    #: A process's fds are walked again at least this often, whatever the namespace's listeners did.
    WALK_EVERY_S = 60.0

    def __init__(self) -> None:
        # pid -> (inodes, inode -> fds, time of the walk)
        self._seen: dict[int, tuple[frozenset[int], dict[int, list[int]], float]] = {}
        self._gone: set[int] = set()  # pids whose exit was logged

    def sockets(self, pid: int) -> dict[tuple[int, int], ListenSocket]:
        """(pid, fd) -> ListenSocket for every TCP socket of ``pid`` in LISTEN state; none when ``pid`` is
        gone (logged once)."""
        try:
            return self._sockets(pid)
        except ProcessLookupError as exc:
            self._seen.pop(pid, None)
            if pid not in self._gone:
                if len(self._gone) >= 4096:
                    self._gone.clear()
                self._gone.add(pid)
                log.warning("pid %d exited while its listening sockets were read (%s): none for it", pid,
                            exc.strerror or exc)
            return {}

    def _sockets(self, pid: int) -> dict[tuple[int, int], ListenSocket]:
        try:
            listeners = listening_tcp_sockets(pid)
        except SockDiagError:
            return listening_sockets_from_proc(pid)
        by_inode = {inode: ListenSocket(addr, port) for addr, port, inode in listeners}
        inodes = frozenset(by_inode)
        seen = self._seen.get(pid)
        now = time.monotonic()
        fds: dict[int, list[int]] | None = None
        walked = now
        if seen is not None and seen[0] == inodes and now - seen[2] < self.WALK_EVERY_S:
            fds, walked = seen[1], seen[2]
            if any(socket_inode(PROC / str(pid) / "fd" / str(fd)) != inode
                   for inode, copies in fds.items() for fd in copies):
                fds, walked = None, now  # an fd was closed or reused: walk again
        if fds is None:
            held = socket_inodes(pid)
            fds = {inode: held[inode] for inode in inodes if inode in held}
        self._seen[pid] = (inodes, fds, walked)
        return {(pid, fd): by_inode[inode] for inode, copies in fds.items() for fd in copies}

    def refresh(self, pid: int) -> None:
        """``pid`` may hold listening sockets it did not hold at the last look (it started, or called
        ``listen()``): its fds are walked at the next :meth:`sockets`."""
        self._seen.pop(pid, None)

    def forget(self, pid: int) -> None:
        """``pid`` is not traced any more (it exited)."""
        self._seen.pop(pid, None)
        self._gone.discard(pid)


def listening_sockets(pid: int) -> dict[tuple[int, int], ListenSocket]:
    """(pid, fd) -> ListenSocket for every TCP socket of ``pid`` in LISTEN state (no caching)."""
    return ListenerFinder().sockets(pid)


def thread_names(pid: int) -> dict[int, str]:
    """tid -> comm of every thread of ``pid``."""
    out: dict[int, str] = {}
    try:
        tids = os.listdir(PROC / str(pid) / "task")
    except OSError:
        return out
    for tid in tids:
        out[int(tid)] = _read(PROC / str(pid) / "task" / tid / "comm").strip()
    return out

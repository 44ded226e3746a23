"""How a traced process sets up the sockets it listens on: one :class:`StartupRecord` per Envoy start
(from its exec, when the daemon was there first) or per later burst of listener changes.

Envoy's main thread makes each listener's sockets: with ``SO_REUSEPORT`` (the default on Linux) one socket
per worker, each bound to the same address; without it one socket, duplicated once per worker. It then
calls ``listen()`` on each, and every worker registers its own socket with its event loop (epoll_ctl ADD):
from then on that worker accepts that socket's connections. The kernel reports each step
(``bpf/startup.bpf.h``: bind, SO_REUSEPORT, dup, epoll registration, close; ``listen`` is EV_LISTEN); this
module puts the steps of each socket together and hands a record on once the process has been quiet for
:data:`QUIET_NS` (or at its exit, or the end of the run).
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from dataclasses import dataclass, field

from ..events.layout import load_layout
from ..events.types import ListenEvent, ProcessEvent, SocketSetupEvent
from .addresses import format_ip
from .identity import thread_name

__all__ = ["QUIET_NS", "STARTUP_WAIT_NS", "ProcessStartups", "SocketSetup", "StartupRecord", "Watch"]

_C = load_layout().constants
SETUP_BIND, SETUP_REUSEPORT, SETUP_DUP, SETUP_WATCH, SETUP_CLOSE = (
    _C["SETUP_BIND"], _C["SETUP_REUSEPORT"], _C["SETUP_DUP"], _C["SETUP_WATCH"], _C["SETUP_CLOSE"])
EV_EXEC, EV_EXIT = _C["EV_EXEC"], _C["EV_EXIT"]

#: A process's setup is complete when nothing of it happened for this long (Envoy's workers register their
#: sockets milliseconds after the main thread listens).
QUIET_NS = 1_000_000_000
#: A start whose workers have not registered a socket yet waits this long after its exec (a large
#: configuration, or a slow first cluster) before it is handed on as it is.
STARTUP_WAIT_NS = 30_000_000_000
_MAX_SOCKETS = 4096  # per record: a process binding without end is cut there (counted)


@dataclass(slots=True)
class Watch:
    """A thread registered the socket with its event loop: it accepts the socket's connections."""

    ts_ns: int
    tid: int
    thread_name: str
    epoll_fd: int


@dataclass(slots=True)
class SocketSetup:
    """One listening socket (or a copy of one) as its process set it up."""

    fd: int
    start_ns: int
    tid: int = 0
    thread_name: str = ""
    family: int = 0
    address: str = ""
    port: int = 0
    bind_ns: int | None = None
    bind_error: str = ""
    reuse_port: bool | None = None
    duplicate_of: int | None = None  # the fd this one copies
    listen_ns: int | None = None
    backlog: int | None = None
    watches: list[Watch] = field(default_factory=list)
    close_ns: int | None = None
    carried: bool = False  # set up before this record (its earlier steps are in an earlier one)
    #: listened on, never bound or copied by this process since its exec: handed over by another process
    #: (an Envoy hot restart: the parent epoch passes its listening sockets over a unix socket) or inherited
    received: bool = False

    @property
    def end_ns(self) -> int:
        """The last step seen."""
        times = [self.start_ns, self.bind_ns or 0, self.listen_ns or 0, self.close_ns or 0,
                 *(w.ts_ns for w in self.watches)]
        return max(times)


@dataclass(slots=True)
class StartupRecord:
    """A process's socket setup: from its exec (``exec_ns``; None when the daemon came later) to its last
    step."""

    tgid: int
    comm: str
    start_ns: int
    exec_ns: int | None = None
    last_ns: int = 0
    sockets: list[SocketSetup] = field(default_factory=list)
    exited_ns: int | None = None
    sockets_cut: int = 0

    @property
    def workers(self) -> set[tuple[int, str]]:
        """The threads that registered a listening socket: (tid, name)."""
        return {(w.tid, w.thread_name) for s in self.sockets for w in s.watches}


class ProcessStartups:
    """Collects socket-setup steps per process; ``on_record`` gets each finished :class:`StartupRecord`."""

    def __init__(self, on_record: Callable[[StartupRecord], None] | None, quiet_ns: int = QUIET_NS) -> None:
        self.on_record = on_record
        self.quiet_ns = quiet_ns
        self.pending: dict[int, StartupRecord] = {}  # by tgid
        self._by_fd: dict[tuple[int, int], SocketSetup] = {}  # (tgid, fd) -> its socket, while open
        self._comms: dict[int, str] = {}  # tgid -> its name (the exec's, or its main thread's)
        self._from_exec: set[int] = set()  # processes whose every step since their exec was seen

    # ------------------------------------------------------------------ events

    def on_process(self, ev: ProcessEvent) -> None:
        """EV_EXEC: a new process image begins a record; EV_EXIT: the process's record is complete."""
        if ev.kind == EV_EXEC:
            self._finish(ev.tgid)
            self._comms[ev.tgid] = comm = thread_name(ev.comm)
            self._from_exec.add(ev.tgid)
            self.pending[ev.tgid] = StartupRecord(ev.tgid, comm, ev.ts_ns, exec_ns=ev.ts_ns, last_ns=ev.ts_ns)
        elif ev.kind == EV_EXIT:
            rec = self.pending.get(ev.tgid)
            if rec is not None:
                rec.exited_ns = ev.ts_ns
                rec.last_ns = max(rec.last_ns, ev.ts_ns)
            self._finish(ev.tgid)
            self._comms.pop(ev.tgid, None)
            self._from_exec.discard(ev.tgid)
            for key in [k for k in self._by_fd if k[0] == ev.tgid]:
                del self._by_fd[key]

    def on_setup(self, ev: SocketSetupEvent) -> None:
        """A step of a socket's setup."""
        op, key = ev.op, (ev.tgid, ev.fd)
        if ev.tid == ev.tgid and ev.tgid not in self._comms:
            self._comms[ev.tgid] = thread_name(ev.comm)
        rec = self._record(ev.tgid, ev.ts_ns)
        sock = self._by_fd.get(key)
        if sock is not None:
            sock = self._carried(rec, sock, ev.ts_ns)
        if op == SETUP_REUSEPORT:  # before its bind, as Envoy does it
            if sock is None or sock.listen_ns is not None:
                sock = self._new_socket(rec, ev)
            sock.reuse_port = ev.result != 0
        elif op == SETUP_BIND:
            if sock is None or sock.bind_ns is not None or sock.listen_ns is not None:
                sock = self._new_socket(rec, ev)  # a new socket (the fd number of a closed one, maybe)
            sock.bind_ns = ev.ts_ns
            self._address(sock, ev)
            if ev.result < 0:
                sock.bind_error = errno.errorcode.get(-ev.result, str(-ev.result))
        elif op == SETUP_DUP:
            if ev.fd < 0:
                return  # the copy failed: nothing to follow
            original = self._by_fd.get((ev.tgid, ev.other_fd))
            sock = self._new_socket(rec, ev)
            sock.duplicate_of = ev.other_fd
            self._address(sock, ev)
            if original is not None:
                sock.reuse_port = original.reuse_port
        elif op == SETUP_WATCH:
            if sock is None:
                sock = self._new_socket(rec, ev)  # bound before the daemon came
                self._address(sock, ev)
            sock.watches.append(Watch(ev.ts_ns, ev.tid, thread_name(ev.comm), ev.other_fd))
        elif op == SETUP_CLOSE:
            if sock is None:
                return
            sock.close_ns = ev.ts_ns
            del self._by_fd[key]
        _include(rec, sock)
        rec.last_ns = max(rec.last_ns, ev.ts_ns)

    def on_listen(self, ev: ListenEvent) -> None:
        """listen(fd, backlog): a socket whose setup was seen starts listening. In a process traced since
        its exec, a socket it never bound nor copied was received (the kernel follows it from here on)."""
        sock = self._by_fd.get((ev.tgid, ev.fd))
        received = ev.tgid in self._from_exec and (
            sock is None or (sock.bind_ns is None and sock.duplicate_of is None and not sock.carried))
        if sock is None and not received:
            return  # set up before the daemon came
        rec = self._record(ev.tgid, ev.ts_ns)
        if sock is None:
            name = self._comms.get(ev.tgid, "") if ev.tid == ev.tgid else ""  # Envoy's main thread listens
            sock = self._by_fd[(ev.tgid, ev.fd)] = SocketSetup(ev.fd, ev.ts_ns, ev.tid, name)
            _include(rec, sock)
        else:
            sock = self._carried(rec, sock, ev.ts_ns)
        sock.received = sock.received or received
        sock.listen_ns = ev.ts_ns
        sock.backlog = ev.backlog
        rec.last_ns = max(rec.last_ns, ev.ts_ns)
        _include(rec, sock)

    def bound_address(self, tgid: int, fd: int) -> tuple[str, int] | None:
        """The address and port the kernel saw ``tgid`` bind its socket ``fd`` to (or the socket it
        copied), while that socket is open; None when not seen."""
        sock = self._by_fd.get((tgid, fd))
        if sock is None or not sock.address or sock.bind_error:
            return None
        return sock.address, sock.port

    # ------------------------------------------------------------------ time

    def expire(self, now_ns: int) -> None:
        """Hand on the records of processes quiet for ``quiet_ns`` (a start whose workers took no socket
        yet: :data:`STARTUP_WAIT_NS` after its exec)."""
        for tgid in [t for t, r in self.pending.items() if _complete(r, now_ns, self.quiet_ns)]:
            self._finish(tgid)

    def flush(self, _now_ns: int) -> None:
        """The end of the run: every record as it is."""
        for tgid in list(self.pending):
            self._finish(tgid)

    # ------------------------------------------------------------------ helpers

    def _record(self, tgid: int, ts_ns: int) -> StartupRecord:
        rec = self.pending.get(tgid)
        if rec is None:
            rec = self.pending[tgid] = StartupRecord(tgid, self._comms.get(tgid, ""), ts_ns, last_ns=ts_ns)
        return rec

    def _carried(self, rec: StartupRecord, sock: SocketSetup, ts_ns: int) -> SocketSetup:
        """``sock`` when it belongs to ``rec``; else (set up in a record handed on already) a socket of
        ``rec`` that is the same socket, its earlier steps left to the earlier record."""
        if any(s is sock for s in rec.sockets):
            return sock
        later = SocketSetup(sock.fd, ts_ns, sock.tid, sock.thread_name, sock.family, sock.address, sock.port,
                            reuse_port=sock.reuse_port, duplicate_of=sock.duplicate_of, backlog=sock.backlog,
                            carried=True)
        self._by_fd[(rec.tgid, sock.fd)] = later
        _include(rec, later)
        return later

    def _new_socket(self, rec: StartupRecord, ev: SocketSetupEvent) -> SocketSetup:
        sock = SocketSetup(ev.fd, ev.ts_ns, ev.tid, thread_name(ev.comm))
        self._by_fd[(ev.tgid, ev.fd)] = sock
        _include(rec, sock)
        return sock

    @staticmethod
    def _address(sock: SocketSetup, ev: SocketSetupEvent) -> None:
        if ev.family:
            sock.family, sock.port = ev.family, ev.port
            sock.address = format_ip(ev.family, ev.addr)

    def _finish(self, tgid: int) -> None:
        rec = self.pending.pop(tgid, None)
        if rec is None or (not rec.sockets and rec.exec_ns is None):
            return
        if not rec.comm:
            rec.comm = self._comms.get(tgid) or _comm_of(tgid)
        if self.on_record is not None:
            self.on_record(rec)


def _complete(rec: StartupRecord, now_ns: int, quiet_ns: int) -> bool:
    if rec.last_ns + quiet_ns > now_ns:
        return False
    if rec.exec_ns is not None and not rec.workers:
        return rec.exec_ns + STARTUP_WAIT_NS <= now_ns
    return True


def _include(rec: StartupRecord, sock: SocketSetup) -> None:
    if all(s is not sock for s in rec.sockets):
        if len(rec.sockets) < _MAX_SOCKETS:
            rec.sockets.append(sock)
        else:
            rec.sockets_cut += 1


def _comm_of(tgid: int) -> str:
    try:
        with open(f"/proc/{tgid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""

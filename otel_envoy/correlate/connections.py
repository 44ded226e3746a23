"""The downstream connection correlator: typed kernel events in, finished ConnectionRecords out.

How events of one connection find each other:
  * syscall events (accept, reads, writes, epoll_ctl, setsockopt, close) carry (tgid, fd);
  * TCP events (state changes, retransmits, resets) fire in softirq context of other processes and carry
    only the 4-tuple, so connections are also indexed by (peer address, peer port, local port);
  * the TCP handshake completes (child socket SYN_RECV -> ESTABLISHED) *before* Envoy accepts: those wait
    in a per-port "accept queue" table until the accept with the same peer arrives.
A closed connection lingers for ``linger_ns`` (events of the close itself, like Envoy's FIN or a reset,
arrive right after the close syscall; CPUs may deliver slightly out of order) and is then emitted.
Everything is bounded: when a table is full the oldest entry is evicted and counted in ``drops``.
"""

from __future__ import annotations

from collections import Counter, OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass

from ..events.layout import load_layout
from ..events.types import (
    AcceptEvent,
    CloseEvent,
    DataEvent,
    EpollCtlEvent,
    Event,
    SetsockoptEvent,
    SockStateEvent,
    TcpEvent,
)
from ..protocols.tls import TlsHandshakeTracker
from .addresses import format_ip
from .model import ConnectionRecord, TcpMark

__all__ = ["ConnectionCorrelator", "ListenSocket"]

_C = load_layout().constants
EV_ACCEPT, EV_CLOSE, EV_DATA = _C["EV_ACCEPT"], _C["EV_CLOSE"], _C["EV_DATA"]
EV_EPOLL_CTL, EV_SETSOCKOPT, EV_SOCK_STATE, EV_TCP = (
    _C["EV_EPOLL_CTL"], _C["EV_SETSOCKOPT"], _C["EV_SOCK_STATE"], _C["EV_TCP"])
ROLE_DOWNSTREAM, DIR_READ, DATA_FLAG_PEEK = _C["ROLE_DOWNSTREAM"], _C["DIR_READ"], _C["DATA_FLAG_PEEK"]
TCP_ESTABLISHED, TCP_SYN_RECV, TCP_FIN_WAIT1 = _C["TCP_ESTABLISHED"], _C["TCP_SYN_RECV"], _C["TCP_FIN_WAIT1"]
TCP_CLOSE, TCP_CLOSE_WAIT = _C["TCP_CLOSE"], _C["TCP_CLOSE_WAIT"]
EPOLL_CTL_ADD, EPOLL_CTL_DEL = 1, 2
TCP_MARK_NAMES = {
    _C["TCP_RETRANSMIT"]: "tcp.retransmit",
    _C["TCP_RESET_SENT"]: "tcp.reset_sent",
    _C["TCP_RESET_RECEIVED"]: "tcp.reset_received",
    _C["TCP_SYNACK_RETRANSMIT"]: "tcp.synack_retransmit",
}

TupleKey = tuple[str, int, int]  # (peer address, peer port, local port)


@dataclass(frozen=True, slots=True)
class ListenSocket:
    """A listening socket of a target process, found in /proc or the admin API."""

    address: str  # "0.0.0.0" / "::" for wildcards
    port: int
    listener_name: str | None = None


@dataclass(slots=True)
class _Queued:
    """A connection the kernel established that Envoy has not accepted yet."""

    established_ns: int
    local_address: str
    depth_on_arrival: int
    synack_retransmits: list[int]


class ConnectionCorrelator:
    """Builds ConnectionRecords; ``on_finished`` receives each one once, after it ended."""

    def __init__(
        self,
        on_finished: Callable[[ConnectionRecord], None],
        *,
        max_connections: int = 65536,
        max_queued: int = 65536,
        linger_ns: int = 50_000_000,
    ) -> None:
        self.on_finished = on_finished
        self.max_connections = max_connections
        self.max_queued = max_queued
        self.linger_ns = linger_ns
        self.listen_sockets: dict[tuple[int, int], ListenSocket] = {}  # (tgid, listen fd) -> socket
        self.listener_names: dict[tuple[str, int], str] = {}  # (address, port) -> Envoy listener name
        self.open: dict[tuple[int, int], ConnectionRecord] = {}  # (tgid, fd) -> connection
        self.by_tuple: dict[TupleKey, ConnectionRecord] = {}
        self.queued: dict[int, OrderedDict[tuple[str, int], _Queued]] = {}  # local port -> accept queue
        self.early_synack: OrderedDict[TupleKey, list[int]] = OrderedDict()
        self.closing: deque[ConnectionRecord] = deque()
        self.latest_ns = 0
        self.drops: Counter[str] = Counter()
        self.stats: Counter[str] = Counter()
        self._dispatch: dict[int, Callable[[Event], None]] = {
            EV_ACCEPT: self._on_accept,  # type: ignore[dict-item]
            EV_CLOSE: self._on_close,  # type: ignore[dict-item]
            EV_DATA: self._on_data,  # type: ignore[dict-item]
            EV_EPOLL_CTL: self._on_epoll_ctl,  # type: ignore[dict-item]
            EV_SETSOCKOPT: self._on_setsockopt,  # type: ignore[dict-item]
            EV_SOCK_STATE: self._on_sock_state,  # type: ignore[dict-item]
            EV_TCP: self._on_tcp,  # type: ignore[dict-item]
        }

    # ------------------------------------------------------------------ context from user space

    def set_listen_sockets(self, sockets: dict[tuple[int, int], ListenSocket]) -> None:
        """Replace the (tgid, listen fd) -> listening socket table (from /proc)."""
        self.listen_sockets = dict(sockets)

    def set_listener_names(self, names: dict[tuple[str, int], str]) -> None:
        """Replace the (address, port) -> Envoy listener name table (from the admin API)."""
        self.listener_names = dict(names)

    # ------------------------------------------------------------------ events

    def handle(self, event: Event) -> None:
        """Apply one event. Never raises for odd input; unknown situations are counted."""
        if event.ts_ns > self.latest_ns:
            self.latest_ns = event.ts_ns
        handler = self._dispatch.get(event.kind)
        if handler is not None:
            handler(event)
        if self.closing and self.closing[0].close_ns + self.linger_ns <= self.latest_ns:  # type: ignore[operator]
            self.expire(self.latest_ns)

    def expire(self, now_ns: int) -> None:
        """Emit connections that closed more than ``linger_ns`` before ``now_ns``."""
        while self.closing and self.closing[0].close_ns + self.linger_ns <= now_ns:  # type: ignore[operator]
            self._finish(self.closing.popleft())

    def flush(self, now_ns: int) -> None:
        """End everything: closed connections as they are, open ones at ``now_ns`` as still open."""
        while self.closing:
            self._finish(self.closing.popleft())
        for conn in list(self.open.values()):
            conn.still_open = True
            conn.close_ns = max(now_ns, conn.accept_ns)
            self._finish(conn)
        self.open.clear()

    # ------------------------------------------------------------------ handlers

    def _on_accept(self, ev: AcceptEvent) -> None:
        self.stats["accepts"] += 1
        key = (ev.tgid, ev.fd)
        stale = self.open.pop(key, None)
        if stale is not None:  # the close of the previous user of this fd was never seen
            stale.partial.append("close_not_seen")
            stale.close_ns = ev.ts_ns
            self.drops["fd_reused_without_close"] += 1
            self._finish(stale)
        if len(self.open) >= self.max_connections:
            _, victim = next(iter(self.open.items()))
            self.open.pop((victim.tgid, victim.fd))
            victim.partial.append("evicted")
            victim.still_open = True
            victim.close_ns = ev.ts_ns
            self.drops["connection_table_full"] += 1
            self._finish(victim)
        listen = self.listen_sockets.get((ev.tgid, ev.listen_fd))
        peer = format_ip(ev.family, ev.peer_addr) if ev.family else ""
        conn = ConnectionRecord(
            tgid=ev.tgid,
            fd=ev.fd,
            tid=ev.tid,
            thread_name=ev.comm.split(b"\0", 1)[0].decode(errors="replace"),
            listen_fd=ev.listen_fd,
            peer_address=peer,
            peer_port=ev.peer_port,
            local_port=listen.port if listen else 0,
            accept_ns=ev.ts_ns,
        )
        if listen is None:
            conn.partial.append("listener_unknown")
        elif listen.address not in ("0.0.0.0", "::"):
            conn.local_address = listen.address
        queue = self.queued.get(conn.local_port)
        tkey = (peer, ev.peer_port, conn.local_port)
        entry = queue.pop((peer, ev.peer_port), None) if queue is not None else None
        if entry is not None:
            conn.established_ns = entry.established_ns
            conn.local_address = entry.local_address
            conn.accept_queue_depth = len(queue) + 1  # type: ignore[arg-type]
            conn.accept_queue_depth_on_arrival = entry.depth_on_arrival
            conn.tcp_marks.extend(TcpMark(ts, "tcp.synack_retransmit") for ts in entry.synack_retransmits)
        else:
            early = self.early_synack.pop(tkey, None)
            if early:
                conn.tcp_marks.extend(TcpMark(ts, "tcp.synack_retransmit") for ts in early)
        if conn.local_address is not None:
            conn.listener_name = self._listener_name(conn.local_address, conn.local_port)
        elif listen is not None:
            conn.listener_name = listen.listener_name or self._listener_name(listen.address, listen.port)
        self.open[key] = conn
        self.by_tuple[tkey] = conn

    def _listener_name(self, address: str, port: int) -> str | None:
        names = self.listener_names
        return names.get((address, port)) or names.get(("0.0.0.0", port)) or names.get(("::", port))

    def _on_data(self, ev: DataEvent) -> None:
        if ev.role != ROLE_DOWNSTREAM:
            return
        conn = self.open.get((ev.tgid, ev.fd))
        if conn is None:
            return
        peek = ev.flags & DATA_FLAG_PEEK
        if ev.direction == DIR_READ:
            if ev.ret == 0:
                if conn.eof_ns is None:
                    conn.eof_ns = ev.ts_ns
                return
            if ev.ret < 0:
                return
            if peek:
                conn.peeks += 1
                conn.peeked_bytes = max(conn.peeked_bytes, ev.ret)
            else:
                self._settle_handoff(conn, ev.ts_ns)
            if conn.not_tls:
                return
            if conn.tls is None:
                if ev.data[:1] != b"\x16":  # not a TLS handshake record: plaintext connection
                    conn.not_tls = True
                    return
                conn.tls = TlsHandshakeTracker()
            conn.tls.on_client_data(ev.ts_ns, ev.data, ev.ret, peek=bool(peek))
        else:
            if ev.ret <= 0:
                return
            self._settle_handoff(conn, ev.ts_ns)
            if conn.tls is not None:
                conn.tls.on_server_data(ev.ts_ns, ev.data, ev.ret)

    @staticmethod
    def _settle_handoff(conn: ConnectionRecord, ts_ns: int) -> None:
        """First real I/O: if no DEL+ADD re-registration happened, the first ADD was the hand-off."""
        if conn.first_io_ns is None:
            conn.first_io_ns = ts_ns
            if conn.handoff_ns is None:
                conn.handoff_ns = conn.first_epoll_add_ns if conn.first_epoll_add_ns is not None else ts_ns

    def _on_epoll_ctl(self, ev: EpollCtlEvent) -> None:
        conn = self.open.get((ev.tgid, ev.fd))
        if conn is None or conn.handoff_ns is not None:
            return
        if ev.op == EPOLL_CTL_ADD:
            if conn.first_epoll_add_ns is None:
                conn.first_epoll_add_ns = ev.ts_ns
            else:  # a second ADD implies a DEL (the kernel side does not send DELs)
                conn.saw_epoll_del = True
                conn.handoff_ns = ev.ts_ns  # listener filters done, ConnectionImpl registered the fd
        elif ev.op == EPOLL_CTL_DEL and conn.first_epoll_add_ns is not None:
            conn.saw_epoll_del = True

    def _on_setsockopt(self, ev: SetsockoptEvent) -> None:
        conn = self.open.get((ev.tgid, ev.fd))
        if conn is not None and len(conn.socket_options) < 16:
            conn.socket_options.append((ev.level, ev.optname, ev.optval))

    def _on_close(self, ev: CloseEvent) -> None:
        if ev.role != ROLE_DOWNSTREAM:
            return
        conn = self.open.pop((ev.tgid, ev.fd), None)
        if conn is None:
            return
        conn.close_ns = ev.ts_ns
        conn.bytes_received = ev.bytes_rx
        conn.bytes_sent = ev.bytes_tx
        if conn.handoff_ns is None and conn.first_epoll_add_ns is not None and not conn.saw_epoll_del:
            conn.handoff_ns = conn.first_epoll_add_ns
        self.closing.append(conn)

    def _on_sock_state(self, ev: SockStateEvent) -> None:
        local = format_ip(ev.family, ev.saddr)
        peer = format_ip(ev.family, ev.daddr)
        tkey = (peer, ev.dport, ev.sport)
        new = ev.newstate
        if new == TCP_ESTABLISHED and ev.oldstate == TCP_SYN_RECV:
            conn = self.by_tuple.get(tkey)
            if conn is not None:  # already accepted: late (cross-CPU reordering) or a duplicate
                if conn.established_ns is None and conn.close_ns is None:
                    conn.established_ns = ev.ts_ns
                    conn.local_address = local
                return
            queue = self.queued.setdefault(ev.sport, OrderedDict())
            if (peer, ev.dport) in queue:  # a duplicate of a queued one: keep the first
                return
            if len(queue) >= self.max_queued:
                queue.popitem(last=False)
                self.drops["accept_queue_table_full"] += 1
            early = self.early_synack.pop(tkey, None) or []
            queue[(peer, ev.dport)] = _Queued(ev.ts_ns, local, len(queue) + 1, early)
            return
        if new == TCP_CLOSE and ev.oldstate == TCP_SYN_RECV:
            queue = self.queued.get(ev.sport)
            if queue is not None:
                queue.pop((peer, ev.dport), None)
            return
        conn = self.by_tuple.get(tkey)
        if conn is None:
            if new == TCP_CLOSE:  # an unaccepted connection died in the queue
                queue = self.queued.get(ev.sport)
                if queue is not None and queue.pop((peer, ev.dport), None) is not None:
                    self.stats["died_in_accept_queue"] += 1
            return
        if new == TCP_CLOSE_WAIT and conn.peer_fin_ns is None:
            conn.peer_fin_ns = ev.ts_ns
        elif new == TCP_FIN_WAIT1 and conn.envoy_fin_ns is None:
            conn.envoy_fin_ns = ev.ts_ns

    def _on_tcp(self, ev: TcpEvent) -> None:
        name = TCP_MARK_NAMES.get(ev.type)
        if name is None:
            return
        tkey = (format_ip(ev.family, ev.daddr), ev.dport, ev.sport)
        conn = self.by_tuple.get(tkey)
        if conn is not None:
            if len(conn.tcp_marks) < 64:
                conn.tcp_marks.append(TcpMark(ev.ts_ns, name, ev.state))
            return
        if name == "tcp.synack_retransmit":  # handshake not complete yet: keep until it is
            queue = self.queued.get(ev.sport)
            entry = queue.get((tkey[0], tkey[1])) if queue else None
            if entry is not None:
                entry.synack_retransmits.append(ev.ts_ns)
                return
            marks = self.early_synack.setdefault(tkey, [])
            if len(marks) < 16:
                marks.append(ev.ts_ns)
            while len(self.early_synack) > self.max_queued:
                self.early_synack.popitem(last=False)
                self.drops["synack_table_full"] += 1

    # ------------------------------------------------------------------ output

    def _finish(self, conn: ConnectionRecord) -> None:
        tkey = (conn.peer_address, conn.peer_port, conn.local_port)
        if self.by_tuple.get(tkey) is conn:
            del self.by_tuple[tkey]
        if conn.established_ns is None:
            conn.partial.append("established_not_seen")
        self.stats["connections"] += 1
        self.on_finished(conn)

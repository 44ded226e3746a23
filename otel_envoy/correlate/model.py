"""What the correlator knows about one connection when it ends. Times are kernel monotonic ns."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..protocols.tls import TlsHandshakeTracker

__all__ = ["ConnectionRecord", "TcpMark"]


@dataclass(slots=True)
class TcpMark:
    """A point event on a connection: retransmit, reset, SYN-ACK retransmit."""

    ts_ns: int
    name: str  # tcp.retransmit | tcp.reset_sent | tcp.reset_received | tcp.synack_retransmit
    state: int = 0


@dataclass(slots=True)
class ConnectionRecord:
    """One downstream connection of one Envoy process, from the kernel's point of view."""

    tgid: int
    fd: int
    tid: int
    thread_name: str
    listen_fd: int
    peer_address: str
    peer_port: int
    local_port: int
    accept_ns: int
    local_address: str | None = None
    listener_name: str | None = None
    established_ns: int | None = None
    accept_queue_depth: int | None = None  # established, not yet accepted, at accept time (incl. this one)
    accept_queue_depth_on_arrival: int | None = None  # the same count when this one joined the queue
    first_epoll_add_ns: int | None = None
    saw_epoll_del: bool = False
    handoff_ns: int | None = None  # listener filters done: the connection was handed to its filter chain
    peeked_bytes: int = 0
    peeks: int = 0
    first_io_ns: int | None = None
    peer_fin_ns: int | None = None  # CLOSE_WAIT: the peer's FIN arrived
    envoy_fin_ns: int | None = None  # FIN_WAIT1: Envoy closed first
    eof_ns: int | None = None  # a read returned 0
    close_ns: int | None = None
    bytes_received: int = 0
    bytes_sent: int = 0
    still_open: bool = False
    tcp_marks: list[TcpMark] = field(default_factory=list)
    socket_options: list[tuple[int, int, int]] = field(default_factory=list)  # (level, optname, value)
    tls: TlsHandshakeTracker | None = None
    not_tls: bool = False
    partial: list[str] = field(default_factory=list)  # what we know we missed

    @property
    def start_ns(self) -> int:
        """The connection's start: TCP handshake completion when seen, else accept."""
        return self.established_ns if self.established_ns is not None else self.accept_ns

    def close_initiator(self) -> str | None:
        """'peer' or 'envoy': who ended the connection first (FIN, EOF, or reset)."""
        peer = min((t for t in (self.peer_fin_ns, self.eof_ns, self._first("tcp.reset_received")) if t),
                   default=None)
        envoy = min((t for t in (self.envoy_fin_ns, self._first("tcp.reset_sent")) if t), default=None)
        if peer is not None and (envoy is None or peer <= envoy):
            return "peer"
        if envoy is not None or self.close_ns is not None:
            return "envoy"
        return None

    def aborted(self) -> str | None:
        """'peer' or 'envoy' when a reset ended the connection before any orderly FIN, else None.

        A reset after a FIN (Envoy closed, then the kernel answered the client's late close_notify with a
        RST; or a client closing with unread data) is an event on the span, not an abort.
        """
        fin = min((t for t in (self.peer_fin_ns, self.eof_ns, self.envoy_fin_ns) if t), default=None)
        for m in self.tcp_marks:
            if fin is None or m.ts_ns < fin:
                if m.name == "tcp.reset_received":
                    return "peer"
                if m.name == "tcp.reset_sent":
                    return "envoy"
        return None

    def _first(self, name: str) -> int | None:
        return next((m.ts_ns for m in self.tcp_marks if m.name == name), None)

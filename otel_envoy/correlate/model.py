"""What the correlator knows about connections and requests. Times are kernel monotonic ns.

Span ids are chosen when a record is created (lowercase hex, as SpanRecord carries them), so spans of
requests can be exported while their connection is still open and still name it as their parent.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..protocols.http import HttpMessage
from ..protocols.http1 import Http1Exchanges
from ..protocols.http2 import Http2Exchanges
from ..protocols.tls.handshake import TlsHandshakeTracker
from ..protocols.tracecontext import TraceContext, trace_context

__all__ = ["ConnectionRecord", "RequestRecord", "TcpMark", "TlsRecordCounts", "UpstreamRecord",
           "upstream_context"]

#: Span links from a connection to its requests that live in other traces, at most.
MAX_REQUEST_LINKS = 32


@dataclass(slots=True)
class TcpMark:
    """A point event on a connection: retransmit, reset, SYN-ACK retransmit."""

    ts_ns: int
    name: str  # tcp.retransmit | tcp.reset_sent | tcp.reset_received | tcp.synack_retransmit
    state: int = 0


@dataclass(frozen=True, slots=True)
class TlsRecordCounts:
    """TLS records of one connection, counted in the kernel by walking the record headers (the payload is
    ciphertext: this is what is left to see without symbols). ``*_lost``: the framing was lost (bytes that
    were not a record header, or a syscall with too many records); the counts stop there."""

    received: int
    sent: int
    application_data_received: int
    application_data_sent: int
    max_received: int  # largest record body, bytes
    max_sent: int
    received_lost: bool
    sent_lost: bool


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
    tls_records: TlsRecordCounts | None = None  # from the close: TLS connections only
    not_tls: bool = False
    partial: list[str] = field(default_factory=list)  # what we know we missed
    trace_id: str = ""  # this connection's own trace and root span (set by the correlator)
    span_id: str = ""
    http: Http1Exchanges | Http2Exchanges | None = None  # plaintext HTTP seen from the connection's start
    requests_pending: dict[int, RequestRecord] = field(default_factory=dict)  # id(request msg) -> record
    request_count: int = 0
    request_links: list[tuple[str, str]] = field(default_factory=list)  # requests in other traces
    upstream_requests: int = 0  # TLS: upstream requests attributed to this connection by event-loop round
    tls_ready_round: int = -1  # TLS: the event-loop round in which the handshake completed
    tls_demand: bool = False  # TLS: a read of a new request waits in the correlator's queue for its upstream
    tls_upstream_busy: int = 0  # TLS: upstream requests attributed to it that have not completed

    @property
    def start_ns(self) -> int:
        """The connection's start: TCP handshake completion when seen, else accept."""
        return self.established_ns if self.established_ns is not None else self.accept_ns

    def close_initiator(self) -> str | None:
        """'peer' or 'envoy': who ended the connection first (FIN, EOF, or reset)."""
        return _close_initiator(self)

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



@dataclass(slots=True)
class UpstreamRecord:
    """One connection a target opened (connect) to an upstream."""

    tgid: int
    fd: int
    tid: int
    thread_name: str
    peer_address: str
    peer_port: int
    connect_ns: int
    connect_ret: int
    trace_id: str
    span_id: str
    connect_span_id: str  # tcp.connect child
    sock: int = 0  # kernel socket address (ties TCP events to it)
    local_address: str | None = None
    local_port: int = 0
    syn_sent_ns: int | None = None
    established_ns: int | None = None
    peer_fin_ns: int | None = None
    envoy_fin_ns: int | None = None
    eof_ns: int | None = None
    close_ns: int | None = None
    failed_state_ns: int | None = None  # SYN_SENT -> CLOSE: the connect failed (refused, timed out)
    bytes_received: int = 0
    bytes_sent: int = 0
    still_open: bool = False
    tcp_marks: list[TcpMark] = field(default_factory=list)
    http: Http1Exchanges | Http2Exchanges | None = None
    not_http: bool = False
    cause: RequestRecord | None = None  # the downstream request that made Envoy connect
    cause_conn: ConnectionRecord | None = None  # else: the TLS downstream connection read in that round
    cause_used_conn: bool = False  # its first request went to `cause_conn` (or elsewhere)
    cause_used: bool = False  # its first request was attributed to `cause`
    requests: int = 0
    # requests no downstream request was found for: id(request msg) -> (trace id, span id, parent span id,
    # attribution): under the TLS downstream connection whose read caused it, else a trace of their own
    unpaired: dict[int, tuple[str, str, str | None, str]] = field(default_factory=dict)
    tls_causes: dict[int, ConnectionRecord] = field(default_factory=dict)  # id(request msg) -> TLS downstream

    @property
    def end_ns(self) -> int:
        """Close, or the connect when nothing later was seen."""
        return self.close_ns if self.close_ns is not None else self.connect_ns

    def close_initiator(self) -> str | None:
        """'peer' (the upstream) or 'envoy': who ended the connection first (FIN, EOF, or reset)."""
        return _close_initiator(self)


@dataclass(slots=True)
class RequestRecord:
    """A request Envoy read on a downstream connection, and the upstream requests it caused."""

    conn: ConnectionRecord
    request: HttpMessage
    span_id: str
    context: TraceContext | None  # from the request's own headers
    upstream: list[tuple[UpstreamRecord, HttpMessage, str]] = field(default_factory=list)  # (conn, req, id)
    reserved: bool = False  # the cause of a new upstream connection whose request is not written yet
    active_round: int = 0  # when Envoy started on it: its header block, or the previous pipelined response

    def placement(self) -> tuple[str, str | None, str]:
        """``(trace id, parent span id, source)`` of this request's span.

        Its own trace-context headers first; else the trace context Envoy put on the upstream request
        (Envoy's own tracer: traceparent/b3 on the way out); else a child of the downstream connection.
        """
        ctx, source = self.context, ""
        if ctx is not None:
            source = ctx.source
        else:
            for _, up_req, _ in self.upstream:
                up_ctx = upstream_context(up_req)
                if up_ctx is not None:
                    ctx, source = up_ctx, f"envoy:{up_ctx.source}"  # Envoy's tracer started the trace
                    break
        if ctx is not None:
            parent = f"{ctx.parent_span_id:016x}" if ctx.parent_span_id is not None else None
            return f"{ctx.trace_id:032x}", parent, source
        return self.conn.trace_id, self.conn.span_id, "connection"


def _close_initiator(conn: ConnectionRecord | UpstreamRecord) -> str | None:
    """'peer' if the peer's FIN, an EOF read or a received reset came first, else 'envoy' (FIN or reset
    sent, or at least a close); None when nothing ended the connection."""

    reset_received = reset_sent = None  # the first of each
    for m in conn.tcp_marks:
        if m.name == "tcp.reset_received":
            if reset_received is None:
                reset_received = m.ts_ns
        elif m.name == "tcp.reset_sent" and reset_sent is None:
            reset_sent = m.ts_ns
    peer = _earliest(conn.peer_fin_ns, conn.eof_ns, reset_received)
    envoy = _earliest(conn.envoy_fin_ns, reset_sent)
    if peer is not None and (envoy is None or peer <= envoy):
        return "peer"
    if envoy is not None or conn.close_ns is not None:
        return "envoy"
    return None


def _earliest(*times: int | None) -> int | None:
    """The smallest of the times that are set (None and 0 are not), or None."""
    best = None
    for t in times:
        if t and (best is None or t < best):
            best = t
    return best


def upstream_context(msg: HttpMessage) -> TraceContext | None:
    """Trace context Envoy's tracer added to an upstream request (x-request-id alone does not count)."""
    ctx = trace_context(msg.headers)
    return ctx if ctx is not None and ctx.source != "x-request-id" else None

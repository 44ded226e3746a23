"""What the correlator knows: downstream connections and their requests, and the upstream connections Envoy
opened for them (which point back at the request that caused them). Times are kernel monotonic ns.

Span ids are chosen when a record is created (lowercase hex, as SpanRecord carries them), so spans of
requests can be exported while their connection is still open and still name it as their parent.
A record groups what it knows by concern (its TCP life, the listener hand-off, TLS, HTTP, byte counts);
the TCP life and the byte counts have the same shape for upstream connections.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from ..envoy.filter_chains import ChainChoice, FilterChainIndex
from ..protocols.detect import Protocol
from ..protocols.http import HttpMessage
from ..protocols.http1 import Http1Exchanges
from ..protocols.http2 import Http2Exchanges
from ..protocols.tls.handshake import TlsHandshakeTracker
from ..protocols.tracecontext import TraceContext, trace_context

__all__ = ["MAX_REQUEST_LINKS", "MAX_TCP_MARKS", "AcceptQueueDepth", "ConnectionHttp", "ConnectionRecord",
           "DownstreamTls", "ListenerHandoff", "RequestRecord", "TcpConnect", "TcpMark", "TcpTimeline",
           "TlsRecordCounts", "Traffic", "UnpairedRequest", "UpstreamCause", "UpstreamHttp", "UpstreamRecord",
           "upstream_context"]

#: Span links from a connection to its requests that live in other traces, at most.
MAX_REQUEST_LINKS = 32
#: TCP point events kept per connection, at most.
MAX_TCP_MARKS = 64


@dataclass(slots=True)
class TcpMark:
    """A point event on a connection: retransmit, reset, SYN-ACK retransmit."""

    ts_ns: int
    name: str  # tcp.retransmit | tcp.reset_sent | tcp.reset_received | tcp.synack_retransmit
    state: int = 0


@dataclass(slots=True)
class TcpTimeline:
    """The kernel's account of a connection's TCP life, after the handshake (either direction)."""

    established_ns: int | None = None  # the handshake completed
    peer_fin_ns: int | None = None  # CLOSE_WAIT: the peer's FIN arrived
    envoy_fin_ns: int | None = None  # FIN_WAIT1: Envoy closed first
    eof_ns: int | None = None  # a read returned 0
    marks: list[TcpMark] = field(default_factory=list)

    def add_mark(self, mark: TcpMark) -> None:
        """Keep a point event, up to MAX_TCP_MARKS of them, in time order. The same event twice (a reset the
        kernel folded into the close record and also sent as its own record, when the two met) is kept
        once."""
        marks = self.marks
        if len(marks) >= MAX_TCP_MARKS:
            return
        at = len(marks)
        while at and marks[at - 1].ts_ns > mark.ts_ns:
            at -= 1
        for m in marks:
            if m.ts_ns == mark.ts_ns and m.name == mark.name:
                return
        marks.insert(at, mark)

    def close_initiator(self, *, closed: bool) -> str | None:
        """'peer' if the peer's FIN, an EOF read or a received reset came first, else 'envoy' (FIN or reset
        sent, or at least a close: ``closed``); None when nothing ended the connection."""
        reset_received = reset_sent = None  # the first of each
        for m in self.marks:
            if m.name == "tcp.reset_received":
                if reset_received is None:
                    reset_received = m.ts_ns
            elif m.name == "tcp.reset_sent" and reset_sent is None:
                reset_sent = m.ts_ns
        peer = _earliest(self.peer_fin_ns, self.eof_ns, reset_received)
        envoy = _earliest(self.envoy_fin_ns, reset_sent)
        if peer is not None and (envoy is None or peer <= envoy):
            return "peer"
        if envoy is not None or closed:
            return "envoy"
        return None

    def aborted(self) -> str | None:
        """'peer' or 'envoy' when a reset ended the connection before any orderly FIN, else None.

        A reset after a FIN (Envoy closed, then the kernel answered the client's late close_notify with a
        RST; or a client closing with unread data) is an event on the span, not an abort.
        """
        fin = min((t for t in (self.peer_fin_ns, self.eof_ns, self.envoy_fin_ns) if t), default=None)
        for m in self.marks:
            if fin is None or m.ts_ns < fin:
                if m.name == "tcp.reset_received":
                    return "peer"
                if m.name == "tcp.reset_sent":
                    return "envoy"
        return None


class TlsRecordCounts(NamedTuple):
    """TLS records of one connection, counted in the kernel by walking the record headers (the payload is
    ciphertext: this is what is left to see without symbols). ``*_lost``: the framing was lost (bytes that
    were not a record header, or a syscall with too many records); the counts stop there. A named tuple: one
    per traced TLS connection, made in a quarter of a frozen dataclass's time."""

    received: int
    sent: int
    application_data_received: int
    application_data_sent: int
    max_received: int  # largest record body, bytes
    max_sent: int
    received_lost: bool
    sent_lost: bool


@dataclass(slots=True)
class Traffic:
    """Totals the kernel counted for the connection, reported with its close."""

    bytes_received: int = 0
    bytes_sent: int = 0
    tls_records: TlsRecordCounts | None = None  # TLS connections only


@dataclass(slots=True)
class AcceptQueueDepth:
    """Connections established but not yet accepted on the listening port (this one included). Counted up
    in place while later accepts come (correlate/accept_queue.py ``AcceptQueue.accepted``)."""

    at_accept: int  # when Envoy accepted this one
    on_arrival: int  # when this one joined the queue


@dataclass(slots=True)
class ListenerHandoff:
    """From the accept to the hand-off of the connection to its filter chain (listener filters ran)."""

    first_epoll_add_ns: int | None = None
    saw_epoll_del: bool = False
    handoff_ns: int | None = None  # listener filters done: the connection was handed to its filter chain
    peeked_bytes: int = 0  # the largest MSG_PEEK read (a listener filter looked without consuming)
    peeks: int = 0
    first_io_ns: int | None = None  # the first read or write that was not a peek


@dataclass(slots=True)
class DownstreamTls:
    """TLS on a downstream connection: the handshake as seen, and what ties its encrypted requests to
    upstream requests (the event-loop round of its reads). Every connection has one, so the attribution
    needs no check; ``handshake`` is set when the first bytes read were a TLS handshake record."""

    handshake: TlsHandshakeTracker | None = None
    ready_round: int = -1  # the event-loop round in which the handshake completed
    demand: bool = False  # a read of a new request waits in the per-thread queue for its upstream write
    upstream_busy: int = 0  # upstream requests attributed to it that have not completed
    upstream_requests: int = 0  # upstream requests attributed to it by event-loop round


@dataclass(slots=True)
class ConnectionHttp:
    """Requests on a downstream connection: parsed when it is plaintext HTTP seen from its start. ``links``
    also name upstream requests attributed to a TLS connection when they live in other traces."""

    parser: Http1Exchanges | Http2Exchanges | None = None
    pending: dict[int, RequestRecord] = field(default_factory=dict)  # id(request msg) -> record
    count: int = 0  # requests parsed
    links: list[tuple[str, str]] = field(default_factory=list)  # (trace id, span id) of requests elsewhere
    next_seq: int = 0  # the msg_seq the connection's next data record should carry (a gap: records lost)
    source: str = ""  # "uprobe": the parser is fed a TLS connection's plaintext (correlate/tls_plaintext.py)
    summary_shapes: dict = field(default_factory=dict)  # what its request summaries' spans share (the span
    #                                                     builder's: spans/request_summaries.py)


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
    trace_id: str = ""  # this connection's own trace and root span (set by the correlator)
    span_id: str = ""
    close_ns: int | None = None
    still_open: bool = False
    end_reason: str = ""  # "process_exited": its process ended before closing it (no close was seen)
    own: bool = False  # the daemon's own connection (its admin API calls): no span is made of it
    adopted: bool = False  # open before the daemon started: seen from accept_ns (its adoption) on
    kept: str = ""  # sampled out but kept by the kernel at its close: tls_handshake_failed, reset, ...
    partial: list[str] = field(default_factory=list)  # what we know we missed
    tcp: TcpTimeline = field(default_factory=TcpTimeline)
    accept_queue: AcceptQueueDepth | None = None  # None: nobody saw it queued
    listener: ListenerHandoff = field(default_factory=ListenerHandoff)
    socket_options: Sequence[tuple[int, int, int]] = ()  # (level, optname, value): read-only, shared
    traffic: Traffic = field(default_factory=Traffic)
    protocol: Protocol | None = None  # from the first bytes read (a peek counts); None: none read yet
    plaintext_alpn: str | None = None  # what Envoy's http_inspector makes of those bytes ("" nothing)
    chain_index: FilterChainIndex | None = None  # the listener configuration in force at its accept
    filter_chain: ChainChoice | None = None  # the filter chain it was handed to (decided when it ends)
    tls: DownstreamTls = field(default_factory=DownstreamTls)
    http: ConnectionHttp = field(default_factory=ConnectionHttp)

    @property
    def start_ns(self) -> int:
        """The connection's start: TCP handshake completion when seen, else accept."""
        established = self.tcp.established_ns
        return established if established is not None else self.accept_ns

    def close_initiator(self) -> str | None:
        """'peer' or 'envoy': who ended the connection first (FIN, EOF, or reset)."""
        return self.tcp.close_initiator(closed=self.close_ns is not None)

    def aborted(self) -> str | None:
        """'peer' or 'envoy' when a reset ended the connection before any orderly FIN, else None."""
        return self.tcp.aborted()


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
    kept: str = ""  # not sampled but kept by the kernel: server_error, closed_before_response or slow

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


# ------------------------------------------------------------ upstream connections
# What the correlator knows about Envoy's upstream connections. Times are kernel monotonic ns.
#
# An upstream connection is one Envoy opened (connect). Its requests are attributed to the downstream
# request that caused them (attribution.py); what that found is kept in UpstreamCause.


@dataclass(slots=True)
class TcpConnect:
    """Envoy's connect() and the active open it started."""

    ns: int  # connect() returned
    ret: int  # 0 or -errno (-EINPROGRESS for a non-blocking connect)
    span_id: str  # of the tcp.connect span
    sock: int = 0  # kernel socket address (ties TCP events to it); 0: SYN_SENT not seen
    syn_sent_ns: int | None = None
    failed_ns: int | None = None  # SYN_SENT -> CLOSE, or connect() refused: the connect failed


class UnpairedRequest(NamedTuple):
    """Where the span of an upstream request goes when no downstream request was found for it."""

    trace_id: str
    span_id: str
    parent_span_id: str | None  # the TLS downstream connection whose read caused it; None: a trace of its own
    attribution: str  # how that connection was found ("" without one)


@dataclass(slots=True)
class UpstreamHttp:
    """HTTP that Envoy spoke on the connection (when its first write was a request)."""

    parser: Http1Exchanges | Http2Exchanges | None = None
    not_http: bool = False  # TLS, a server-first protocol, or HTTP parsing off
    requests: int = 0  # requests Envoy wrote
    next_seq: int = 0  # the msg_seq the connection's next data record should carry (a gap: records lost)


@dataclass(slots=True)
class UpstreamCause:
    """Why Envoy opened the connection, and where its requests were attributed."""

    request: RequestRecord | None = None  # the downstream request that made Envoy connect
    conn: ConnectionRecord | None = None  # else: the TLS downstream connection read in that round
    request_used: bool = False  # the first request was attributed (to ``request`` or elsewhere)
    conn_used: bool = False  # the first request went to ``conn`` (or elsewhere)
    # requests no downstream request was found for: id(request msg) -> where their spans go
    unpaired: dict[int, UnpairedRequest] = field(default_factory=dict)
    tls_conns: dict[int, ConnectionRecord] = field(default_factory=dict)  # id(request msg) -> TLS downstream


@dataclass(slots=True)
class UpstreamRecord:
    """One connection a target opened (connect) to an upstream."""

    tgid: int
    fd: int
    tid: int
    thread_name: str
    peer_address: str
    peer_port: int
    trace_id: str
    span_id: str
    connect: TcpConnect
    local_address: str | None = None
    local_port: int = 0
    close_ns: int | None = None
    still_open: bool = False
    end_reason: str = ""  # "process_exited": its process ended before closing it (no close was seen)
    tcp: TcpTimeline = field(default_factory=TcpTimeline)
    traffic: Traffic = field(default_factory=Traffic)
    http: UpstreamHttp = field(default_factory=UpstreamHttp)
    cause: UpstreamCause = field(default_factory=UpstreamCause)

    @property
    def end_ns(self) -> int:
        """Close, or the connect when nothing later was seen."""
        return self.close_ns if self.close_ns is not None else self.connect.ns

    def close_initiator(self) -> str | None:
        """'peer' (the upstream) or 'envoy': who ended the connection first (FIN, EOF, or reset)."""
        return self.tcp.close_initiator(closed=self.close_ns is not None)

"""The downstream connection correlator: typed kernel events in, finished ConnectionRecords out.

How events of one connection find each other:
  * syscall events (accept, reads, writes, epoll_ctl, setsockopt, close) carry (tgid, fd);
  * TCP events (state changes, retransmits, resets) fire in softirq context of other processes and carry
    only the 4-tuple, so connections are also indexed by (peer address, peer port, local port);
  * the TCP handshake completes (child socket SYN_RECV -> ESTABLISHED) *before* Envoy accepts: those wait
    in a per-port "accept queue" table until the accept with the same peer arrives.
Plaintext HTTP/1.x on a connection seen from its start is parsed into requests (protocols.http1). Envoy's
outgoing connections (connect, SYN_SENT -> ESTABLISHED, close) become UpstreamRecords, and each request
Envoy writes upstream is attributed to the downstream request that caused it by the event-loop round: on one
worker thread, the connect() of a new upstream connection happens in the same round as the downstream
request's header block (the seeds' part-4 trick), and a request for a pooled connection is written in that
round or the next (Envoy flushes codec writes from a deferred callback, which runs after one more
epoll_wait). Within that window the request line decides between concurrent requests (Envoy forwards
method and path unless a route rewrites them), else the oldest unpaired request wins. When that fails, a
client-sent x-request-id that Envoy forwarded pairs them.
A closed connection lingers for ``linger_ns`` (events of the close itself, like Envoy's FIN or a reset,
arrive right after the close syscall; CPUs may deliver slightly out of order) and is then emitted.
Everything is bounded: when a table is full the oldest entry is evicted and counted in ``drops``.
"""

from __future__ import annotations

import random
from collections import Counter, OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

from ..events.layout import load_layout
from ..events.types import (
    AcceptEvent,
    CloseEvent,
    ConnectEvent,
    DataEvent,
    EpollCtlEvent,
    Event,
    SetsockoptEvent,
    SockStateEvent,
    TcpEvent,
)
from ..protocols.http1 import Http1Exchanges, HttpExchange, HttpMessage
from ..protocols.http2 import Http2Exchanges, is_h2_preface
from ..protocols.tls import TlsHandshakeTracker
from ..protocols.tracecontext import trace_context
from .addresses import format_ip
from .model import (
    MAX_REQUEST_LINKS,
    ConnectionRecord,
    RequestRecord,
    TcpMark,
    TlsRecordCounts,
    UpstreamRecord,
    upstream_context,
)
from .round_tracker import RoundRecord, RoundTracker, WaitRecord

__all__ = ["ConnectionCorrelator", "ListenSocket"]

_C = load_layout().constants
EV_ACCEPT, EV_CLOSE, EV_DATA, EV_CONNECT = _C["EV_ACCEPT"], _C["EV_CLOSE"], _C["EV_DATA"], _C["EV_CONNECT"]
EV_EPOLL_CTL, EV_SETSOCKOPT, EV_SOCK_STATE, EV_TCP = (
    _C["EV_EPOLL_CTL"], _C["EV_SETSOCKOPT"], _C["EV_SOCK_STATE"], _C["EV_TCP"])
EV_OFFCPU, EV_ROUND = _C["EV_OFFCPU"], _C["EV_ROUND"]
ROLE_DOWNSTREAM, DIR_READ, DATA_FLAG_PEEK = _C["ROLE_DOWNSTREAM"], _C["DIR_READ"], _C["DATA_FLAG_PEEK"]
DATA_FLAG_H2_FRAMES = _C["DATA_FLAG_H2_FRAMES"]  # condensed HTTP/2 framing (Http2Exchanges frames_only)
TCP_SYN_SENT = _C["TCP_SYN_SENT"]
TLS_FRAMING_SEEN, TLS_FRAMING_LOST_RX, TLS_FRAMING_LOST_TX = (
    _C["TLS_FRAMING_SEEN"], _C["TLS_FRAMING_LOST_RX"], _C["TLS_FRAMING_LOST_TX"])
EINPROGRESS = 115
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
OnRequest = Callable[[RequestRecord, HttpExchange], None]
# (trace id, span id, parent span id or None, how it was attributed)
OnUpstreamRequest = Callable[[UpstreamRecord, HttpExchange, tuple[str, str, str | None, str]], None]
MAX_REQUEST_IDS = 4096
RECENT_REQUESTS = 64  # per thread: candidates for the next upstream request (h2: many streams a round)
MATCHED_DELAY = 8  # rounds a request with the same request line may wait for its upstream write
MAX_TLS_DEMAND = 1024  # per thread: TLS reads of new requests waiting for their upstream write
TLS_DEMAND_ROUNDS = 2  # rounds after its read an upstream write may still take a queued TLS read


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


def _feed_http(http: Http1Exchanges | Http2Exchanges, ev: DataEvent) -> bool:
    """Hand one read/write to the connection's HTTP parser; False when it is not for that parser
    (condensed HTTP/2 framing reaches the HTTP/2 parser only)."""
    if not ev.flags & DATA_FLAG_H2_FRAMES:
        feed = http.on_read if ev.direction == DIR_READ else http.on_write
        feed(ev.ts_ns, ev.data, ev.ret, ev.tid, ev.round)
        return True
    if not isinstance(http, Http2Exchanges):
        return False
    feed2 = http.on_read if ev.direction == DIR_READ else http.on_write
    feed2(ev.ts_ns, ev.data, ev.ret, ev.tid, ev.round, frames_only=True)
    return True


@lru_cache(maxsize=1024)
def _thread_name(comm: bytes) -> str:
    """A thread's name from its NUL-padded comm (a worker's accepts repeat it: cached)."""
    return comm.split(b"\0", 1)[0].decode(errors="replace")


def _age_tls_demand(demand: deque[tuple[int, ConnectionRecord]], round_: int) -> None:
    """Forget the oldest queued TLS reads that no upstream write can take any more: read more than
    TLS_DEMAND_ROUNDS rounds before ``round_`` (the thread's later writes are in this round or later), or
    of a connection that closed. Not a loss: with a direct response, or a request Envoy answered itself,
    no upstream write ever comes."""
    while demand:
        read_round, queued = demand[0]
        if round_ - read_round <= TLS_DEMAND_ROUNDS and queued.close_ns is None:
            return
        demand.popleft()
        queued.tls_demand = False


class ConnectionCorrelator:
    """Builds ConnectionRecords; ``on_finished`` receives each one once, after it ended."""

    def __init__(
        self,
        on_finished: Callable[[ConnectionRecord], None],
        *,
        on_request: OnRequest | None = None,
        on_upstream: Callable[[UpstreamRecord], None] | None = None,
        on_upstream_request: OnUpstreamRequest | None = None,
        on_round: Callable[[RoundRecord], None] | None = None,
        on_wait: Callable[[WaitRecord], None] | None = None,
        http: bool = True,
        max_connections: int = 65536,
        max_queued: int = 65536,
        linger_ns: int = 50_000_000,
        rng: random.Random | None = None,
    ) -> None:
        self.on_finished = on_finished
        self.on_request = on_request
        self.on_upstream = on_upstream
        self.on_upstream_request = on_upstream_request
        self.http = http
        self._bits = (rng or random.Random()).getrandbits
        # event-loop rounds and off-CPU waits (issue 4): which connections each reported round handled
        self.rounds = RoundTracker(on_round, on_wait) if on_round is not None else None
        self.accepts_by_thread: Counter[tuple[int, int, str]] = Counter()  # (tgid, tid, name) -> accepts
        self.upstream_open: dict[tuple[int, int], UpstreamRecord] = {}  # (tgid, fd) -> upstream
        self.up_by_sock: dict[int, UpstreamRecord] = {}  # kernel socket address -> upstream
        self.upstream_closing: deque[UpstreamRecord] = deque()
        # tid -> [ts, socket, local address, local port, ESTABLISHED ts, CLOSE ts]: a SYN_SENT inside
        # connect(). The socket address ties later events to it: at SYN_SENT no local port is chosen yet.
        self.syn_sent: dict[int, list] = {}
        self.recent_requests: dict[int, deque[RequestRecord]] = {}  # tid -> newest request header blocks
        # tid -> newest (round, connection) reads of TLS downstream connections (their requests are
        # encrypted: the round is what ties an upstream request to them)
        self.recent_tls_reads: dict[int, deque[tuple[int, ConnectionRecord]]] = {}
        self.tls_demand: dict[int, deque[tuple[int, ConnectionRecord]]] = {}  # tid -> reads of new requests
        self.by_request_id: OrderedDict[str, RequestRecord] = OrderedDict()  # client-sent x-request-id
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
            EV_CONNECT: self._on_connect,  # type: ignore[dict-item]
            EV_DATA: self._on_data,  # type: ignore[dict-item]
            EV_EPOLL_CTL: self._on_epoll_ctl,  # type: ignore[dict-item]
            EV_SETSOCKOPT: self._on_setsockopt,  # type: ignore[dict-item]
            EV_SOCK_STATE: self._on_sock_state,  # type: ignore[dict-item]
            EV_TCP: self._on_tcp,  # type: ignore[dict-item]
        }
        if self.rounds is not None:
            self._dispatch[EV_OFFCPU] = self.rounds.on_offcpu  # type: ignore[assignment]
            self._dispatch[EV_ROUND] = self.rounds.on_round  # type: ignore[assignment]

    # ------------------------------------------------------------------ context from user space

    def set_listen_sockets(self, sockets: dict[tuple[int, int], ListenSocket]) -> None:
        """Replace the (tgid, listen fd) -> listening socket table (from /proc)."""
        self.listen_sockets = dict(sockets)

    def set_listener_names(self, names: dict[tuple[str, int], str]) -> None:
        """Replace the (address, port) -> Envoy listener name table (from the admin API)."""
        self.listener_names = dict(names)

    # ------------------------------------------------------------------ events

    def handle(self, event: Event) -> None:
        """Apply one event (hot path). Never raises for odd input; unknown situations are counted."""
        latest = self.latest_ns
        if event.ts_ns > latest:
            self.latest_ns = latest = event.ts_ns
        handler = self._dispatch.get(event.kind)
        if handler is not None:
            handler(event)
        due = latest - self.linger_ns
        closing, upstream_closing = self.closing, self.upstream_closing
        if (closing and closing[0].close_ns <= due) or (  # type: ignore[operator]
                upstream_closing and upstream_closing[0].end_ns <= due):
            self.expire(latest)

    def expire(self, now_ns: int) -> None:
        """Emit connections that closed more than ``linger_ns`` before ``now_ns``."""
        while self.closing and self.closing[0].close_ns + self.linger_ns <= now_ns:  # type: ignore[operator]
            self._finish(self.closing.popleft())
        while self.upstream_closing and self.upstream_closing[0].end_ns + self.linger_ns <= now_ns:
            self._finish_upstream(self.upstream_closing.popleft())

    def flush(self, now_ns: int) -> None:
        """End everything: closed connections as they are, open ones at ``now_ns`` as still open."""
        while self.closing:
            self._finish(self.closing.popleft())
        for conn in list(self.open.values()):
            conn.still_open = True
            conn.close_ns = max(now_ns, conn.accept_ns)
            self._end_requests(conn, conn.close_ns)
            self._finish(conn)
        self.open.clear()
        while self.upstream_closing:
            self._finish_upstream(self.upstream_closing.popleft())
        for up in list(self.upstream_open.values()):
            up.still_open = True
            up.close_ns = max(now_ns, up.connect_ns)
            self._end_upstream_requests(up, up.close_ns)
            self._finish_upstream(up)
        self.upstream_open.clear()

    def _new_id(self, bits: int = 64) -> str:
        return f"{self._bits(bits) or 1:0{bits // 4}x}"

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
            thread_name=_thread_name(ev.comm),
            listen_fd=ev.listen_fd,
            peer_address=peer,
            peer_port=ev.peer_port,
            local_port=listen.port if listen else 0,
            accept_ns=ev.ts_ns,
            trace_id=self._new_id(128),
            span_id=self._new_id(),
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
            if entry.synack_retransmits:
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
        self.accepts_by_thread[(ev.tgid, ev.tid, conn.thread_name)] += 1

    def _listener_name(self, address: str, port: int) -> str | None:
        names = self.listener_names
        return names.get((address, port)) or names.get(("0.0.0.0", port)) or names.get(("::", port))

    def _on_data(self, ev: DataEvent) -> None:
        """A read or write (hot path: most events are these)."""
        if ev.role != ROLE_DOWNSTREAM:
            self._on_upstream_data(ev)
            return
        conn = self.open.get((ev.tgid, ev.fd))
        if conn is None:
            return
        if self.rounds is not None:
            self.rounds.touch(ev.tid, ev.round, conn.trace_id, conn.span_id, conn.fd)
        ret = ev.ret
        if ev.direction == DIR_READ:
            if ret > 0:
                self._on_downstream_read(conn, ev)
            elif ret == 0 and conn.eof_ns is None:
                conn.eof_ns = ev.ts_ns
            return
        if ret <= 0:
            return
        if conn.first_io_ns is None:
            self._settle_handoff(conn, ev.ts_ns)
        if conn.tls is not None:
            conn.tls.on_server_data(ev.ts_ns, ev.data, ret)
        elif conn.http is not None:
            _feed_http(conn.http, ev)
            self._after_http(conn, ev)

    def _on_downstream_read(self, conn: ConnectionRecord, ev: DataEvent) -> None:
        """A read (or MSG_PEEK) that returned bytes on a downstream connection."""
        peek = ev.flags & DATA_FLAG_PEEK
        data = ev.data
        if peek:
            conn.peeks += 1
            if ev.ret > conn.peeked_bytes:
                conn.peeked_bytes = ev.ret
        elif conn.first_io_ns is None:
            self._settle_handoff(conn, ev.ts_ns)
        tls = conn.tls
        if tls is None and not conn.not_tls:
            if data[:1] == b"\x16":  # a TLS handshake record
                tls = conn.tls = TlsHandshakeTracker()
            else:  # plaintext; HTTP/1.x if it parses as such
                conn.not_tls = True
        if tls is not None:
            # past the handshake, reads carry no bytes: nothing for the tracker then
            if data or tls.completed_ns is None:
                was_established = tls.completed_ns is not None
                tls.on_client_data(ev.ts_ns, data, ev.ret, peek=bool(peek))
                if not was_established and tls.completed_ns is not None:
                    conn.tls_ready_round = ev.round
            if not peek:
                self._note_tls_read(conn, ev)
        elif not peek:
            # requests are parsed from the connection's first real read (listener filters may peek first)
            if conn.http is None and self.http and conn.first_io_ns == ev.ts_ns:
                conn.http = (Http2Exchanges(requests_read=True) if is_h2_preface(data)
                             else Http1Exchanges(requests_read=True, h2c_handoff=True))
            if conn.http is not None:
                _feed_http(conn.http, ev)
                self._after_http(conn, ev)

    def _note_tls_read(self, conn: ConnectionRecord, ev: DataEvent) -> None:
        """A TLS downstream connection was read: its requests are ciphertext, so the round is the clue.

        Envoy connects upstream inside the read's callback (same round) and writes a request to a pooled
        connection from a deferred callback (the next round), in the order the reads happened. So each
        read that starts a new request joins a per-thread queue that upstream writes consume in order. A
        read starts a new request when it comes after the handshake's round, and the connection has no
        request queued or upstream (HTTP/1.1 sends the next request after the response)."""
        reads = self.recent_tls_reads.get(ev.tid)
        if reads is None:
            reads = self.recent_tls_reads[ev.tid] = deque(maxlen=RECENT_REQUESTS)
        if not reads or reads[-1][0] != ev.round or reads[-1][1] is not conn:
            reads.append((ev.round, conn))
        if conn.tls_ready_round < 0 or ev.round <= conn.tls_ready_round or conn.tls_demand \
                or conn.tls_upstream_busy:
            return
        demand = self.tls_demand.get(ev.tid)
        if demand is None:
            demand = self.tls_demand[ev.tid] = deque()
        _age_tls_demand(demand, ev.round)
        if len(demand) >= MAX_TLS_DEMAND:  # that many live reads within TLS_DEMAND_ROUNDS: a real loss
            demand.popleft()[1].tls_demand = False
            self.drops["tls_demand_queue_full"] += 1
        demand.append((ev.round, conn))
        conn.tls_demand = True

    def _take_tls_demand(self, tgid: int, tid: int, round_: int, conn: ConnectionRecord | None = None
                         ) -> ConnectionRecord | None:
        """The oldest queued TLS read on this thread at most two rounds old (or ``conn``'s own entry)."""
        demand = self.tls_demand.get(tid)
        if conn is not None:
            if conn.tls_demand and demand:
                for i, (_, queued) in enumerate(demand):
                    if queued is conn:
                        del demand[i]
                        break
            conn.tls_demand = False
            return conn
        while demand:
            read_round, queued = demand.popleft()
            queued.tls_demand = False
            if round_ - read_round <= TLS_DEMAND_ROUNDS and queued.close_ns is None and queued.tgid == tgid:
                return queued
        return None

    def _tls_cause(self, tgid: int, tid: int, round_: int, max_delay: int) -> ConnectionRecord | None:
        """The TLS downstream connection this thread read from most recently, at most ``max_delay`` rounds
        before ``round_`` (and still open)."""
        for read_round, conn in reversed(self.recent_tls_reads.get(tid, ())):
            if round_ - read_round > max_delay:
                return None
            if conn.tgid == tgid and conn.close_ns is None and round_ - read_round >= 0:
                return conn
        return None

    # ------------------------------------------------------------------ HTTP requests

    def _after_http(self, conn: ConnectionRecord, ev: DataEvent) -> None:
        http = conn.http
        assert http is not None
        if http.upgraded and isinstance(http, Http1Exchanges) and http.h2c_request is not None:
            h2 = Http2Exchanges.from_upgrade(http)  # 101 to h2c: the rest of the connection is HTTP/2
            if h2 is not None:
                conn.http = http = h2
                self.stats["h2c_upgrades"] += 1
        for msg in http.take_new_requests():
            rr = RequestRecord(conn, msg, self._new_id(), trace_context(msg.headers),
                               active_round=msg.headers_round)
            conn.requests_pending[id(msg)] = rr
            conn.request_count += 1
            recent = self.recent_requests.get(ev.tid)
            if recent is None:
                recent = self.recent_requests[ev.tid] = deque(maxlen=RECENT_REQUESTS)
            recent.append(rr)
            request_id = msg.headers.get("x-request-id")
            if request_id:
                self.by_request_id[request_id] = rr
                if len(self.by_request_id) > MAX_REQUEST_IDS:
                    self.by_request_id.popitem(last=False)
        if http.completed:
            for exchange in http.take_completed():
                self._request_done(conn, exchange)
            if isinstance(http, Http1Exchanges):
                # HTTP/1 pipelining: Envoy starts on the next buffered request only after this response
                for rr in conn.requests_pending.values():
                    rr.active_round = max(rr.active_round, ev.round)

    def _request_done(self, conn: ConnectionRecord, exchange: HttpExchange) -> None:
        msg = exchange.request
        rr = conn.requests_pending.pop(id(msg), None)
        if rr is None:  # never reached a complete header block (malformed): a record of its own
            rr = RequestRecord(conn, msg, self._new_id(), trace_context(msg.headers))
            conn.request_count += 1
        request_id = msg.headers.get("x-request-id")
        if request_id and self.by_request_id.get(request_id) is rr:
            del self.by_request_id[request_id]
        trace_id, _, _ = rr.placement()
        if trace_id != conn.trace_id and len(conn.request_links) < MAX_REQUEST_LINKS:
            conn.request_links.append((trace_id, rr.span_id))
        if self.on_request is not None:
            self.on_request(rr, exchange)

    def _end_requests(self, conn: ConnectionRecord, ts_ns: int) -> None:
        """The connection ended: what is still in flight becomes request spans now."""
        if conn.http is not None:
            for exchange in conn.http.finish(ts_ns):
                self._request_done(conn, exchange)
        conn.requests_pending.clear()

    def _request_candidate(self, tgid: int, tid: int, round_: int, max_delay: int,
                           like: HttpMessage | None = None) -> RequestRecord | None:
        """A downstream request this thread started on at most ``max_delay`` event-loop rounds ago that
        has no upstream request yet: the first with the same method and path as ``like`` (within
        MATCHED_DELAY rounds: a pool may hold a request back until a connection is free), else the oldest
        one not reserved by a new connection, else the oldest reserved one (Envoy's pool may have given
        that request an older connection that became free)."""
        unreserved = reserved = None
        for rr in self.recent_requests.get(tid, ()):
            delay = round_ - rr.active_round
            if rr.upstream or rr.conn.tgid != tgid or not 0 <= delay <= max(max_delay, MATCHED_DELAY):
                continue
            if like is not None and rr.request.method == like.method and rr.request.path == like.path:
                return rr
            if delay > max_delay:
                continue
            if rr.reserved:
                reserved = reserved or rr
            else:
                unreserved = unreserved or rr
        return unreserved or reserved

    def _pair_upstream_request(self, up: UpstreamRecord, msg: HttpMessage, ev: DataEvent) -> None:
        rr: RequestRecord | None = None
        cause = up.cause if not up.cause_used else None
        up.cause_used = True
        if cause is not None and not cause.upstream and \
                (cause.request.method, cause.request.path) == (msg.method, msg.path):
            rr = cause
            self.stats["upstream_paired_by_connect_round"] += 1
        else:
            rr = self._request_candidate(ev.tgid, ev.tid, ev.round, 1, like=msg)
            if rr is None and cause is not None and not cause.upstream:
                rr = cause  # the path was rewritten by a route
            if rr is not None:
                self.stats["upstream_paired_by_round"] += 1
        if cause is not None:
            cause.reserved = False
        if rr is None:
            request_id = msg.headers.get("x-request-id")
            rr = self.by_request_id.get(request_id) if request_id else None
            if rr is not None and rr.upstream:
                rr = None
            if rr is not None:
                self.stats["upstream_paired_by_request_id"] += 1
        if rr is None:
            conn, how = None, "tls_connection_connect"  # Envoy connected inside that connection's read
            if not up.cause_used_conn and up.cause_conn is not None and up.cause_conn.close_ns is None:
                conn = self._take_tls_demand(ev.tgid, ev.tid, ev.round, up.cause_conn)
            up.cause_used_conn = True
            if conn is None:  # a pooled connection: the read queue's order (approximate under concurrency)
                how = "tls_connection_round"
                conn = self._take_tls_demand(ev.tgid, ev.tid, ev.round)
            if conn is None:  # e.g. the request came in the handshake's last read: the latest read then
                conn, how = self._tls_cause(ev.tgid, ev.tid, ev.round, 1), "tls_connection_latest_read"
            if conn is not None:
                self.stats[f"upstream_paired_by_{how}"] += 1
                conn.upstream_requests += 1
                conn.tls_upstream_busy += 1
                up.tls_causes[id(msg)] = conn
                span_id = self._new_id()
                up.unpaired[id(msg)] = (conn.trace_id, span_id, conn.span_id, how)
                ctx = upstream_context(msg)
                if ctx is not None and len(conn.request_links) < MAX_REQUEST_LINKS:
                    conn.request_links.append((f"{ctx.trace_id:032x}", span_id))
                return
            self.stats["upstream_unpaired"] += 1
            up.unpaired[id(msg)] = (self._new_id(128), self._new_id(), None, "")
            return
        rr.reserved = False
        rr.upstream.append((up, msg, self._new_id()))

    # ------------------------------------------------------------------ upstream connections

    def _on_connect(self, ev: ConnectEvent) -> None:
        if not ev.family:
            return
        key = (ev.tgid, ev.fd)
        stale = self.upstream_open.pop(key, None)
        if stale is not None:
            stale.close_ns = ev.ts_ns
            self.drops["upstream_fd_reused_without_close"] += 1
            self._close_upstream(stale)
        if len(self.upstream_open) >= self.max_connections:
            _, victim = next(iter(self.upstream_open.items()))
            self.upstream_open.pop((victim.tgid, victim.fd))
            victim.still_open, victim.close_ns = True, ev.ts_ns
            self.drops["upstream_table_full"] += 1
            self._close_upstream(victim)
        peer = format_ip(ev.family, ev.peer_addr)
        up = UpstreamRecord(
            tgid=ev.tgid, fd=ev.fd, tid=ev.tid,
            thread_name=_thread_name(ev.comm),
            peer_address=peer, peer_port=ev.peer_port, connect_ns=ev.ts_ns, connect_ret=ev.ret,
            trace_id=self._new_id(128), span_id=self._new_id(), connect_span_id=self._new_id(),
        )
        syn = self.syn_sent.pop(ev.tid, None)
        if syn is not None:
            up.syn_sent_ns, up.sock, up.local_address, up.local_port = syn[0], syn[1], syn[2], syn[3]
            up.established_ns, up.failed_state_ns = syn[4], syn[5]
            self.up_by_sock[up.sock] = up
        cause = self._request_candidate(ev.tgid, ev.tid, ev.round, 0)
        if cause is not None:
            up.cause, cause.reserved = cause, True
        else:
            up.cause_conn = self._tls_cause(ev.tgid, ev.tid, ev.round, 0)
        if ev.ret not in (0, -EINPROGRESS):  # refused at once: nothing more will happen on it
            up.failed_state_ns = up.failed_state_ns or ev.ts_ns
            up.close_ns = ev.ts_ns
            self._close_upstream(up)
            return
        self.upstream_open[key] = up

    def _on_upstream_data(self, ev: DataEvent) -> None:
        up = self.upstream_open.get((ev.tgid, ev.fd))
        if up is None:
            return
        if ev.ret <= 0:
            if ev.ret == 0 and ev.direction == DIR_READ and up.eof_ns is None:
                up.eof_ns = ev.ts_ns
            return
        if up.http is None and not up.not_http:
            if self.http and ev.direction != DIR_READ and is_h2_preface(ev.data) and len(ev.data) >= 3:
                up.http = Http2Exchanges(requests_read=False)  # Envoy speaks HTTP/2 to this upstream
            elif self.http and ev.direction != DIR_READ and ev.data[:1] not in (b"\x16", b""):
                up.http = Http1Exchanges(requests_read=False)  # HTTP/1.x request first
            else:  # TLS or a server-first protocol
                up.not_http = True
        http = up.http
        if http is None:
            return
        if not _feed_http(http, ev):
            return
        if ev.direction != DIR_READ:
            for msg in http.take_new_requests():
                up.requests += 1
                self._pair_upstream_request(up, msg, ev)
        if http.completed:
            for exchange in http.take_completed():
                self._upstream_request_done(up, exchange)

    def _upstream_request_done(self, up: UpstreamRecord, exchange: HttpExchange) -> None:
        conn = up.tls_causes.pop(id(exchange.request), None)
        if conn is not None:
            conn.tls_upstream_busy -= 1
        ids = up.unpaired.pop(id(exchange.request), None)
        if ids is not None and self.on_upstream_request is not None:
            self.on_upstream_request(up, exchange, ids)
        # paired ones are exported with their downstream request (RequestRecord.upstream)

    def _end_upstream_requests(self, up: UpstreamRecord, ts_ns: int) -> None:
        if up.http is not None:
            for exchange in up.http.finish(ts_ns):
                self._upstream_request_done(up, exchange)

    def _close_upstream(self, up: UpstreamRecord) -> None:
        self._end_upstream_requests(up, up.end_ns)
        self.upstream_closing.append(up)

    def _finish_upstream(self, up: UpstreamRecord) -> None:
        if self.up_by_sock.get(up.sock) is up:
            del self.up_by_sock[up.sock]
        self.stats["upstream_connections"] += 1
        if self.on_upstream is not None:
            self.on_upstream(up)

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
            up = self.upstream_open.pop((ev.tgid, ev.fd), None)
            if up is not None:
                up.close_ns = ev.ts_ns
                up.bytes_received, up.bytes_sent = ev.bytes_rx, ev.bytes_tx
                self._close_upstream(up)
            return
        conn = self.open.pop((ev.tgid, ev.fd), None)
        if conn is None:
            return
        conn.close_ns = ev.ts_ns
        conn.bytes_received = ev.bytes_rx
        conn.bytes_sent = ev.bytes_tx
        if ev.tls_flags & TLS_FRAMING_SEEN:
            conn.tls_records = TlsRecordCounts(
                ev.tls_records_rx, ev.tls_records_tx, ev.tls_app_records_rx, ev.tls_app_records_tx,
                ev.tls_max_record_rx, ev.tls_max_record_tx, bool(ev.tls_flags & TLS_FRAMING_LOST_RX),
                bool(ev.tls_flags & TLS_FRAMING_LOST_TX))
        if conn.handoff_ns is None and conn.first_epoll_add_ns is not None and not conn.saw_epoll_del:
            conn.handoff_ns = conn.first_epoll_add_ns
        self._end_requests(conn, ev.ts_ns)
        self.closing.append(conn)

    def _on_sock_state(self, ev: SockStateEvent) -> None:
        local = format_ip(ev.family, ev.saddr)
        peer = format_ip(ev.family, ev.daddr)
        tkey = (peer, ev.dport, ev.sport)
        new = ev.newstate
        if new == TCP_SYN_SENT:  # inside the target's connect(): its exit names the fd
            self.syn_sent[ev.tid] = [ev.ts_ns, ev.skaddr, local, ev.sport, None, None]
            if len(self.syn_sent) > self.max_queued:
                self.syn_sent.pop(next(iter(self.syn_sent)))
            return
        if ev.oldstate == TCP_SYN_SENT and new in (TCP_ESTABLISHED, TCP_CLOSE):
            # over loopback the handshake completes (or is refused) inside connect(), before its exit
            # names the fd
            pending = self.syn_sent.get(ev.tid)
            if pending is not None and pending[1] == ev.skaddr:
                pending[2], pending[3] = local, ev.sport
                pending[4 if new == TCP_ESTABLISHED else 5] = ev.ts_ns
                return
        up = self.up_by_sock.get(ev.skaddr)
        if up is not None:
            if not up.local_port:
                up.local_address, up.local_port = local, ev.sport
            if new == TCP_ESTABLISHED and up.established_ns is None:
                up.established_ns = ev.ts_ns
            elif new == TCP_CLOSE and ev.oldstate == TCP_SYN_SENT:
                up.failed_state_ns = ev.ts_ns
            elif new == TCP_CLOSE_WAIT and up.peer_fin_ns is None:
                up.peer_fin_ns = ev.ts_ns
            elif new == TCP_FIN_WAIT1 and up.envoy_fin_ns is None:
                up.envoy_fin_ns = ev.ts_ns
            return
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
        conn = self.by_tuple.get(tkey) or self.up_by_sock.get(ev.skaddr)
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

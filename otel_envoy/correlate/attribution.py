"""Which downstream request caused an upstream connection or request, by the event-loop round.

On one worker thread, Envoy's connect() of a new upstream connection happens in the same round as the
downstream request's header block (the router asks the pool for a connection while it decodes the
headers), and a request for a pooled connection is written in that round or the next (Envoy flushes codec
writes from a deferred callback, which runs after one more epoll_wait). Within that window the request
line decides between concurrent requests (Envoy forwards method and path unless a route rewrites them),
else the oldest unpaired request wins. When that fails, a client-sent x-request-id that Envoy forwarded
pairs them.

A TLS downstream connection's requests are ciphertext: there the round of the connection's reads is the
clue. Each read that starts a new request joins a per-thread queue that upstream writes take in order.

When the kernel samples requests (``exact_only``), most downstream requests are never seen, so "the oldest
request of the window" would often be the wrong one: then only a request with the same request line is
taken, and an upstream request or connection without one is left unattributed (and not exported).

With request summaries (``late_requests``) a sampled downstream request is reported after the upstream
requests it caused: those found for no request wait for it (:mod:`.parked_upstream`).
"""

from __future__ import annotations

from collections import Counter, OrderedDict, deque

from ..events.types import ConnectEvent, DataEvent
from ..protocols.http import HttpExchange, HttpMessage
from .identity import IdSource
from .parked_upstream import ParkedUpstreams
from .records import (
    MAX_REQUEST_LINKS,
    ConnectionRecord,
    RequestRecord,
    UnpairedRequest,
    UpstreamRecord,
    upstream_context,
)

__all__ = ["MAX_TLS_DEMAND", "TLS_DEMAND_ROUNDS", "UpstreamAttribution"]

MAX_REQUEST_IDS = 4096
RECENT_REQUESTS = 64  # per thread: candidates for the next upstream request (h2: many streams a round)
MATCHED_DELAY = 8  # rounds a request with the same request line may wait for its upstream write
MAX_TLS_DEMAND = 1024  # per thread: TLS reads of new requests waiting for their upstream write
TLS_DEMAND_ROUNDS = 2  # rounds after its read an upstream write may still take a queued TLS read

TlsReads = deque[tuple[int, ConnectionRecord]]  # (event-loop round, TLS downstream connection)


def _age_tls_demand(demand: TlsReads, round_: int) -> None:
    """Forget the oldest queued TLS reads that no upstream write can take any more: read more than
    TLS_DEMAND_ROUNDS rounds before ``round_`` (the thread's later writes are in this round or later), or
    of a connection that closed. Not a loss: with a direct response, or a request Envoy answered itself,
    no upstream write ever comes."""
    while demand:
        read_round, queued = demand[0]
        if round_ - read_round <= TLS_DEMAND_ROUNDS and queued.close_ns is None:
            return
        demand.popleft()
        queued.tls.demand = False


class UpstreamAttribution:
    """Per thread: recent downstream requests and TLS reads; pairs upstream connections and requests with
    them. Bounded tables; a TLS read queue full of reads that could still be taken counts a drop."""

    def __init__(self, ids: IdSource, stats: Counter[str], drops: Counter[str]) -> None:
        self._new_span_id = ids.span_id
        self._new_trace_id = ids.trace_id
        self.stats = stats
        self.drops = drops
        self.recent_requests: dict[int, deque[RequestRecord]] = {}  # tid -> newest request header blocks
        # tid -> newest (round, connection) reads of TLS downstream connections
        self.recent_tls_reads: dict[int, TlsReads] = {}
        self.tls_demand: dict[int, TlsReads] = {}  # tid -> reads of new requests, oldest first
        self.by_request_id: OrderedDict[str, RequestRecord] = OrderedDict()  # client-sent x-request-id
        self.exact_only = False  # requests are sampled: pair by request line (or x-request-id) only
        self.late_requests = False  # request summaries: downstream requests come after their upstream ones
        self.parked = ParkedUpstreams(self._unpaired, stats)

    # ------------------------------------------------------------------ what downstream connections did

    def note_request(self, rr: RequestRecord, tid: int) -> None:
        """Thread ``tid`` read the header block of a downstream request."""
        recent = self.recent_requests.get(tid)
        if recent is None:
            recent = self.recent_requests[tid] = deque(maxlen=RECENT_REQUESTS)
        recent.append(rr)
        request_id = rr.request.headers.get("x-request-id")
        if request_id:
            self.by_request_id[request_id] = rr
            if len(self.by_request_id) > MAX_REQUEST_IDS:
                self.by_request_id.popitem(last=False)

    def request_done(self, rr: RequestRecord) -> None:
        """The downstream request ended: its x-request-id no longer pairs anything."""
        request_id = rr.request.headers.get("x-request-id")
        if request_id and self.by_request_id.get(request_id) is rr:
            del self.by_request_id[request_id]

    def note_tls_read(self, conn: ConnectionRecord, ev: DataEvent) -> None:
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
        tls = conn.tls
        if tls.ready_round < 0 or ev.round <= tls.ready_round or tls.demand or tls.upstream_busy:
            return
        demand = self.tls_demand.get(ev.tid)
        if demand is None:
            demand = self.tls_demand[ev.tid] = deque()
        _age_tls_demand(demand, ev.round)
        if len(demand) >= MAX_TLS_DEMAND:  # that many live reads within TLS_DEMAND_ROUNDS: a real loss
            demand.popleft()[1].tls.demand = False
            self.drops["tls_demand_queue_full"] += 1
        demand.append((ev.round, conn))
        tls.demand = True

    # ------------------------------------------------------------------ candidates

    def take_tls_demand(self, tgid: int, tid: int, round_: int, conn: ConnectionRecord | None = None
                        ) -> ConnectionRecord | None:
        """The oldest queued TLS read on this thread at most two rounds old (or ``conn``'s own entry)."""
        demand = self.tls_demand.get(tid)
        if conn is not None:
            if conn.tls.demand and demand:
                for i, (_, queued) in enumerate(demand):
                    if queued is conn:
                        del demand[i]
                        break
            conn.tls.demand = False
            return conn
        while demand:
            read_round, queued = demand.popleft()
            queued.tls.demand = False
            if round_ - read_round <= TLS_DEMAND_ROUNDS and queued.close_ns is None and queued.tgid == tgid:
                return queued
        return None

    def tls_cause(self, tgid: int, tid: int, round_: int, max_delay: int) -> ConnectionRecord | None:
        """The TLS downstream connection this thread read from most recently, at most ``max_delay`` rounds
        before ``round_`` (and still open)."""
        for read_round, conn in reversed(self.recent_tls_reads.get(tid, ())):
            if round_ - read_round > max_delay:
                return None
            if conn.tgid == tgid and conn.close_ns is None and round_ - read_round >= 0:
                return conn
        return None

    def request_candidate(self, tgid: int, tid: int, round_: int, max_delay: int,
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
            if delay > max_delay or (self.exact_only and like is not None):
                continue
            if rr.reserved:
                reserved = reserved or rr
            else:
                unreserved = unreserved or rr
        return unreserved or reserved

    # ------------------------------------------------------------------ upstream connections and requests

    def on_connect(self, up: UpstreamRecord, ev: ConnectEvent) -> None:
        """Envoy opened ``up``: the request whose header block this round read (reserved for the
        connection's first request), else the TLS connection read in this round."""
        cause = self.request_candidate(ev.tgid, ev.tid, ev.round, 0)
        if cause is not None:
            up.cause.request, cause.reserved = cause, True
        else:
            up.cause.conn = self.tls_cause(ev.tgid, ev.tid, ev.round, 0)

    def pair(self, up: UpstreamRecord, msg: HttpMessage, ev: DataEvent) -> None:
        """Envoy wrote request ``msg`` on ``up``: attribute it to a downstream request (appended to its
        ``upstream``), else to a TLS downstream connection, else to nothing (``up.cause.unpaired``)."""
        found = up.cause
        rr: RequestRecord | None = None
        cause = found.request if not found.request_used else None
        found.request_used = True
        if cause is not None and not cause.upstream and \
                (cause.request.method, cause.request.path) == (msg.method, msg.path):
            rr = cause
            self.stats["upstream_paired_by_connect_round"] += 1
        else:
            if cause is not None and self.exact_only:  # the connection was made for another request
                found.request = cause = None
            rr = self.request_candidate(ev.tgid, ev.tid, ev.round, 1, like=msg)
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
            if self.late_requests and not self._tls_reads_near(ev):
                self.parked.park(up, msg, ev.tgid, ev.tid, ev.ts_ns, self._new_span_id())
                return
            self._pair_with_tls_connection(up, msg, ev)
            return
        rr.reserved = False
        rr.upstream.append((up, msg, self._new_span_id()))

    def _pair_with_tls_connection(self, up: UpstreamRecord, msg: HttpMessage, ev: DataEvent) -> None:
        """No downstream request: the TLS downstream connection whose read caused the write, if any."""
        found = up.cause
        conn, how = None, "tls_connection_connect"  # Envoy connected inside that connection's read
        if not found.conn_used and found.conn is not None and found.conn.close_ns is None:
            conn = self.take_tls_demand(ev.tgid, ev.tid, ev.round, found.conn)
        found.conn_used = True
        if conn is None:  # a pooled connection: the read queue's order (approximate under concurrency)
            how = "tls_connection_round"
            conn = self.take_tls_demand(ev.tgid, ev.tid, ev.round)
        if conn is None:  # e.g. the request came in the handshake's last read: the latest read then
            conn, how = self.tls_cause(ev.tgid, ev.tid, ev.round, 1), "tls_connection_latest_read"
        if conn is not None:
            self.stats[f"upstream_paired_by_{how}"] += 1
            conn.tls.upstream_requests += 1
            conn.tls.upstream_busy += 1
            found.tls_conns[id(msg)] = conn
            span_id = self._new_span_id()
            found.unpaired[id(msg)] = UnpairedRequest(conn.trace_id, span_id, conn.span_id, how)
            ctx = upstream_context(msg)
            if ctx is not None and len(conn.http.links) < MAX_REQUEST_LINKS:
                conn.http.links.append((f"{ctx.trace_id:032x}", span_id))
            return
        found.unpaired[id(msg)] = self._unpaired()

    def _unpaired(self) -> UnpairedRequest:
        """Where an upstream request found for no downstream request nor TLS connection goes: a trace of
        its own."""
        self.stats["upstream_unpaired"] += 1
        return UnpairedRequest(self._new_trace_id(), self._new_span_id(), None, "")

    def _tls_reads_near(self, ev: DataEvent) -> bool:
        """This thread read a TLS downstream connection within TLS_DEMAND_ROUNDS rounds of ``ev``."""
        reads = self.recent_tls_reads.get(ev.tid)
        return bool(reads) and ev.round - reads[-1][0] <= TLS_DEMAND_ROUNDS

    def summary_reported(self, rr: RequestRecord, tid: int, start_ns: int, end_ns: int) -> None:
        """A downstream request reported as one record (read at ``start_ns``, answered at ``end_ns``): it
        takes the upstream request it caused, which waited for it."""
        self.parked.claim(rr, tid, start_ns, end_ns, by_line_only=self.exact_only)

    def upstream_request_done(self, up: UpstreamRecord, exchange: HttpExchange) -> UnpairedRequest | None:
        """An upstream request ended: where its span goes when it was not paired with a downstream
        request (a paired one is exported with its downstream request), else None."""
        conn = up.cause.tls_conns.pop(id(exchange.request), None)
        if conn is not None:
            conn.tls.upstream_busy -= 1
        if self.parked.ended(exchange):  # its downstream request, reported later, exports it
            return None
        return up.cause.unpaired.pop(id(exchange.request), None)

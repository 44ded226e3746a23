"""Envoy's upstream connections: connect, the active open (SYN_SENT -> ESTABLISHED), HTTP, close.

The SYN_SENT state change fires inside the target's connect(), before its exit names the fd: it waits per
thread until that exit. From then on the kernel socket address ties TCP events to the connection (at
SYN_SENT no local port is chosen yet, so the 4-tuple cannot). HTTP that Envoy writes upstream is parsed,
and each request is handed to the attribution to find the downstream request that caused it.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass

from ..events.layout import load_layout
from ..events.types import CloseEvent, ConnectEvent, DataEvent, SockStateEvent
from ..protocols.http import HttpExchange
from ..protocols.http1 import Http1Exchanges
from .addresses import format_ip
from .attribution import UpstreamAttribution
from .http_feed import feed_http, upstream_parser
from .identity import IdSource, thread_name
from .records import TcpConnect, UnpairedRequest, UpstreamRecord

__all__ = ["OnUpstreamRequest", "SynSent", "UpstreamConnections"]

_C = load_layout().constants
DIR_READ = _C["DIR_READ"]
TCP_SYN_SENT, TCP_ESTABLISHED, TCP_FIN_WAIT1 = _C["TCP_SYN_SENT"], _C["TCP_ESTABLISHED"], _C["TCP_FIN_WAIT1"]
TCP_CLOSE, TCP_CLOSE_WAIT = _C["TCP_CLOSE"], _C["TCP_CLOSE_WAIT"]
EINPROGRESS = 115

OnUpstreamRequest = Callable[[UpstreamRecord, HttpExchange, UnpairedRequest], None]


@dataclass(slots=True)
class SynSent:
    """A SYN_SENT seen inside a thread's connect(), waiting for the connect's exit to name the fd."""

    ts_ns: int
    sock: int  # kernel socket address
    local_address: str
    local_port: int
    established_ns: int | None = None  # over loopback the handshake may complete inside connect()
    failed_ns: int | None = None  # ... or be refused there


class UpstreamConnections:
    """Open upstream connections by (tgid, fd) and by kernel socket, and the closed ones lingering.

    ``on_upstream`` receives each connection once, after it ended; ``on_upstream_request`` each request no
    downstream request was found for. Bounded like the downstream table.
    """

    def __init__(self, *, attribution: UpstreamAttribution, ids: IdSource, stats: Counter[str],
                 drops: Counter[str], on_upstream: Callable[[UpstreamRecord], None] | None,
                 on_upstream_request: OnUpstreamRequest | None, http: bool, max_connections: int,
                 max_pending: int, linger_ns: int) -> None:
        self.attribution = attribution
        self.ids = ids
        self.stats = stats
        self.drops = drops
        self.on_upstream = on_upstream
        self.on_upstream_request = on_upstream_request
        self.http = http
        self.max_connections = max_connections
        self.max_pending = max_pending
        self.linger_ns = linger_ns
        self.open: dict[tuple[int, int], UpstreamRecord] = {}  # (tgid, fd) -> upstream
        self.by_sock: dict[int, UpstreamRecord] = {}  # kernel socket address -> upstream
        self.closing: deque[UpstreamRecord] = deque()  # closed, lingering; oldest end first
        self.syn_sent: dict[int, SynSent] = {}  # tid -> the SYN_SENT inside its connect()

    def find(self, sock: int) -> UpstreamRecord | None:
        """The open or lingering upstream connection of a kernel socket."""
        return self.by_sock.get(sock)

    # ------------------------------------------------------------------ connect and TCP

    def on_connect(self, ev: ConnectEvent) -> None:
        """The target's connect() to an inet address returned."""
        if not ev.family:
            return
        key = (ev.tgid, ev.fd)
        stale = self.open.pop(key, None)
        if stale is not None:
            stale.close_ns = ev.ts_ns
            self.drops["upstream_fd_reused_without_close"] += 1
            self._close(stale)
        if len(self.open) >= self.max_connections:
            _, victim = next(iter(self.open.items()))
            self.open.pop((victim.tgid, victim.fd))
            victim.still_open, victim.close_ns = True, ev.ts_ns
            self.drops["upstream_table_full"] += 1
            self._close(victim)
        ids = self.ids
        trace_id, span_id = ids.trace_id(), ids.span_id()
        up = UpstreamRecord(
            tgid=ev.tgid, fd=ev.fd, tid=ev.tid,
            thread_name=thread_name(ev.comm),
            peer_address=format_ip(ev.family, ev.peer_addr), peer_port=ev.peer_port,
            trace_id=trace_id, span_id=span_id, connect=TcpConnect(ev.ts_ns, ev.ret, ids.span_id()),
        )
        syn = self.syn_sent.pop(ev.tid, None)
        if syn is not None:
            up.connect.syn_sent_ns, up.connect.sock = syn.ts_ns, syn.sock
            up.local_address, up.local_port = syn.local_address, syn.local_port
            up.tcp.established_ns, up.connect.failed_ns = syn.established_ns, syn.failed_ns
            self.by_sock[syn.sock] = up
        self.attribution.on_connect(up, ev)
        if ev.ret not in (0, -EINPROGRESS):  # refused at once: nothing more will happen on it
            up.connect.failed_ns = up.connect.failed_ns or ev.ts_ns
            up.close_ns = ev.ts_ns
            self._close(up)
            return
        self.open[key] = up

    def on_sock_state(self, ev: SockStateEvent) -> bool:
        """A TCP state change: True when it was an upstream connection's (or its connect's)."""
        new = ev.newstate
        if new == TCP_SYN_SENT:  # inside the target's connect(): its exit names the fd
            self.syn_sent[ev.tid] = SynSent(ev.ts_ns, ev.skaddr, format_ip(ev.family, ev.saddr), ev.sport)
            if len(self.syn_sent) > self.max_pending:
                self.syn_sent.pop(next(iter(self.syn_sent)))
            return True
        if ev.oldstate == TCP_SYN_SENT and new in (TCP_ESTABLISHED, TCP_CLOSE):
            # over loopback the handshake completes (or is refused) inside connect(), before its exit
            # names the fd
            pending = self.syn_sent.get(ev.tid)
            if pending is not None and pending.sock == ev.skaddr:
                pending.local_address, pending.local_port = format_ip(ev.family, ev.saddr), ev.sport
                if new == TCP_ESTABLISHED:
                    pending.established_ns = ev.ts_ns
                else:
                    pending.failed_ns = ev.ts_ns
                return True
        up = self.by_sock.get(ev.skaddr)
        if up is None:
            return False
        if not up.local_port:
            up.local_address, up.local_port = format_ip(ev.family, ev.saddr), ev.sport
        tcp = up.tcp
        if new == TCP_ESTABLISHED and tcp.established_ns is None:
            tcp.established_ns = ev.ts_ns
        elif new == TCP_CLOSE and ev.oldstate == TCP_SYN_SENT:
            up.connect.failed_ns = ev.ts_ns
        elif new == TCP_CLOSE_WAIT and tcp.peer_fin_ns is None:
            tcp.peer_fin_ns = ev.ts_ns
        elif new == TCP_FIN_WAIT1 and tcp.envoy_fin_ns is None:
            tcp.envoy_fin_ns = ev.ts_ns
        return True

    # ------------------------------------------------------------------ data and close

    def on_data(self, ev: DataEvent) -> None:
        """A read or write on a connection Envoy opened."""
        up = self.open.get((ev.tgid, ev.fd))
        if up is None:
            return
        http = up.http
        if ev.msg_seq != http.next_seq:  # records lost: HTTP/1 parsing restarts at the next message
            self.drops["upstream_data_records_lost"] += max(1, ev.msg_seq - http.next_seq)
            if isinstance(http.parser, Http1Exchanges):
                for exchange in http.parser.records_lost():
                    self._request_done(up, exchange)
        http.next_seq = ev.msg_seq + 1
        if ev.ret <= 0:
            if ev.ret == 0 and ev.direction == DIR_READ and up.tcp.eof_ns is None:
                up.tcp.eof_ns = ev.ts_ns
            return
        if http.parser is None and not http.not_http:
            # an HTTP request first, written by Envoy; else TLS or a server-first protocol
            if self.http and ev.direction != DIR_READ:
                http.parser = upstream_parser(ev.data)
            http.not_http = http.parser is None
        parser = http.parser
        if parser is None:
            return
        if not feed_http(parser, ev):
            return
        if ev.direction != DIR_READ:
            for msg in parser.take_new_requests():
                http.requests += 1
                self.attribution.pair(up, msg, ev)
        if parser.completed:
            for exchange in parser.take_completed():
                self._request_done(up, exchange)

    def on_close(self, ev: CloseEvent) -> None:
        """Envoy closed an upstream connection's fd: it lingers, then is emitted."""
        up = self.open.pop((ev.tgid, ev.fd), None)
        if up is not None:
            up.close_ns = ev.ts_ns
            up.traffic.bytes_received, up.traffic.bytes_sent = ev.bytes_rx, ev.bytes_tx
            self._close(up)

    def end_process(self, tgid: int, ts_ns: int) -> None:
        """Process ``tgid`` exited: its open connections end there, with ``end_reason`` "process_exited"."""
        for key in [k for k in self.open if k[0] == tgid]:
            up = self.open.pop(key)
            up.close_ns = max(ts_ns, up.connect.ns)
            up.end_reason = "process_exited"
            self._close(up)

    def _request_done(self, up: UpstreamRecord, exchange: HttpExchange) -> None:
        unpaired = self.attribution.upstream_request_done(up, exchange)
        if unpaired is not None and self.on_upstream_request is not None:
            self.on_upstream_request(up, exchange, unpaired)
        # paired ones are exported with their downstream request (RequestRecord.upstream)

    def _end_requests(self, up: UpstreamRecord, ts_ns: int) -> None:
        if up.http.parser is not None:
            for exchange in up.http.parser.finish(ts_ns):
                self._request_done(up, exchange)

    def _close(self, up: UpstreamRecord) -> None:
        self._end_requests(up, up.end_ns)
        self.closing.append(up)

    # ------------------------------------------------------------------ output

    def expire(self, now_ns: int) -> None:
        """Emit connections that ended more than ``linger_ns`` before ``now_ns``."""
        closing, linger = self.closing, self.linger_ns
        while closing and closing[0].end_ns + linger <= now_ns:
            self._finish(closing.popleft())

    def flush(self, now_ns: int) -> None:
        """End everything: closed connections as they are, open ones at ``now_ns`` as still open."""
        while self.closing:
            self._finish(self.closing.popleft())
        for up in list(self.open.values()):
            up.still_open = True
            up.close_ns = max(now_ns, up.connect.ns)
            self._end_requests(up, up.close_ns)
            self._finish(up)
        self.open.clear()

    def _finish(self, up: UpstreamRecord) -> None:
        if self.by_sock.get(up.connect.sock) is up:
            del self.by_sock[up.connect.sock]
        self.stats["upstream_connections"] += 1
        if self.on_upstream is not None:
            self.on_upstream(up)

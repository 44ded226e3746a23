"""Downstream connections of the target processes, from accept to close (and a linger after it).

How events of one connection find each other:
  * syscall events (accept, reads, writes, epoll_ctl, setsockopt, close) carry (tgid, fd);
  * TCP events (state changes, retransmits, resets) fire in softirq context of other processes and carry
    only the 4-tuple, so connections are also indexed by (peer address, peer port, local port);
  * the TCP handshake completes before Envoy accepts: the accept takes that from the accept queue.
The listener hand-off (listener filters done, the fd registered for the filter chain) shows in epoll_ctl:
a second ADD of the fd, else the first ADD once real I/O started. The first bytes read say whether the
connection is TLS (its handshake is followed) or plaintext (parsed as HTTP from its first real read).
A closed connection lingers for ``linger_ns`` (events of the close itself, like Envoy's FIN or a reset,
arrive right after the close syscall; CPUs may deliver slightly out of order) and is then emitted.
"""

from __future__ import annotations

from collections import Counter, OrderedDict, deque
from collections.abc import Callable

from ..envoy.filter_chains import ConnectionFacts, FilterChainIndex
from ..envoy.listen_socket import ListenSocket
from ..events.layout import load_layout
from ..events.recording_context import AdoptedConnection
from ..events.types import (
    AcceptEvent,
    CloseEvent,
    ConnectionKeptEvent,
    DataEvent,
    RequestKeptEvent,
    SockStateEvent,
)
from ..protocols.detect import Protocol, detect_protocol, is_tls_record
from ..protocols.http1 import Http1Exchanges
from ..protocols.tls.handshake import TlsHandshakeTracker
from .accept_queue import AcceptQueue, TupleKey
from .addresses import format_ip
from .attribution import UpstreamAttribution
from .downstream_requests import DownstreamRequests
from .http_feed import downstream_parser
from .identity import IdSource, thread_name
from .kept_connections import KEEP_CONN_SAMPLED, KEPT_OPEN, accept_of, close_of, kept_reason
from .records import AcceptQueueDepth, ConnectionRecord, ListenerHandoff, TcpMark, TlsRecordCounts
from .round_tracker import RoundTracker

__all__ = ["DownstreamConnections"]

_C = load_layout().constants
DIR_READ, DATA_FLAG_PEEK = _C["DIR_READ"], _C["DATA_FLAG_PEEK"]
TLS_FRAMING_SEEN, TLS_FRAMING_LOST_RX, TLS_FRAMING_LOST_TX = (
    _C["TLS_FRAMING_SEEN"], _C["TLS_FRAMING_LOST_RX"], _C["TLS_FRAMING_LOST_TX"])
TCP_ESTABLISHED, TCP_SYN_RECV, TCP_FIN_WAIT1 = _C["TCP_ESTABLISHED"], _C["TCP_SYN_RECV"], _C["TCP_FIN_WAIT1"]
TCP_CLOSE, TCP_CLOSE_WAIT = _C["TCP_CLOSE"], _C["TCP_CLOSE_WAIT"]
SOCKOPTS_KEPT = _C["SOCKOPTS_KEPT"]  # what a close record carries of them
WILDCARDS = ("0.0.0.0", "::")


_HTTP1_VERSION = {b"HTTP/1.0": "http/1.0", b"HTTP/1.1": "http/1.1"}


def plaintext_alpn(protocol: Protocol, first_bytes: bytes) -> str | None:
    """What Envoy's http_inspector would set as a plaintext connection's application protocol from its
    first bytes: "h2c", "http/1.0" or "http/1.1" from the request line, "" when it is not HTTP (or TLS);
    None: no bytes."""
    if protocol is Protocol.UNKNOWN:
        return None
    if protocol is Protocol.H2C:
        return "h2c"
    if protocol is Protocol.HTTP1:
        line = first_bytes.split(b"\r\n", 1)[0]
        return _HTTP1_VERSION.get(line[-8:], "") if len(line) < len(first_bytes) else ""
    return ""


def connection_facts(conn: ConnectionRecord) -> ConnectionFacts:
    """What a connection showed, for deciding its filter chain."""
    handshake = conn.tls.handshake
    hello = handshake.client_hello if handshake is not None else None
    known = conn.protocol is not None and conn.protocol is not Protocol.UNKNOWN
    return ConnectionFacts(
        destination_address=conn.local_address,
        destination_port=conn.local_port,
        source_address=conn.peer_address,
        source_port=conn.peer_port,
        tls=(conn.protocol is Protocol.TLS) if known else None,
        server_name=(hello.server_name or "") if hello is not None else None,
        alpn=tuple(hello.alpn) if hello is not None else None,
        plaintext_alpn=conn.plaintext_alpn,
    )


def _settle_handoff(listener: ListenerHandoff, ts_ns: int) -> None:
    """First real I/O: the hand-off happened by then. Its exact time, the fd's epoll ADD, comes with the
    close record (DownstreamConnections.on_close); a connection that never closes keeps this one."""
    if listener.first_io_ns is None:
        listener.first_io_ns = ts_ns
        if listener.handoff_ns is None:
            listener.handoff_ns = ts_ns


#: How many of the daemon's own peers are remembered (it makes one admin call at a time, every few seconds).
MAX_OWN_PEERS = 64
#: Listening sockets inferred between two rescans (a few per process start or hot restart).
MAX_INFERRED_LISTENERS = 4096


class DownstreamConnections:
    """Open downstream connections by (tgid, fd) and by 4-tuple, and the closed ones lingering.

    ``on_finished`` receives each connection once, after it ended. Bounded: when the table is full the
    oldest connection is evicted (emitted as still open) and counted in ``drops``.
    """

    def __init__(self, on_finished: Callable[[ConnectionRecord], None], *, accept_queue: AcceptQueue,
                 requests: DownstreamRequests, attribution: UpstreamAttribution, rounds: RoundTracker | None,
                 ids: IdSource, stats: Counter[str], drops: Counter[str], http: bool, max_connections: int,
                 linger_ns: int) -> None:
        self.on_finished = on_finished
        self.accept_queue = accept_queue
        self.requests = requests
        self.attribution = attribution
        self.rounds = rounds
        self.ids = ids
        self.stats = stats
        self.drops = drops
        self.http = http
        self.max_connections = max_connections
        self.linger_ns = linger_ns
        self.listen_sockets: dict[tuple[int, int], ListenSocket] = {}  # (tgid, listen fd) -> socket
        #: sockets accepted on before the table above had them (_listen_socket), until the next table
        self.inferred_listeners: dict[tuple[int, int], ListenSocket] = {}
        #: (tgid, fd) -> the address and port the kernel saw the process bind that socket to (startup.py)
        self.bound_address: Callable[[int, int], tuple[str, int] | None] = lambda _tgid, _fd: None
        #: listening sockets a TLS connection came through: (tgid, listen fd) -> port. The kernel samples
        #: their connections whole (the daemon tells it, through ``on_tls_listener``), as it cannot see
        #: their requests.
        self.tls_listeners: dict[tuple[int, int], int] = {}
        #: called with a listening socket's key and port the moment it is found to be a TLS one
        self.on_tls_listener: Callable[[tuple[int, int], int], None] | None = None
        self.listener_names: dict[tuple[str, int], str] = {}  # (address, port) -> Envoy listener name
        self.filter_chains: FilterChainIndex | None = None  # what selects the listeners' filter chains
        #: peers (address, port) the daemon's own connections come from (its admin API calls), newest last
        self.own_peers: OrderedDict[tuple[str, int], None] = OrderedDict()
        #: (tgid, tid, thread name, listening fd) -> accepts that reached user space
        self.accepts_by_thread: Counter[tuple[int, int, str, int]] = Counter()
        self.open: dict[tuple[int, int], ConnectionRecord] = {}  # (tgid, fd) -> connection
        self.by_tuple: dict[TupleKey, ConnectionRecord] = {}
        self.closing: deque[ConnectionRecord] = deque()  # closed, lingering; oldest close first

    def set_listen_sockets(self, sockets: dict[tuple[int, int], ListenSocket]) -> None:
        """Replace the (tgid, listen fd) -> listening socket table (from /proc), naming each socket's
        listener when the admin API did."""
        self.listen_sockets = self._named(sockets)
        self.inferred_listeners = {}

    def set_listener_names(self, names: dict[tuple[str, int], str]) -> None:
        """Replace the (address, port) -> Envoy listener name table (from the admin API)."""
        self.listener_names = dict(names)
        self.listen_sockets = self._named(self.listen_sockets)

    def _named(self, sockets: dict[tuple[int, int], ListenSocket]) -> dict[tuple[int, int], ListenSocket]:
        """A new table (the metrics thread reads the old one whole) with listener names filled in."""
        out = {}
        for key, s in sockets.items():
            name = self.listener_name(s.address, s.port)
            out[key] = s if name == s.listener_name else ListenSocket(s.address, s.port, name)
        return out

    def add_own_peer(self, address: str, port: int) -> None:
        """The daemon is about to connect from ``address:port`` to a traced Envoy: that connection is its
        own, and no span is made of it (bounded: the oldest entries go first)."""
        self.own_peers[(address, port)] = None
        self.own_peers.move_to_end((address, port))
        while len(self.own_peers) > MAX_OWN_PEERS:
            self.own_peers.popitem(last=False)

    def is_own(self, conn: ConnectionRecord) -> bool:
        """Whether ``conn`` is one of the daemon's own connections."""
        if not conn.own and self.own_peers and (conn.peer_address, conn.peer_port) in self.own_peers:
            conn.own = True
        return conn.own

    def find(self, tkey: TupleKey) -> ConnectionRecord | None:
        """The open or lingering connection of a 4-tuple (peer address, peer port, local port)."""
        return self.by_tuple.get(tkey)

    # ------------------------------------------------------------------ accept

    def on_accept(self, ev: AcceptEvent) -> None:
        """accept() returned a new connection's fd to Envoy."""
        self.stats["accepts"] += 1
        key = (ev.tgid, ev.fd)
        stale = self.open.pop(key, None)
        if stale is not None:  # the close of the previous user of this fd was never seen
            stale.partial.append("close_not_seen")
            stale.close_ns = ev.ts_ns
            self.drops["fd_reused_without_close"] += 1
            self.requests.end(stale, ev.ts_ns)
            self._finish(stale)
        if len(self.open) >= self.max_connections:
            _, victim = next(iter(self.open.items()))
            self.open.pop((victim.tgid, victim.fd))
            victim.partial.append("evicted")
            victim.still_open = True
            victim.close_ns = ev.ts_ns
            self.drops["connection_table_full"] += 1
            self._end_requests_evicted(victim, ev.ts_ns)
            self._finish(victim)
        peer = format_ip(ev.family, ev.peer_addr) if ev.family else ""
        listen = self._listen_socket(ev.tgid, ev.listen_fd, peer, ev.peer_port)
        conn = ConnectionRecord(
            tgid=ev.tgid,
            fd=ev.fd,
            tid=ev.tid,
            thread_name=thread_name(ev.comm),
            listen_fd=ev.listen_fd,
            peer_address=peer,
            peer_port=ev.peer_port,
            local_port=listen.port if listen else 0,
            accept_ns=ev.ts_ns,
            trace_id=self.ids.trace_id(),
            span_id=self.ids.span_id(),
            chain_index=self.filter_chains,
        )
        if listen is None:
            conn.partial.append("listener_unknown")
        elif listen.address not in WILDCARDS:
            conn.local_address = listen.address
        entry, depth, synacks = self.accept_queue.accept(peer, ev.peer_port, conn.local_port)
        if entry is not None:
            conn.tcp.established_ns = entry.established_ns
            conn.local_address = entry.local_address
            conn.accept_queue = AcceptQueueDepth(depth, entry.depth_on_arrival)
        elif ev.established_ns:  # no ESTABLISHED record (a listener sampled whole): the accept carries it
            conn.tcp.established_ns = ev.established_ns
            if ev.local_family:
                conn.local_address = format_ip(ev.local_family, ev.local_addr)
            conn.accept_queue = self.accept_queue.accepted(conn.local_port, ev.established_ns, ev.ts_ns)
        if synacks:
            conn.tcp.marks.extend(TcpMark(ts, "tcp.synack_retransmit") for ts in synacks)
        if conn.local_address is not None:
            conn.listener_name = self.listener_name(conn.local_address, conn.local_port)
        elif listen is not None:
            conn.listener_name = listen.listener_name  # named when the table was set (_named)
        self.open[key] = conn
        self.by_tuple[(peer, ev.peer_port, conn.local_port)] = conn
        self.accepts_by_thread[(ev.tgid, ev.tid, conn.thread_name, ev.listen_fd)] += 1

    def adopt(self, open_conn: AdoptedConnection, ts_ns: int) -> None:
        """A connection accepted before the daemon started, tracked from ``ts_ns`` on (its accept, TCP
        handshake, listener filters and TLS handshake are not known): ``adopted``, accepted at ``ts_ns``."""
        key = (open_conn.tgid, open_conn.fd)
        if key in self.open:  # accepted since the programs were attached: that record is the right one
            return
        if len(self.open) >= self.max_connections:
            self.drops["connection_table_full"] += 1
            return
        conn = ConnectionRecord(
            tgid=open_conn.tgid, fd=open_conn.fd, tid=0, thread_name="", listen_fd=open_conn.listen_fd,
            peer_address=open_conn.peer_address, peer_port=open_conn.peer_port,
            local_port=open_conn.local_port, accept_ns=ts_ns, local_address=open_conn.local_address,
            trace_id=self.ids.trace_id(), span_id=self.ids.span_id(), chain_index=self.filter_chains,
            adopted=True)
        conn.listener_name = self.listener_name(open_conn.local_address, open_conn.local_port)
        self.open[key] = conn
        self.by_tuple[(conn.peer_address, conn.peer_port, conn.local_port)] = conn
        self.stats["adopted"] += 1

    def _listen_socket(self, tgid: int, fd: int, peer: str, peer_port: int) -> ListenSocket | None:
        """The listening socket a connection was accepted from: the table read from /proc. A socket the
        table does not have yet (accepted on before the daemon's rescan after its ``listen()``) is known
        from what the kernel reported: its bind, when the process was seen binding it (it just started);
        else the handshake queued for this peer, on a port with one listening address among the other
        processes' sockets (an Envoy hot restart: the new process accepts on the sockets the old one
        handed over, which it never bound). Counted ``listeners_inferred``."""
        key = (tgid, fd)
        listen = self.listen_sockets.get(key) or self.inferred_listeners.get(key)
        if listen is not None:
            return listen
        found = self.bound_address(tgid, fd)
        if found is None:
            port = self.accept_queue.port_of(peer, peer_port)
            listening = {(s.address, s.port) for s in self.listen_sockets.values() if s.port == port}
            found = listening.pop() if len(listening) == 1 else None
        if found is None:
            return None
        if len(self.inferred_listeners) >= MAX_INFERRED_LISTENERS:
            self.inferred_listeners.clear()
        listen = self.inferred_listeners[key] = ListenSocket(found[0], found[1], self.listener_name(*found))
        self.stats["listeners_inferred"] += 1
        return listen

    def listen_socket(self, tgid: int, fd: int) -> ListenSocket | None:
        """The listening socket (tgid, fd), from the /proc table or inferred at an accept."""
        return self.listen_sockets.get((tgid, fd)) or self.inferred_listeners.get((tgid, fd))

    def listener_name(self, address: str, port: int) -> str | None:
        """Envoy's name of the listener on address:port (its wildcard address too), when known."""
        names = self.listener_names
        return names.get((address, port)) or names.get(("0.0.0.0", port)) or names.get(("::", port))

    # ------------------------------------------------------------------ I/O

    def on_data(self, ev: DataEvent) -> None:
        """A read or write (hot path: most events are these)."""
        conn = self.open.get((ev.tgid, ev.fd))
        if conn is None:
            return
        if ev.msg_seq != conn.http.next_seq:
            self._records_lost(conn, ev)
        conn.http.next_seq = ev.msg_seq + 1
        if self.rounds is not None:
            self.rounds.touch(ev.tid, ev.round, conn.trace_id, conn.span_id, conn.fd)
        ret = ev.ret
        if ev.direction == DIR_READ:
            if ret > 0:
                self._on_read(conn, ev)
            elif ret == 0 and conn.tcp.eof_ns is None:
                conn.tcp.eof_ns = ev.ts_ns
            return
        if ret <= 0:
            return
        if conn.listener.first_io_ns is None:
            _settle_handoff(conn.listener, ev.ts_ns)
        handshake = conn.tls.handshake
        if handshake is not None:
            handshake.on_server_data(ev.ts_ns, ev.data, ret)
        elif conn.http.parser is not None:
            self.requests.on_data(conn, ev)

    def _end_requests_evicted(self, conn: ConnectionRecord, ts_ns: int) -> None:
        """``conn`` leaves the table while open: its requests in flight become spans now, counted
        (``requests_in_flight_evicted``); an HTTP/1 one is marked ``records_lost`` (its response may still
        come, unseen)."""
        parser = conn.http.parser
        if parser is None:
            return
        ended = parser.records_lost() if isinstance(parser, Http1Exchanges) else parser.finish(ts_ns)
        self.drops["requests_in_flight_evicted"] += sum(1 for e in ended if e.response is None)
        self.requests.ended(conn, ended)

    def _records_lost(self, conn: ConnectionRecord, ev: DataEvent) -> None:
        """Data records of ``conn`` before ``ev`` never arrived (the kernel counted them as dropped): the
        requests in flight end now, marked, and HTTP/1 parsing restarts at the next message start."""
        self.drops["data_records_lost"] += max(1, ev.msg_seq - conn.http.next_seq)
        if "records_lost" not in conn.partial:
            conn.partial.append("records_lost")
        if isinstance(conn.http.parser, Http1Exchanges):
            self.requests.ended(conn, conn.http.parser.records_lost())

    def _on_read(self, conn: ConnectionRecord, ev: DataEvent) -> None:
        """A read (or MSG_PEEK) that returned bytes."""
        peek = ev.flags & DATA_FLAG_PEEK
        data = ev.data
        listener = conn.listener
        if peek:
            listener.peeks += 1
            if ev.ret > listener.peeked_bytes:
                listener.peeked_bytes = ev.ret
        elif listener.first_io_ns is None:
            _settle_handoff(listener, ev.ts_ns)
        tls = conn.tls
        if conn.protocol is None:
            if conn.adopted and is_tls_record(data):  # mid-stream: past a handshake never seen
                conn.protocol = Protocol.TLS
                self._note_tls_listener(conn)
                return
            conn.protocol = detect_protocol(data)
            conn.plaintext_alpn = plaintext_alpn(conn.protocol, data)
            if conn.protocol is Protocol.TLS:
                tls.handshake = TlsHandshakeTracker()
                self._note_tls_listener(conn)
        handshake = tls.handshake
        if handshake is not None:
            # past the handshake, reads carry no bytes: nothing for the tracker then
            if data or handshake.completed_ns is None:
                was_established = handshake.completed_ns is not None
                handshake.on_client_data(ev.ts_ns, data, ev.ret, peek=bool(peek))
                if not was_established and handshake.completed_ns is not None:
                    tls.ready_round = ev.round
            if not peek:
                self.attribution.note_tls_read(conn, ev)
        elif not peek:
            # requests are parsed from the connection's first real read (listener filters may peek first,
            # and may have seen less of it)
            http = conn.http
            if http.parser is None and self.http and listener.first_io_ns == ev.ts_ns:
                http.parser = downstream_parser(data)
            if http.parser is not None:
                self.requests.on_data(conn, ev)

    def _note_tls_listener(self, conn: ConnectionRecord) -> None:
        """``conn`` speaks TLS: so does its listening socket, and the other workers' sockets of the same
        listener (SO_REUSEPORT: the same address and port in the process). The kernel then samples their
        connections whole."""
        listener_key, port = (conn.tgid, conn.listen_fd), conn.local_port
        if not port or listener_key in self.tls_listeners:
            return
        this = self.listen_socket(*listener_key)
        keys = [listener_key, *(key for key, s in self.listen_sockets.items()
                                if key[0] == conn.tgid and key != listener_key and s.port == port
                                and (this is None or s.address == this.address)
                                and key not in self.tls_listeners)]
        # replaced whole, never changed in place: the daemon reads it from another thread
        self.tls_listeners = {**self.tls_listeners, **dict.fromkeys(keys, port)}
        if self.on_tls_listener is not None:
            for key in keys:
                self.on_tls_listener(key, port)

    def on_connection_kept(self, ev: ConnectionKeptEvent) -> None:
        """A connection the sampler left out, kept by the kernel at its close (a failed or slow TLS
        handshake, a reset, a slow accept): its accept, the handshake bytes the kernel held and its close,
        from one record (correlate/kept_connections.py). Its spans are a traced connection's, marked kept.
        The same record, not kept, is a traced TLS connection's handshake summary: at the handshake's end
        (``KEPT_OPEN``: it stays open, its later records follow) or at its close."""
        key = (ev.tgid, ev.fd)
        summary = ev.reason == KEEP_CONN_SAMPLED
        conn = self.open.get(key) if summary else None  # a summary's accept was reported
        if conn is None:
            self.on_accept(accept_of(ev))
            conn = self.open.get(key)
            if conn is None:
                return
        if summary:
            self.stats["tls_handshake_summaries"] += 1
        else:
            conn.kept = kept_reason(ev.reason)
            self.stats[f"connections_kept_{conn.kept}"] += 1
        if ev.established_ns and conn.tcp.established_ns is None:
            conn.tcp.established_ns = ev.established_ns
        if ev.hs_start_ns:  # its TLS handshake, from the bytes held
            conn.protocol = Protocol.TLS
            handshake = conn.tls.handshake = TlsHandshakeTracker()
            if ev.hello_len:
                handshake.on_client_data(ev.hello_ns, ev.hello[:ev.hello_len], ev.hello_ret,
                                         peek=bool(ev.hello_peeked))
                if ev.hello_peeked:  # a listener filter's look at it (the last one, which the kernel held)
                    conn.listener.peeks += 1
                    conn.listener.peeked_bytes = ev.hello_ret
                if ev.flight_len:
                    handshake.on_server_data(ev.flight_ns, ev.flight[:ev.flight_len], ev.flight_ret)
                if ev.hs_end_ns:
                    handshake.completed_at(ev.hs_end_ns)
            else:  # the table of held bytes was full: its oldest entries went first
                conn.partial.append("handshake_bytes_not_held")
        if summary:  # a traced connection: its records follow, its close record too
            self._handshake_summarized(conn, ev)
            return
        self.on_close(close_of(ev))

    @staticmethod
    def _handshake_summarized(conn: ConnectionRecord, ev: ConnectionKeptEvent) -> None:
        """What a traced connection's handshake records would have set besides the handshake: its first
        real read (the hand-off's time until its close brings the epoll ADD's: the ClientHello's read,
        which came before the server's flight when a listener filter peeked it first) and, when the
        handshake ended (``KEPT_OPEN``), the round it ended in (requests start in later ones)."""
        first_read = ev.flight_ns if ev.hello_peeked and ev.flight_ns else ev.hello_ns
        if first_read:
            _settle_handoff(conn.listener, first_read)
        if ev.close_flags & KEPT_OPEN:
            conn.tls.ready_round = ev.round

    def on_request_kept(self, ev: RequestKeptEvent) -> None:
        """A request the kernel did not sample but kept (a 5xx, closed before an answer, slow)."""
        conn = self.open.get((ev.tgid, ev.fd))
        if conn is None:
            self.stats["kept_requests_without_connection"] += 1
            return
        self.requests.on_kept(conn, ev)

    # ------------------------------------------------------------------ TCP and close

    def on_sock_state(self, ev: SockStateEvent) -> None:
        """A TCP state change of a socket that is not an upstream connection's."""
        local = format_ip(ev.family, ev.saddr)
        peer = format_ip(ev.family, ev.daddr)
        tkey = (peer, ev.dport, ev.sport)
        new = ev.newstate
        if new == TCP_ESTABLISHED and ev.oldstate == TCP_SYN_RECV:
            conn = self.by_tuple.get(tkey)
            if conn is not None:  # already accepted: late (cross-CPU reordering) or a duplicate
                if conn.tcp.established_ns is None and conn.close_ns is None:
                    conn.tcp.established_ns = ev.ts_ns
                    conn.local_address = local
                return
            self.accept_queue.established(ev.ts_ns, peer, ev.dport, local, ev.sport)
            return
        if new == TCP_CLOSE and ev.oldstate == TCP_SYN_RECV:
            self.accept_queue.discard(peer, ev.dport, ev.sport)
            return
        conn = self.by_tuple.get(tkey)
        if conn is None:
            if new == TCP_CLOSE and self.accept_queue.discard(peer, ev.dport, ev.sport):
                self.stats["died_in_accept_queue"] += 1  # an unaccepted connection died in the queue
            return
        if new == TCP_CLOSE_WAIT and conn.tcp.peer_fin_ns is None:
            conn.tcp.peer_fin_ns = ev.ts_ns
        elif new == TCP_FIN_WAIT1 and conn.tcp.envoy_fin_ns is None:
            conn.tcp.envoy_fin_ns = ev.ts_ns

    def on_close(self, ev: CloseEvent) -> None:
        """Envoy closed a downstream connection's fd: it lingers, then is emitted."""
        conn = self.open.pop((ev.tgid, ev.fd), None)
        if conn is None:
            return
        if ev.sampled_out:  # decided whole at its first bytes (h2c, no HTTP), not traced: only counted
            if not ev.kept:
                self._forget_tuple(conn)
                self.stats["connections_sampled_out"] += 1
                return
            # kept all the same (a reset, a slow accept): its span, without what was not reported
            conn.kept = kept_reason(ev.kept)
            conn.partial.append("transfers_not_reported")
            self.stats[f"connections_kept_{conn.kept}"] += 1
        conn.close_ns = ev.ts_ns
        traffic = conn.traffic
        traffic.bytes_received = ev.bytes_rx
        traffic.bytes_sent = ev.bytes_tx
        if ev.tls_flags & TLS_FRAMING_SEEN:
            traffic.tls_records = TlsRecordCounts(
                ev.tls_records_rx, ev.tls_records_tx, ev.tls_app_records_rx, ev.tls_app_records_tx,
                ev.tls_max_record_rx, ev.tls_max_record_tx, bool(ev.tls_flags & TLS_FRAMING_LOST_RX),
                bool(ev.tls_flags & TLS_FRAMING_LOST_TX))
        listener = conn.listener
        if ev.epoll_adds:  # the kernel kept the fd's ADDs before its first real I/O for this record
            listener.first_epoll_add_ns = ev.epoll_first_add_ns
            if ev.epoll_adds >= 2:  # registered again (after a DEL): the second ADD was the hand-off
                listener.saw_epoll_del = True
                listener.handoff_ns = ev.epoll_second_add_ns
            else:  # the one ADD was the hand-off
                listener.handoff_ns = ev.epoll_first_add_ns
        if ev.sockopt_count:
            conn.socket_options = ev.socket_options()
            if ev.sockopt_count > SOCKOPTS_KEPT:
                conn.partial.append("socket_options_not_all_kept")
        # a traced connection decided whole: its peer's FIN and first reset ride on the close record
        if ev.peer_fin_ns and conn.tcp.peer_fin_ns is None:
            conn.tcp.peer_fin_ns = ev.peer_fin_ns
        if ev.reset_rx_ns:
            conn.tcp.add_mark(TcpMark(ev.reset_rx_ns, "tcp.reset_received"))
        self.requests.end(conn, ev.ts_ns)
        self.closing.append(conn)

    def end_process(self, tgid: int, ts_ns: int) -> None:
        """Process ``tgid`` exited: its open connections end there (the kernel closed them; no close of
        Envoy's was seen), with ``end_reason`` "process_exited"."""
        for key in [k for k in self.open if k[0] == tgid]:
            conn = self.open.pop(key)
            conn.close_ns = max(ts_ns, conn.accept_ns)
            conn.end_reason = "process_exited"
            self.requests.end(conn, conn.close_ns)
            self.closing.append(conn)

    # ------------------------------------------------------------------ output

    def expire(self, now_ns: int) -> None:
        """Emit connections that closed more than ``linger_ns`` before ``now_ns``."""
        closing, linger = self.closing, self.linger_ns
        while closing and closing[0].close_ns + linger <= now_ns:  # type: ignore[operator]
            self._finish(closing.popleft())

    def flush(self, now_ns: int) -> None:
        """End everything: closed connections as they are, open ones at ``now_ns`` as still open."""
        while self.closing:
            self._finish(self.closing.popleft())
        for conn in list(self.open.values()):
            conn.still_open = True
            conn.close_ns = max(now_ns, conn.accept_ns)
            self.requests.end(conn, conn.close_ns)
            self._finish(conn)
        self.open.clear()

    def _forget_tuple(self, conn: ConnectionRecord) -> None:
        """``conn`` no longer answers for its 4-tuple (unless a newer connection already took it)."""
        tkey = (conn.peer_address, conn.peer_port, conn.local_port)
        if self.by_tuple.get(tkey) is conn:
            del self.by_tuple[tkey]

    def _finish(self, conn: ConnectionRecord) -> None:
        self._forget_tuple(conn)
        if conn.tcp.established_ns is None and not conn.adopted:
            conn.partial.append("established_not_seen")
        if self.is_own(conn):
            self.own_peers.pop((conn.peer_address, conn.peer_port), None)
        if conn.chain_index is not None:
            conn.filter_chain = conn.chain_index.choose(conn.listener_name, connection_facts(conn))
        self.stats["connections"] += 1
        self.on_finished(conn)

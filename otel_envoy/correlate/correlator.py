"""The correlator: typed kernel events in, finished connection, request and round records out.

It only dispatches each event to the part that owns the state it changes, and wires the parts together:
  * :mod:`.downstream`: downstream connections, accept to close (and their listener hand-off, TLS, I/O);
  * :mod:`.accept_queue`: connections established but not accepted yet, per listening port;
  * :mod:`.downstream_requests`: requests parsed on plaintext downstream connections;
  * :mod:`.tls_plaintext`: the plaintext of TLS connections from the uprobe tier, to their HTTP parser;
  * :mod:`.upstream`: connections Envoy opened, and the requests it wrote on them;
  * :mod:`.attribution`: which downstream request (or TLS connection) caused an upstream one;
  * :mod:`.round_tracker`: event-loop rounds and off-CPU waits, tied to the connections they handled;
  * :mod:`.startup`: how each process set up its listening sockets (its start, listener changes).
Everything is bounded: when a table is full the oldest entry is evicted and counted in ``drops``.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable
from typing import Any

from ..envoy.filter_chains import FilterChainIndex
from ..envoy.listen_socket import ListenSocket
from ..events.layout import load_layout
from ..events.recording_context import AdoptedContext
from ..events.types import CloseEvent, DataEvent, Event, ProcessEvent, SockStateEvent, TcpEvent
from .accept_queue import AcceptQueue
from .addresses import format_ip
from .attribution import UpstreamAttribution
from .downstream import DownstreamConnections
from .downstream_requests import DownstreamRequests, OnRequest
from .identity import IdSource
from .records import ConnectionRecord, TcpMark, UpstreamRecord
from .round_tracker import RoundRecord, RoundTracker, WaitRecord
from .startup import ProcessStartups, StartupRecord
from .tls_plaintext import DATA_FLAG_TLS_PLAINTEXT, TlsPlaintext
from .upstream import OnUpstreamRequest, UpstreamConnections

__all__ = ["ConnectionCorrelator"]

_C = load_layout().constants
EV_ACCEPT, EV_CLOSE, EV_DATA, EV_CONNECT = _C["EV_ACCEPT"], _C["EV_CLOSE"], _C["EV_DATA"], _C["EV_CONNECT"]
EV_SOCK_STATE, EV_TCP = _C["EV_SOCK_STATE"], _C["EV_TCP"]
EV_OFFCPU, EV_ROUND, EV_REQUEST_KEPT = _C["EV_OFFCPU"], _C["EV_ROUND"], _C["EV_REQUEST_KEPT"]
EV_EXEC, EV_EXIT, EV_SOCKET_SETUP, EV_LISTEN, EV_CONNECTION_KEPT = (
    _C["EV_EXEC"], _C["EV_EXIT"], _C["EV_SOCKET_SETUP"], _C["EV_LISTEN"], _C["EV_CONNECTION_KEPT"])
ROLE_DOWNSTREAM = _C["ROLE_DOWNSTREAM"]
TCP_MARK_NAMES = {
    _C["TCP_RETRANSMIT"]: "tcp.retransmit",
    _C["TCP_RESET_SENT"]: "tcp.reset_sent",
    _C["TCP_RESET_RECEIVED"]: "tcp.reset_received",
    _C["TCP_SYNACK_RETRANSMIT"]: "tcp.synack_retransmit",
}
TCP_STATE_LISTEN = 10  # a reset the listening socket sent: the tracepoint names the listener, not a peer


class ConnectionCorrelator:
    """Builds ConnectionRecords; ``on_finished`` receives each one once, after it ended.

    ``on_request`` gets each downstream request when it ended, ``on_upstream`` each upstream connection,
    ``on_upstream_request`` each upstream request no downstream request was found for; ``on_round`` and
    ``on_wait`` the event-loop rounds the kernel reported and the off-CPU waits outside them (rounds are
    not tracked without ``on_round``). ``http=False`` turns HTTP parsing off.
    """

    def __init__(
        self,
        on_finished: Callable[[ConnectionRecord], None],
        *,
        on_request: OnRequest | None = None,
        on_upstream: Callable[[UpstreamRecord], None] | None = None,
        on_upstream_request: OnUpstreamRequest | None = None,
        on_round: Callable[[RoundRecord], None] | None = None,
        on_wait: Callable[[WaitRecord], None] | None = None,
        on_startup: Callable[[StartupRecord], None] | None = None,
        http: bool = True,
        max_connections: int = 65536,
        max_queued: int = 65536,
        linger_ns: int = 50_000_000,
        rng: random.Random | None = None,
    ) -> None:
        self.linger_ns = linger_ns
        self.latest_ns = 0
        self.drops: Counter[str] = Counter()
        self.stats: Counter[str] = Counter()
        ids = IdSource(rng)
        # which connections each reported event-loop round handled, and the off-CPU waits inside it
        self.rounds = RoundTracker(on_round, on_wait) if on_round is not None else None
        self.accept_queue = AcceptQueue(max_queued=max_queued, drops=self.drops)
        self.attribution = UpstreamAttribution(ids, self.stats, self.drops)
        self.requests = DownstreamRequests(self.attribution, ids, self.stats, on_request)
        self.downstream = DownstreamConnections(
            on_finished, accept_queue=self.accept_queue, requests=self.requests, attribution=self.attribution,
            rounds=self.rounds, ids=ids, stats=self.stats, drops=self.drops, http=http,
            max_connections=max_connections, linger_ns=linger_ns)
        self.upstream = UpstreamConnections(
            attribution=self.attribution, ids=ids, stats=self.stats, drops=self.drops,
            on_upstream=on_upstream, on_upstream_request=on_upstream_request, http=http,
            max_connections=max_connections, max_pending=max_queued, linger_ns=linger_ns)
        self.attribution.parked.on_unclaimed = on_upstream_request  # unclaimed, they leave unpaired
        self.startups = ProcessStartups(on_startup)  # how each process set up its listening sockets
        self.downstream.bound_address = self.startups.bound_address  # listeners the rescan did not find yet
        self.tls_plaintext = TlsPlaintext(self.downstream, self.requests, self.stats, http=http)
        self.accepts_by_thread = self.downstream.accepts_by_thread  # (tgid, tid, name, listen fd) -> n
        self._closing, self._upstream_closing = self.downstream.closing, self.upstream.closing
        self._down_data, self._up_data = self.downstream.on_data, self.upstream.on_data
        self._dispatch: dict[int, Callable[[Event], None]] = {
            EV_ACCEPT: self.downstream.on_accept,  # type: ignore[dict-item]
            EV_CLOSE: self._on_close,  # type: ignore[dict-item]
            EV_CONNECT: self.upstream.on_connect,  # type: ignore[dict-item]
            EV_DATA: self._on_data,  # type: ignore[dict-item]
            EV_SOCK_STATE: self._on_sock_state,  # type: ignore[dict-item]
            EV_TCP: self._on_tcp,  # type: ignore[dict-item]
            EV_REQUEST_KEPT: self.downstream.on_request_kept,  # type: ignore[dict-item]
            EV_CONNECTION_KEPT: self.downstream.on_connection_kept,  # type: ignore[dict-item]
            EV_EXEC: self.startups.on_process,  # type: ignore[dict-item]
            EV_EXIT: self._on_exit,  # type: ignore[dict-item]
            EV_SOCKET_SETUP: self.startups.on_setup,  # type: ignore[dict-item]
            EV_LISTEN: self.startups.on_listen,  # type: ignore[dict-item]
        }
        if self.rounds is not None:
            self._dispatch[EV_OFFCPU] = self.rounds.on_offcpu  # type: ignore[assignment]
            self._dispatch[EV_ROUND] = self.rounds.on_round  # type: ignore[assignment]

    # ------------------------------------------------------------------ context from user space

    def set_listen_sockets(self, sockets: dict[tuple[int, int], ListenSocket]) -> None:
        """Replace the (tgid, listen fd) -> listening socket table (from /proc)."""
        self.downstream.set_listen_sockets(sockets)

    def set_listener_names(self, names: dict[tuple[str, int], str]) -> None:
        """Replace the (address, port) -> Envoy listener name table (from the admin API)."""
        self.downstream.set_listener_names(names)

    def set_filter_chains(self, listeners: list[dict[str, Any]]) -> None:
        """Replace what selects each listener's filter chains (``listener_selection_json`` of the admin API's
        configuration dump): connections accepted from now on are decided with it."""
        self.downstream.filter_chains = FilterChainIndex.from_json(listeners)

    def adopt(self, adopted: AdoptedContext) -> None:
        """Connections open before the daemon started, handed to the kernel at ``adopted.ts_ns``: tracked
        from there, their spans marked adopted (see :mod:`..envoy.adoption`)."""
        for conn in adopted.connections:
            self.downstream.adopt(conn, adopted.ts_ns)

    def add_own_peer(self, address: str, port: int) -> None:
        """The daemon's next connection to a traced Envoy comes from ``address:port``: make no span of it."""
        self.downstream.add_own_peer(address, port)

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
        closing, upstream_closing = self._closing, self._upstream_closing
        if (closing and closing[0].close_ns <= due) or (  # type: ignore[operator]
                upstream_closing and upstream_closing[0].end_ns <= due):
            self.expire(latest)

    def expire(self, now_ns: int) -> None:
        """Emit connections that closed more than ``linger_ns`` before ``now_ns``; let go of accept-queue
        entries no accept took."""
        self.requests.count_summaries()
        self.downstream.expire(now_ns)
        self.upstream.expire(now_ns)
        self.accept_queue.expire(now_ns)
        self.startups.expire(now_ns)

    def flush(self, now_ns: int) -> None:
        """End everything: closed connections as they are, open ones at ``now_ns`` as still open."""
        self.downstream.flush(now_ns)
        self.requests.count_summaries()
        self.upstream.flush(now_ns)
        self.attribution.parked.flush()
        self.startups.flush(now_ns)

    def _on_data(self, ev: DataEvent) -> None:
        if ev.flags & DATA_FLAG_TLS_PLAINTEXT:  # the uprobe tier: a TLS connection's plaintext
            self.tls_plaintext.on_data(ev)
        elif ev.role == ROLE_DOWNSTREAM:
            self._down_data(ev)
        else:
            self._up_data(ev)

    def _on_exit(self, ev: ProcessEvent) -> None:
        """A traced process's last thread exited: its open connections end, its startup record too."""
        self.downstream.end_process(ev.tgid, ev.ts_ns)
        self.upstream.end_process(ev.tgid, ev.ts_ns)
        self.startups.on_process(ev)

    def _on_close(self, ev: CloseEvent) -> None:
        if ev.role == ROLE_DOWNSTREAM:
            self.downstream.on_close(ev)
        else:
            self.upstream.on_close(ev)

    def _on_sock_state(self, ev: SockStateEvent) -> None:
        if not self.upstream.on_sock_state(ev):
            self.downstream.on_sock_state(ev)

    def _on_tcp(self, ev: TcpEvent) -> None:
        """A retransmit or reset: a mark on its connection; a SYN-ACK retransmit before the accept waits
        in the accept queue."""
        name = TCP_MARK_NAMES.get(ev.type)
        if name is None:
            return
        tkey = (format_ip(ev.family, ev.daddr), ev.dport, ev.sport)
        conn = self.downstream.find(tkey) or self.upstream.find(ev.skaddr)
        if conn is not None:
            conn.tcp.add_mark(TcpMark(ev.ts_ns, name, ev.state))
            return
        if name == "tcp.synack_retransmit":  # handshake not complete yet: keep until it is
            self.accept_queue.synack_retransmit(ev.ts_ns, tkey)
        elif name == "tcp.reset_sent" and ev.state == TCP_STATE_LISTEN:
            # e.g. to an ACK whose handshake the listener no longer holds: no connection to mark
            self.stats["tcp_resets_sent_by_listener"] += 1
        else:
            self.stats["tcp_marks_without_connection"] += 1

"""The startup trace: one trace per Envoy start (or later burst of listener changes, or its shutdown) with
a span per listening socket, which worker accepts on it, and the times of each step.

``envoy.startup`` (the process's exec to its last step) has one child ``envoy.listen_socket`` per socket:
bound with ``SO_REUSEPORT`` (one per worker) or a duplicate of another one, with events for its bind,
listen and the worker's epoll registration. Steps seen later make an ``envoy.listeners.setup`` trace (a
listener added, drained or removed; or the daemon came after the exec), the closes before the exit an
``envoy.shutdown`` one.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..correlate.addresses import network_type
from ..correlate.startup import SocketSetup, StartupRecord
from ..envoy.listen_socket import ListenSocket
from .model import SPAN_KIND_INTERNAL, STATUS_CODE_ERROR, STATUS_CODE_UNSET, SpanRecord

if TYPE_CHECKING:
    from .connection import ConnectionSpanBuilder

__all__ = ["StartupSpanBuilder"]


def _trace_name(rec: StartupRecord, sockets: list[SocketSetup]) -> str:
    """envoy.startup (from the exec), envoy.shutdown (closes, then the exit) or envoy.listeners.setup."""
    if rec.exec_ns is not None:
        return "envoy.startup"
    only_closes = all(s.carried and s.close_ns is not None and s.listen_ns is None and not s.watches
                      for s in sockets)
    if rec.exited_ns is not None and only_closes:
        return "envoy.shutdown"
    return "envoy.listeners.setup"


class StartupSpanBuilder:
    """Builds startup traces; shares resource, scope and clock with the connection builder.
    ``listener_name(address, port)``: Envoy's name of the listener there, when known.
    ``listen_socket(pid, fd)``: the listening socket the daemon read from /proc, for the address of a
    socket whose bind the kernel did not see (one the process received)."""

    def __init__(self, base: ConnectionSpanBuilder,
                 listener_name: Callable[[str, int], str | None] | None = None,
                 listen_socket: Callable[[int, int], ListenSocket | None] | None = None) -> None:
        self.clock = base.clock
        self._tail_for = base.tail_for  # a process's resource and the other trailing fields
        self._listener_name = listener_name or (lambda _a, _p: None)
        self._listen_socket = listen_socket or (lambda _pid, _fd: None)
        bits = random.Random().getrandbits
        self._new_id = lambda: f"{bits(64) or 1:016x}"
        self._new_trace = lambda: f"{bits(128) or 1:032x}"

    def spans(self, rec: StartupRecord) -> list[SpanRecord]:
        """The root span first, then one span per socket (all inside the root's interval)."""
        offset = self.clock.offset_ns
        trace_id, root_id = self._new_trace(), self._new_id()
        # a received socket that is no TCP listener the daemon knows (a unix one: its bind is not
        # reported) is left out: nothing says it was received rather than bound
        located = [(s, address) for s in rec.sockets
                   if (address := self._address(rec.tgid, s)) or (s.listen_ns is not None and not s.received)]
        sockets = [s for s, _address in located]
        end = max([rec.last_ns, *(s.end_ns for s in sockets)])
        workers = rec.workers
        attrs: dict[str, object] = {
            "process.pid": rec.tgid,
            "process.executable.name": rec.comm,
            "envoy.startup.listen_sockets": sum(1 for s in sockets if s.listen_ns is not None),
            "envoy.startup.workers": len({tid for tid, name in workers if name != rec.comm}),
            "envoy.startup.reuse_port_sockets": sum(1 for s in sockets if s.reuse_port),
            "envoy.startup.duplicated_sockets": sum(1 for s in sockets if s.duplicate_of is not None),
        }
        received = sum(1 for s in sockets if s.received)
        if received:
            attrs["envoy.startup.received_sockets"] = received
        if rec.exec_ns is not None:
            listens = [s.listen_ns for s in sockets if s.listen_ns is not None]
            watches = [w.ts_ns for s in sockets for w in s.watches]
            if listens:
                attrs["envoy.startup.first_listen_ns"] = min(listens) - rec.exec_ns
            if watches:
                attrs["envoy.startup.ready_ns"] = max(watches) - rec.exec_ns
        if rec.exited_ns is not None:
            attrs["envoy.startup.exited"] = True
        if rec.sockets_cut:
            attrs["envoy.startup.sockets_not_kept"] = rec.sockets_cut
        failed = [s for s in sockets if s.bind_error]
        name = _trace_name(rec, sockets)
        tail = self._tail_for(rec.tgid)
        out = [SpanRecord(trace_id, root_id, None, name, SPAN_KIND_INTERNAL, rec.start_ns + offset,
                          end + offset, attrs, [], [],
                          STATUS_CODE_ERROR if failed else STATUS_CODE_UNSET,
                          f"bind failed: {failed[0].address}:{failed[0].port} {failed[0].bind_error}"
                          if failed else "", *tail)]
        out.extend(self._socket_span(trace_id, root_id, s, address, offset, tail) for s, address in located)
        return out

    def _address(self, tgid: int, s: SocketSetup) -> tuple[str, int] | None:
        """Where the socket listens: from its bind (or the socket it copies), else from /proc."""
        if s.address:
            return s.address, s.port
        found = self._listen_socket(tgid, s.fd)
        return (found.address, found.port) if found is not None else None

    def _socket_span(self, trace_id: str, parent: str, s: SocketSetup, address: tuple[str, int] | None,
                     offset: int, tail: tuple) -> SpanRecord:
        attrs: dict[str, object] = {
            "envoy.listen_socket.fd": s.fd,
            "network.transport": "tcp",
            "thread.id": s.tid,
            "thread.name": s.thread_name,
        }
        if address is not None:
            attrs["server.address"], attrs["server.port"] = address
            attrs["network.type"] = network_type(address[0])
            listener = self._listener_name(*address)
            if listener:
                attrs["envoy.listener.name"] = listener
        if s.received:
            attrs["envoy.listen_socket.received"] = True
        if s.reuse_port is not None:
            attrs["envoy.listen_socket.reuse_port"] = s.reuse_port
        if s.duplicate_of is not None:
            attrs["envoy.listen_socket.duplicate_of"] = s.duplicate_of
        if s.backlog is not None:
            attrs["envoy.listen_socket.backlog"] = s.backlog
        if s.watches:
            attrs["envoy.listen_socket.accepted_by"] = [w.thread_name for w in s.watches]
            attrs["envoy.listen_socket.accepted_by_thread_ids"] = [w.tid for w in s.watches]
        if s.bind_error:
            attrs["error.type"] = s.bind_error
        events: list[tuple[int, str, dict[str, object]]] = []
        if s.reuse_port is not None and s.duplicate_of is None and not s.carried:
            events.append((s.start_ns + offset, "setsockopt SO_REUSEPORT", {"value": int(s.reuse_port)}))
        if s.duplicate_of is not None and not s.carried:
            events.append((s.start_ns + offset, "dup", {"envoy.listen_socket.duplicate_of": s.duplicate_of}))
        if s.bind_ns is not None:
            events.append((s.bind_ns + offset, "bind", {"error.type": s.bind_error} if s.bind_error else {}))
        if s.listen_ns is not None:
            events.append((s.listen_ns + offset, "listen", {"envoy.listen_socket.backlog": s.backlog or 0}))
        for w in s.watches:
            events.append((w.ts_ns + offset, "epoll registration",
                           {"thread.id": w.tid, "thread.name": w.thread_name}))
        if s.close_ns is not None:
            events.append((s.close_ns + offset, "close", {}))
        events.sort(key=lambda e: e[0])
        return SpanRecord(trace_id, self._new_id(), parent, "envoy.listen_socket", SPAN_KIND_INTERNAL,
                          s.start_ns + offset, s.end_ns + offset, attrs, events, [],  # type: ignore[arg-type]
                          STATUS_CODE_ERROR if s.bind_error else STATUS_CODE_UNSET,
                          f"bind: {s.bind_error}" if s.bind_error else "", *tail)

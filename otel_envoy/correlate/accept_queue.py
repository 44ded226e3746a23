"""Connections the kernel established that Envoy has not accepted yet, per listening port.

The TCP handshake completes (child socket SYN_RECV -> ESTABLISHED, in softirq context) *before* Envoy
accepts: the connection waits here, keyed by its peer, until the accept with the same peer arrives. A
SYN-ACK the kernel retransmitted belongs to a handshake not complete yet: it is kept with the queued
connection, or, before even that, in a table of its own by 4-tuple, until the accept takes it.

An entry no accept takes (the accept's record was lost, or another network namespace listens on the same
port: the kernel reports every socket's handshakes) would stay forever, inflate the depth of its port's
queue, and give its established time to a later connection from the same client port. So entries older
than :data:`MAX_AGE_NS` are let go (counted ``accept_queue_expired``), and a handshake completing again for
a queued 4-tuple replaces the entry unless it is a duplicate report of the same handshake.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from dataclasses import dataclass

__all__ = ["AcceptQueue", "QueuedConnection", "TupleKey"]

TupleKey = tuple[str, int, int]  # (peer address, peer port, local port)
MAX_EARLY_SYNACKS = 16  # retransmits kept per handshake not established yet
#: How long an established connection may wait for its accept before its entry is let go: longer than any
#: client waits for a connection to be served (connect and request timeouts are seconds to tens of seconds).
MAX_AGE_NS = 60_000_000_000
#: Two reports of one 4-tuple's handshake closer than this are one handshake (the first kept).
DUPLICATE_NS = 1_000_000_000


@dataclass(slots=True)
class QueuedConnection:
    """A connection the kernel established that Envoy has not accepted yet."""

    established_ns: int
    local_address: str
    depth_on_arrival: int  # the port's queue with this one in it, when it joined
    synack_retransmits: list[int]  # times


class AcceptQueue:
    """Per local port: established, not yet accepted connections (bounded; evictions counted in ``drops``)."""

    def __init__(self, *, max_queued: int, drops: Counter[str]) -> None:
        self.max_queued = max_queued
        self.drops = drops
        self.queued: dict[int, OrderedDict[tuple[str, int], QueuedConnection]] = {}  # local port -> queue
        self.early_synack: OrderedDict[TupleKey, list[int]] = OrderedDict()  # SYN-ACK retransmit times

    def established(self, ts_ns: int, peer: str, peer_port: int, local: str, local_port: int) -> None:
        """The handshake of ``peer``:``peer_port`` -> ``local``:``local_port`` completed; not accepted yet."""
        queue = self.queued.setdefault(local_port, OrderedDict())
        self._expire_queue(queue, ts_ns)
        queued = queue.get((peer, peer_port))
        if queued is not None:
            if ts_ns - queued.established_ns < DUPLICATE_NS:  # a duplicate report of a queued one: the first
                return
            del queue[(peer, peer_port)]  # the client port's earlier connection was never seen accepted
            self.drops["accept_queue_expired"] += 1
        if len(queue) >= self.max_queued:
            queue.popitem(last=False)
            self.drops["accept_queue_table_full"] += 1
        early = self.early_synack.pop((peer, peer_port, local_port), None) or []
        queue[(peer, peer_port)] = QueuedConnection(ts_ns, local, len(queue) + 1, early)

    def discard(self, peer: str, peer_port: int, local_port: int) -> bool:
        """The connection died before Envoy accepted it; False when it was not queued."""
        queue = self.queued.get(local_port)
        return queue is not None and queue.pop((peer, peer_port), None) is not None

    def accept(self, peer: str, peer_port: int, local_port: int
               ) -> tuple[QueuedConnection | None, int, list[int]]:
        """Envoy accepted the connection: ``(its queue entry or None, the queue's depth at the accept with
        it included, SYN-ACK retransmit times)``. The retransmits come from the entry, else from the table
        of handshakes never seen established."""
        queue = self.queued.get(local_port)
        entry = queue.pop((peer, peer_port), None) if queue is not None else None
        if entry is not None:
            return entry, len(queue) + 1, entry.synack_retransmits  # type: ignore[arg-type]
        return None, 0, self.early_synack.pop((peer, peer_port, local_port), None) or []

    def port_of(self, peer: str, peer_port: int) -> int | None:
        """The local port of the one queued connection from ``peer``:``peer_port`` (None: none, or
        several: the same client port towards two local ports)."""
        ports = [port for port, queue in self.queued.items() if (peer, peer_port) in queue]
        return ports[0] if len(ports) == 1 else None

    def expire(self, now_ns: int) -> None:
        """Let go of the entries older than :data:`MAX_AGE_NS` (counted ``accept_queue_expired``)."""
        for queue in self.queued.values():
            self._expire_queue(queue, now_ns)
        horizon = now_ns - MAX_AGE_NS
        early = self.early_synack
        while early:
            key, marks = next(iter(early.items()))
            if marks and marks[-1] >= horizon:
                break
            del early[key]

    def _expire_queue(self, queue: OrderedDict[tuple[str, int], QueuedConnection], now_ns: int) -> None:
        horizon = now_ns - MAX_AGE_NS
        while queue:
            entry = next(iter(queue.values()))  # the oldest first (entries join in time order)
            if entry.established_ns >= horizon:
                return
            queue.popitem(last=False)
            self.drops["accept_queue_expired"] += 1

    def synack_retransmit(self, ts_ns: int, tkey: TupleKey) -> None:
        """The kernel retransmitted the SYN-ACK of a connection no accepted connection is known for."""
        queue = self.queued.get(tkey[2])
        entry = queue.get((tkey[0], tkey[1])) if queue else None
        if entry is not None:
            entry.synack_retransmits.append(ts_ns)
            return
        marks = self.early_synack.setdefault(tkey, [])
        if len(marks) < MAX_EARLY_SYNACKS:
            marks.append(ts_ns)
        while len(self.early_synack) > self.max_queued:
            self.early_synack.popitem(last=False)
            self.drops["synack_table_full"] += 1

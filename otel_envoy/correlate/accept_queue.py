"""Connections the kernel established that Envoy has not accepted yet, per listening port.

The TCP handshake completes (child socket SYN_RECV -> ESTABLISHED, in softirq context) *before* Envoy
accepts: the connection waits here, keyed by its peer, until the accept with the same peer arrives. A
SYN-ACK the kernel retransmitted belongs to a handshake not complete yet: it is kept with the queued
connection, or, before even that, in a table of its own by 4-tuple, until the accept takes it.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from dataclasses import dataclass

__all__ = ["AcceptQueue", "QueuedConnection", "TupleKey"]

TupleKey = tuple[str, int, int]  # (peer address, peer port, local port)
MAX_EARLY_SYNACKS = 16  # retransmits kept per handshake not established yet


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
        if (peer, peer_port) in queue:  # a duplicate of a queued one: keep the first
            return
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

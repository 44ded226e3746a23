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

A traced connection of a listener sampled whole sends no ESTABLISHED record: the kernel puts its handshake's
completion on its accept record instead (bpf/sockets.bpf.h). Its depths come from the accepts alone
(:meth:`AcceptQueue.accepted`): two connections of a port were in the queue together when one was
established before the other was accepted, so each accept, compared with the port's recent accepts, adds
to its own counts and to theirs. A connection counts in another's depth once both were accepted; one
accepted after the other's spans were built is not in them, nor is one never accepted (which therefore
never inflates a depth).
"""

from __future__ import annotations

from collections import Counter, OrderedDict, deque
from dataclasses import dataclass

from .records import AcceptQueueDepth

__all__ = ["AcceptQueue", "QueuedConnection", "TupleKey"]

TupleKey = tuple[str, int, int]  # (peer address, peer port, local port)
MAX_EARLY_SYNACKS = 16  # retransmits kept per handshake not established yet
#: How long an established connection may wait for its accept before its entry is let go: longer than any
#: client waits for a connection to be served (connect and request timeouts are seconds to tens of seconds).
MAX_AGE_NS = 60_000_000_000
#: Two reports of one 4-tuple's handshake closer than this are one handshake (the first kept).
DUPLICATE_NS = 1_000_000_000
#: Accepts remembered per local port for the depths of connections whose accept carried their handshake's
#: completion: more than a saturated queue holds while its connections are compared (they are walked newest
#: first, only while they were accepted after the new one's completion).
ACCEPTED_HISTORY = 256


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
        #: local port -> recent accepts that carried their completion: (established, accepted, depths)
        self.accepted_history: dict[int, deque[tuple[int, int, AcceptQueueDepth]]] = {}

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

    def accepted(self, local_port: int, established_ns: int, accept_ns: int) -> AcceptQueueDepth:
        """A connection on ``local_port`` established at ``established_ns`` was accepted at ``accept_ns``, as
        its accept record says (no ESTABLISHED record came): its depths, counted against the port's recent
        accepts of the same kind, whose depths it adds to in turn (the object is updated in place until the
        connection's spans are built). Accepts are taken in the order the records come."""
        depth = AcceptQueueDepth(1, 1)
        history = self.accepted_history.get(local_port)
        if history is None:
            if len(self.accepted_history) >= self.max_queued:
                self.accepted_history.clear()
            history = self.accepted_history[local_port] = deque(maxlen=ACCEPTED_HISTORY)
        for est, acc, other in reversed(history):
            if acc < established_ns:  # accepted before this one was established; so were the older ones
                break
            # Both were in the queue at once: ``other`` was accepted after this one was established.
            if est <= accept_ns < acc:
                depth.at_accept += 1  # the other waited while this one was accepted
            elif established_ns <= acc < accept_ns:
                other.at_accept += 1  # this one waited while the other was accepted
            if est < established_ns:
                depth.on_arrival += 1  # the other was waiting when this one arrived
            elif established_ns < est <= accept_ns:
                other.on_arrival += 1  # this one was waiting when the other arrived
        history.append((established_ns, accept_ns, depth))
        return depth

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

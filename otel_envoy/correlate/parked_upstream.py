"""Upstream requests waiting for the downstream request that caused them, when that one is reported later.

With request summaries (the default) the kernel reports a sampled plaintext HTTP/1.x request as one record at
its answer's first write: after the upstream request Envoy wrote for it, and usually after that one's
response. So an upstream request that no downstream request (nor TLS connection) can be found for when it is
written waits here, on its thread, until a summary claims it: the first waiting request of the same thread
and process written between the downstream request's first read and its answer, with the same request line
(Envoy forwards method and path unless a route rewrites them), else (requests not sampled by a ratio: every
one is traced) the oldest one in that window. One that ended while it waited is exported with the
downstream request that claims it.

What is never claimed (the downstream request was not sampled; its answer never came) leaves after
``PARK_NS`` of event time, or when the thread has ``PARKED_MAX`` waiting, as it would have left unpaired.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from ..protocols.http import HttpExchange, HttpMessage
from .records import RequestRecord, UnpairedRequest, UpstreamRecord

__all__ = ["PARKED_MAX", "PARK_NS", "ParkedUpstreams"]

PARKED_MAX = 16384  # per thread
PARK_NS = 5_000_000_000  # the longest a downstream request's answer may come after its upstream request

Unclaimed = Callable[[UpstreamRecord, HttpExchange, UnpairedRequest], None]
NewUnpaired = Callable[[], UnpairedRequest]


@dataclass(slots=True)
class _Parked:
    up: UpstreamRecord
    msg: HttpMessage
    tgid: int
    ts_ns: int  # when Envoy wrote it
    span_id: str
    exchange: HttpExchange | None = None  # it ended while it waited


class ParkedUpstreams:
    """Per thread, the upstream requests waiting for a downstream request reported after them."""

    def __init__(self, new_unpaired: NewUnpaired, stats: dict) -> None:
        self._new_unpaired = new_unpaired  # where an unclaimed one goes (as if it had never waited)
        self.stats = stats
        self.on_unclaimed: Unclaimed | None = None  # an unclaimed one that had ended: exported unpaired
        self.by_thread: dict[int, deque[_Parked]] = {}  # read by the summaries' path: any waiting?
        self._by_msg: dict[int, _Parked] = {}  # id(upstream request message) -> its entry

    def park(self, up: UpstreamRecord, msg: HttpMessage, tgid: int, tid: int, ts_ns: int,
             span_id: str) -> None:
        """Envoy wrote ``msg`` on ``up`` and no downstream request was found for it (yet)."""
        waiting = self.by_thread.get(tid)
        if waiting is None:
            waiting = self.by_thread[tid] = deque()
        self._age(waiting, ts_ns)
        if len(waiting) >= PARKED_MAX:
            self._leave(waiting.popleft())
        entry = _Parked(up, msg, tgid, ts_ns, span_id)
        waiting.append(entry)
        self._by_msg[id(msg)] = entry
        self.stats["upstream_parked"] += 1

    def ended(self, exchange: HttpExchange) -> bool:
        """An upstream request ended: True when it waits (it goes out with the request that claims it)."""
        entry = self._by_msg.get(id(exchange.request))
        if entry is None:
            return False
        entry.exchange = exchange
        return True

    def claim(self, rr: RequestRecord, tid: int, start_ns: int, end_ns: int, by_line_only: bool) -> None:
        """Downstream request ``rr``, read from ``start_ns`` and answered at ``end_ns`` on thread ``tid``,
        was reported: it takes the upstream request it caused, if one waits."""
        waiting = self.by_thread.get(tid)
        if not waiting:
            return
        req, tgid = rr.request, rr.conn.tgid
        # A thread's entries are in the order of their writes: newest first, only those written while the
        # request was served are looked at (under a ratio, the thread's deque is mostly requests of ones not
        # sampled). The oldest of them with the same request line wins, else the oldest of them.
        found = oldest = None
        last = len(waiting) - 1
        for back, entry in enumerate(reversed(waiting)):
            if entry.ts_ns < start_ns:
                break
            if entry.tgid != tgid or entry.ts_ns > end_ns:
                continue
            oldest = (last - back, entry)
            if (entry.msg.method, entry.msg.path) == (req.method, req.path):
                found = oldest
        if found is None and not by_line_only:
            found = oldest
        if found is None:
            return
        index, entry = found
        del waiting[index]  # near the newest end: a deque rotates from the nearer end
        del self._by_msg[id(entry.msg)]
        rr.upstream.append((entry.up, entry.msg, entry.span_id))
        cause = entry.up.cause
        if cause.request is None and cause.conn is None and start_ns <= entry.up.connect.ns <= end_ns:
            cause.request = rr  # the connection was opened for it
        self.stats["upstream_paired_by_summary"] += 1

    def flush(self) -> None:
        """End of run: everything still waiting leaves unclaimed."""
        for waiting in self.by_thread.values():
            while waiting:
                self._leave(waiting.popleft())

    def _age(self, waiting: deque[_Parked], now_ns: int) -> None:
        while waiting and waiting[0].ts_ns + PARK_NS < now_ns:
            self._leave(waiting.popleft())

    def _leave(self, entry: _Parked) -> None:
        """``entry`` was never claimed: it goes where an unpaired request goes."""
        del self._by_msg[id(entry.msg)]
        self.stats["upstream_parked_unclaimed"] += 1
        unpaired = self._new_unpaired()
        if entry.exchange is None:  # still in flight: it leaves unpaired when it ends
            entry.up.cause.unpaired[id(entry.msg)] = unpaired
        elif self.on_unclaimed is not None:
            self.on_unclaimed(entry.up, entry.exchange, unpaired)

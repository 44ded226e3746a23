"""Event-loop rounds and off-CPU waits of worker threads, tied to the connections they delayed.

The kernel sends a round (EV_ROUND: epoll_wait returned -> next epoll_wait call) only when it lasted
ROUND_MIN_NS or held an off-CPU wait of at least OFFCPU_MIN_NS (EV_OFFCPU); idle waits inside epoll_wait are
only aggregated in the kernel, never sent. Which connections a round handled comes from the data events:
each carries its thread's round number. Rounds of one thread are sequential, so per thread only the
current round's connections and waits are kept; a round the kernel did not send is forgotten when the next
one starts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from ..events.layout import load_layout
from ..events.types import OffcpuEvent, RoundEvent

__all__ = ["OFFCPU_REASONS", "RoundRecord", "RoundTracker", "WaitRecord"]

_C = load_layout().constants
OFFCPU_REASONS = {
    _C["OFFCPU_PREEMPTED"]: "preempted",
    _C["OFFCPU_LOCK"]: "lock",
    _C["OFFCPU_IO"]: "io",
    _C["OFFCPU_IDLE"]: "idle",
    _C["OFFCPU_OTHER"]: "other",
}
MAX_ROUND_CONNECTIONS = 64  # connections remembered per round (a round may serve many)
MAX_ROUND_WAITS = 64
MAX_THREADS = 4096


@dataclass(slots=True)
class WaitRecord:
    """One off-CPU wait of a target thread (kernel stacks and waker as stack ids; resolved later)."""

    tid: int
    round: int  # 0: outside an event-loop round
    start_ns: int
    end_ns: int
    runnable_ns: int
    reason: str
    prev_state: int
    syscall: int
    kstack_id: int
    ustack_id: int
    waker_kstack_id: int
    other_pid: int
    other_tgid: int
    other_comm: str
    cpu: int


@dataclass(slots=True)
class RoundRecord:
    """A round the kernel reported, the connections whose fds it handled and the waits inside it."""

    tgid: int
    tid: int
    round: int
    start_ns: int
    end_ns: int
    ready: int
    offcpu_ns: int
    runnable_ns: int
    waits_in_kernel: int  # all waits, also those below the threshold
    cpu: int
    connections: list[tuple[str, str, int]] = field(default_factory=list)  # (trace id, span id, fd)
    waits: list[WaitRecord] = field(default_factory=list)
    idle_ns: int = 0  # asleep in the epoll_wait that started the round
    waker_kstack_id: int = -1  # who woke it from there (taken for sleeps >= the off-CPU threshold only)
    waker_pid: int = 0
    waker_tgid: int = 0
    waker_comm: str = ""


class _Current:
    __slots__ = ("connections", "round", "waits")

    def __init__(self, round_: int) -> None:
        self.round = round_
        self.connections: list[tuple[str, str, int]] = []
        self.waits: list[WaitRecord] = []


class RoundTracker:
    """Per thread: the current round's connections and waits; emits RoundRecords and unattributed waits."""

    def __init__(self, on_round: Callable[[RoundRecord], None],
                 on_wait: Callable[[WaitRecord], None] | None = None) -> None:
        self.emit_round = on_round
        self.emit_wait = on_wait
        self._threads: dict[int, _Current] = {}
        self.stats: dict[str, int] = {"rounds": 0, "waits": 0, "waits_outside_rounds": 0}

    def _current(self, tid: int, round_: int) -> _Current:
        cur = self._threads.get(tid)
        if cur is None or cur.round != round_:
            if cur is None and len(self._threads) >= MAX_THREADS:
                self._threads.pop(next(iter(self._threads)))
            cur = self._threads[tid] = _Current(round_)
        return cur

    def touch(self, tid: int, round_: int, trace_id: str, span_id: str, fd: int) -> None:
        """A connection's fd was handled in this thread's round ``round_`` (hot path)."""
        if not round_:
            return
        cur = self._threads.get(tid)
        if cur is None or cur.round != round_:
            cur = self._current(tid, round_)
        conns = cur.connections
        if (not conns or conns[-1][1] != span_id) and len(conns) < MAX_ROUND_CONNECTIONS \
                and all(c[1] != span_id for c in conns):
            conns.append((trace_id, span_id, fd))

    def on_offcpu(self, ev: OffcpuEvent) -> None:
        """An off-CPU wait at least OFFCPU_MIN_NS long."""
        self.stats["waits"] += 1
        wait = WaitRecord(
            tid=ev.tid, round=ev.round, start_ns=ev.start_ns, end_ns=ev.ts_ns, runnable_ns=ev.runnable_ns,
            reason=OFFCPU_REASONS.get(ev.reason, "other"), prev_state=ev.prev_state, syscall=ev.syscall,
            kstack_id=ev.kstack_id, ustack_id=ev.ustack_id, waker_kstack_id=ev.waker_kstack_id,
            other_pid=ev.other_pid, other_tgid=ev.other_tgid,
            other_comm=ev.other_comm.split(b"\0", 1)[0].decode(errors="replace"), cpu=ev.cpu)
        if not ev.round:
            self.stats["waits_outside_rounds"] += 1
            if self.emit_wait is not None:
                self.emit_wait(wait)
            return
        cur = self._current(ev.tid, ev.round)
        if len(cur.waits) < MAX_ROUND_WAITS:
            cur.waits.append(wait)

    def on_round(self, ev: RoundEvent) -> None:
        """The kernel reported round ``ev.round`` of ``ev.tid`` (it ended at ``ev.ts_ns``)."""
        self.stats["rounds"] += 1
        cur = self._threads.pop(ev.tid, None)
        if cur is None or cur.round != ev.round:
            cur = _Current(ev.round)
        self.emit_round(RoundRecord(
            tgid=ev.tgid, tid=ev.tid, round=ev.round, start_ns=ev.start_ns, end_ns=ev.ts_ns, ready=ev.ready,
            offcpu_ns=ev.offcpu_ns, runnable_ns=ev.runnable_ns, waits_in_kernel=ev.waits, cpu=ev.cpu,
            connections=cur.connections, waits=cur.waits, idle_ns=ev.idle_ns,
            waker_kstack_id=ev.waker_kstack_id, waker_pid=ev.waker_pid, waker_tgid=ev.waker_tgid,
            waker_comm=ev.waker_comm.split(b"\0", 1)[0].decode(errors="replace")))

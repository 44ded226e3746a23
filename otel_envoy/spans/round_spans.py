"""Event-loop rounds and off-CPU waits -> spans.

Trace shape (in each connection's own trace; a round that served several connections appears in each):

    envoy.downstream.connection
      envoy.event_loop.round        (INTERNAL: epoll_wait returned -> next epoll_wait call)
        offcpu.wait                 (INTERNAL: switched out -> back on CPU, one per wait >= the threshold)

A wait outside any round (the thread was not handling fds) is a root span of its own: it delayed no
connection. Idle waits (inside epoll_wait) never become spans: the kernel only aggregates them (metrics),
by waker for the long ones, and the round that follows a long one names its waker (envoy.event_loop.waker.*).

Stacks are resolved here, never on the event path: whoever drives this builder runs it off the ring-buffer
thread (see pipeline.RoundWorker). ``StackSource`` reads the kernel's stack table; without one (replays)
stack attributes are left out.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

from ..correlate.round_tracker import RoundRecord, WaitRecord
from ..envoy.threads import thread_identity
from .connection import ConnectionSpanBuilder
from .model import SPAN_KIND_INTERNAL, STATUS_CODE_UNSET, SpanRecord

__all__ = ["RoundSpanBuilder", "StackSource", "classify_waker", "idle_wakes_by_kind"]

#: x86-64 syscall numbers a thread blocks in (the kernel side reads them from its saved registers).
SYSCALL_NAMES = {
    0: "read", 1: "write", 2: "open", 3: "close", 4: "stat", 5: "fstat", 6: "lstat", 7: "poll",
    17: "pread64", 18: "pwrite64", 19: "readv", 20: "writev", 23: "select", 35: "nanosleep", 40: "sendfile",
    44: "sendto", 45: "recvfrom", 46: "sendmsg", 47: "recvmsg", 61: "wait4", 74: "fsync", 75: "fdatasync",
    202: "futex", 230: "clock_nanosleep", 232: "epoll_wait", 257: "openat", 262: "newfstatat",
    270: "pselect6", 271: "ppoll", 281: "epoll_pwait", 295: "preadv", 296: "pwritev", 299: "recvmmsg",
    307: "sendmmsg", 327: "preadv2", 328: "pwritev2", 332: "statx", 441: "epoll_pwait2", 449: "futex_waitv",
}

# The seeds' wake-up vocabulary, recognised by functions on the waker's kernel stack (first match wins).
_WAKER_KINDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("futex", ("futex_wake", "futex_requeue", "wake_up_q")),
    ("eventfd", ("eventfd_write", "eventfd_signal")),  # Envoy's internal thread posts (dispatcher.post)
    ("unix_socket", ("unix_stream_sendmsg", "unix_dgram_sendmsg", "unix_stream_connect")),  # xDS agent
    ("udp", ("udp_queue_rcv", "__udp4_lib_rcv", "__udp6_lib_rcv", "udp_rcv", "udpv6_rcv")),  # DNS
    ("tcp", ("tcp_data_queue", "tcp_rcv_established", "tcp_fin", "tcp_v4_rcv", "tcp_v6_rcv",
             "tcp_rcv_state_process", "tcp_done")),  # downstream / upstream data or FIN
    ("pipe", ("pipe_write",)),
    ("signal", ("complete_signal", "signal_wake_up")),
    ("timer", ("hrtimer_wakeup", "hrtimer_interrupt", "__hrtimer_run_queues", "tick_sched", "call_timer_fn",
               "process_timeout")),
)


def classify_waker(kernel_frames: Sequence[str]) -> str:
    """The seeds' category of a wake-up, from the waker's kernel stack (innermost first)."""
    for kind, needles in _WAKER_KINDS:
        for frame in kernel_frames:
            name = frame.split("+", 1)[0]
            if any(name.startswith(n) for n in needles):
                return kind
    return "other"


def idle_wakes_by_kind(
    wakes: Mapping[tuple[int, int, int], tuple[int, int, str]], kernel_frames: Callable[[int], Sequence[str]],
) -> dict[tuple[int, str], tuple[int, int]]:
    """The kernel's idle wake-ups ((tid, waker tgid, waker stack id) -> (ns, wakes, comm), see
    ``ConnectionProbes.idle_wakes``) summed by thread and waker kind: (tid, kind) -> (ns asleep, wakes).
    A stack the kernel could not take (negative id) counts as ``unknown``."""
    out: dict[tuple[int, str], tuple[int, int]] = {}
    for (tid, _tgid, stack_id), (ns, count, _comm) in wakes.items():
        kind = classify_waker(kernel_frames(stack_id)) if stack_id >= 0 else "unknown"
        prev_ns, prev_count = out.get((tid, kind), (0, 0))
        out[tid, kind] = (prev_ns + ns, prev_count + count)
    return out


class StackSource(Protocol):
    """Resolves the kernel's stack ids to frame strings (see otel_envoy.stacks)."""

    def kernel(self, stack_id: int) -> list[str]:
        """Frames of a kernel stack, innermost first ([] when unknown)."""

    def user(self, stack_id: int, tgid: int) -> list[str]:
        """Frames of a user stack of process ``tgid``, innermost first ([] when unknown)."""

    def user_build_ids(self, stack_id: int, tgid: int) -> list[str]:
        """``module=build-id`` for the modules of that stack whose frames could not be named."""


class RoundSpanBuilder:
    """Builds round and wait spans; shares resource, scope, clock and ids with the connection builder."""

    def __init__(self, base: ConnectionSpanBuilder, stacks: StackSource | None = None,
                 identity: Callable[[int], tuple[int, str]] | None = None,
                 new_id: Callable[[], str] | None = None) -> None:
        self.clock = base.clock
        self._tail_for = base.tail_for  # a process's resource and the other trailing fields
        self.stacks = stacks
        self._identity = identity or thread_identity
        self._names: dict[int, tuple[int, str]] = {}
        bits = random.Random().getrandbits
        self._new_id = new_id or (lambda: f"{bits(64) or 1:016x}")

    def _thread(self, tid: int) -> tuple[int, str]:
        known = self._names.get(tid)
        if known is None or not known[1]:
            known = self._identity(tid)
            if len(self._names) > 65536:
                self._names.clear()
            self._names[tid] = known
        return known

    def round_spans(self, rec: RoundRecord) -> list[SpanRecord]:
        """One envoy.event_loop.round per connection it handled, each with its waits as children."""
        if not rec.connections:
            return [s for w in rec.waits for s in self.wait_spans(w, rec.tgid)]
        offset = self.clock.offset_ns
        tgid = rec.tgid or self._thread(rec.tid)[0]
        name = self._thread(rec.tid)[1]
        took = max(rec.end_ns - rec.start_ns, 0)
        attrs: dict[str, object] = {
            "thread.id": rec.tid,
            "thread.name": name,
            "process.pid": tgid,
            "envoy.event_loop.round": rec.round,
            "envoy.event_loop.ready_fds": rec.ready,
            "envoy.event_loop.connections": len(rec.connections),
            "envoy.event_loop.on_cpu_ns": max(took - rec.offcpu_ns, 0),
            "envoy.event_loop.off_cpu_ns": rec.offcpu_ns,
            "envoy.event_loop.runnable_ns": rec.runnable_ns,
            "envoy.event_loop.waits": rec.waits_in_kernel,
            "cpu.id": rec.cpu,
        }
        if rec.idle_ns:
            attrs["envoy.event_loop.idle_before_ns"] = rec.idle_ns
        if rec.waker_kstack_id >= 0 or rec.waker_pid or rec.waker_comm:
            attrs.update(self._round_waker_attributes(rec))
        wait_attrs = [{**self._wait_attributes(w, tgid), "thread.name": name, "process.pid": tgid}
                      for w in rec.waits]
        tail = self._tail_for(tgid)
        spans: list[SpanRecord] = []
        for trace_id, conn_span_id, fd in rec.connections:
            round_id = self._new_id()
            spans.append(SpanRecord(trace_id, round_id, conn_span_id, "envoy.event_loop.round",
                                    SPAN_KIND_INTERNAL, rec.start_ns + offset, rec.end_ns + offset,
                                    {**attrs, "envoy.connection.fd": fd}, [], [], STATUS_CODE_UNSET, "",
                                    *tail))
            for w, wa in zip(rec.waits, wait_attrs, strict=True):
                start = max(w.start_ns, rec.start_ns)
                spans.append(SpanRecord(trace_id, self._new_id(), round_id, "offcpu.wait", SPAN_KIND_INTERNAL,
                                        start + offset, max(w.end_ns, start) + offset, wa, [], [],
                                        STATUS_CODE_UNSET, "", *tail))
        return spans

    def _round_waker_attributes(self, rec: RoundRecord) -> dict[str, object]:
        """Who woke the thread from the idle epoll_wait that started the round (long sleeps only)."""
        attrs: dict[str, object] = {
            "envoy.event_loop.waker.pid": rec.waker_tgid or rec.waker_pid,
            "envoy.event_loop.waker.tid": rec.waker_pid,
            "envoy.event_loop.waker.comm": rec.waker_comm,
        }
        if self.stacks is not None and rec.waker_kstack_id >= 0:
            frames = self.stacks.kernel(rec.waker_kstack_id)
            attrs["envoy.event_loop.waker.stack.kernel"] = frames
            attrs["envoy.event_loop.waker.kind"] = classify_waker(frames)
        return attrs

    def wait_spans(self, w: WaitRecord, tgid: int = 0) -> list[SpanRecord]:
        """A wait no round (and so no connection) holds: a root span of its own."""
        offset = self.clock.offset_ns
        tgid = tgid or self._thread(w.tid)[0]
        attrs = self._wait_attributes(w, tgid)
        attrs["thread.name"] = self._thread(w.tid)[1]
        attrs["process.pid"] = tgid
        trace_id = f"{self._new_id()}{self._new_id()}"
        return [SpanRecord(trace_id, self._new_id(), None, "offcpu.wait", SPAN_KIND_INTERNAL,
                           w.start_ns + offset, max(w.end_ns, w.start_ns) + offset, attrs, [], [],
                           STATUS_CODE_UNSET, "", *self._tail_for(tgid))]

    def _wait_attributes(self, w: WaitRecord, tgid: int) -> dict[str, object]:
        attrs: dict[str, object] = {
            "offcpu.reason": w.reason,
            "offcpu.duration_ns": max(w.end_ns - w.start_ns, 0),
            "offcpu.runqueue_delay_ns": w.runnable_ns,
            "thread.id": w.tid,
            "cpu.id": w.cpu,
        }
        if w.syscall in SYSCALL_NAMES and w.reason != "preempted":
            attrs["offcpu.syscall"] = SYSCALL_NAMES[w.syscall]
        if w.reason == "preempted":
            attrs["offcpu.preempted_by.pid"] = w.other_pid
            attrs["offcpu.preempted_by.comm"] = w.other_comm
        elif w.other_pid:
            attrs["offcpu.waker.pid"] = w.other_tgid or w.other_pid
            attrs["offcpu.waker.tid"] = w.other_pid
            attrs["offcpu.waker.comm"] = w.other_comm
        stacks = self.stacks
        if stacks is not None:
            if w.kstack_id >= 0:
                attrs["offcpu.stack.kernel"] = stacks.kernel(w.kstack_id)
            if w.ustack_id >= 0 and tgid:
                attrs["offcpu.stack.user"] = stacks.user(w.ustack_id, tgid)
                build_ids = stacks.user_build_ids(w.ustack_id, tgid)
                if build_ids:
                    attrs["offcpu.stack.user.build_ids"] = build_ids
            if w.waker_kstack_id >= 0:
                waker = stacks.kernel(w.waker_kstack_id)
                attrs["offcpu.waker.stack.kernel"] = waker
                attrs["offcpu.waker.kind"] = classify_waker(waker)
        if w.reason == "preempted":
            attrs["offcpu.waker.kind"] = "preempted"
        return attrs

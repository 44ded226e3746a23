"""Event-loop rounds and off-CPU waits -> spans: round spans in each connection's trace, their waits, who
woke the thread, and the idle wake-ups by waker kind."""

from __future__ import annotations

from opentelemetry.sdk.resources import Resource

from otel_envoy.correlate.round_tracker import RoundRecord, WaitRecord
from otel_envoy.spans.clock import MonotonicClock
from otel_envoy.spans.connection import ConnectionSpanBuilder
from otel_envoy.spans.round_spans import RoundSpanBuilder, classify_waker, idle_wakes_by_kind
from tests.support.events import TGID, TID

RESOURCE = Resource.create({"service.name": "envoy-test"})
OFFSET = 1_700_000_000_000_000_000


class _Stacks:
    def kernel(self, stack_id: int) -> list[str]:
        return {1: ["__schedule+0x618", "schedule+0x23", "futex_wait_queue+0x60"],
                2: ["try_to_wake_up+0x1f0", "wake_up_q+0x4a", "futex_wake+0x15d", "do_futex+0x10e"]}[stack_id]

    def user(self, stack_id: int, tgid: int) -> list[str]:
        return ["envoy+0x20b896d", "pthread_mutex_lock+0x24 (libc.so.6)"]

    def user_build_ids(self, stack_id: int, tgid: int) -> list[str]:
        return ["envoy=9e5580933739775e8bce696a57a2e1bc99368f23"]


def _builder(stacks=None) -> RoundSpanBuilder:
    ids = iter(f"{i:016x}" for i in range(1, 1000))
    return RoundSpanBuilder(ConnectionSpanBuilder(RESOURCE, MonotonicClock(OFFSET)), stacks,
                            identity=lambda tid: (TGID, "wrk:worker_0"), new_id=lambda: next(ids))


def _wait(reason: str, **kw) -> WaitRecord:
    base = dict(tid=TID, round=7, start_ns=2_000, end_ns=3_002_000, runnable_ns=1_000, reason=reason,
                prev_state=0, syscall=202, kstack_id=1, ustack_id=5, waker_kstack_id=2, other_pid=4243,
                other_tgid=4240, other_comm="envoy", cpu=1)
    base.update(kw)
    return WaitRecord(**base)


def test_round_spans_sit_in_each_connection_trace_with_their_waits() -> None:
    rec = RoundRecord(TGID, TID, 7, 1_000, 4_001_000, 2, 3_000_000, 1_000, 2, 1,
                      connections=[("a" * 32, "1" * 16, 30), ("b" * 32, "2" * 16, 31)],
                      waits=[_wait("lock")])
    spans = _builder(_Stacks()).round_spans(rec)
    rounds = [s for s in spans if s.name == "envoy.event_loop.round"]
    waits = [s for s in spans if s.name == "offcpu.wait"]
    assert [(r.trace_id, r.parent_span_id) for r in rounds] == [("a" * 32, "1" * 16), ("b" * 32, "2" * 16)]
    assert len(waits) == 2 and {w.parent_span_id for w in waits} == {r.span_id for r in rounds}
    r = rounds[0].attributes
    assert r["envoy.event_loop.on_cpu_ns"] == 1_000_000 and r["envoy.event_loop.off_cpu_ns"] == 3_000_000
    assert r["envoy.event_loop.ready_fds"] == 2 and r["thread.name"] == "wrk:worker_0"
    assert r["envoy.event_loop.connections"] == 2 and rounds[0].start_ns == 1_000 + OFFSET
    w = waits[0].attributes
    assert w["offcpu.reason"] == "lock" and w["offcpu.syscall"] == "futex"
    assert w["offcpu.waker.comm"] == "envoy" and w["offcpu.waker.pid"] == 4240
    assert w["offcpu.waker.tid"] == 4243
    assert w["offcpu.waker.kind"] == "futex"
    assert w["offcpu.stack.kernel"][-1] == "futex_wait_queue+0x60"
    assert w["offcpu.stack.user.build_ids"] == ["envoy=9e5580933739775e8bce696a57a2e1bc99368f23"]
    assert "offcpu.preempted_by.comm" not in w


def test_preemption_names_the_task_that_took_the_cpu_and_replays_have_no_stacks() -> None:
    rec = RoundRecord(TGID, TID, 7, 1_000, 4_001_000, 1, 3_000_000, 3_000_000, 1, 0,
                      connections=[("a" * 32, "1" * 16, 30)],
                      waits=[_wait("preempted", other_comm="cpuhog", other_pid=999, other_tgid=0,
                                   runnable_ns=3_000_000)])
    (_, wait) = _builder(None).round_spans(rec)
    a = wait.attributes
    assert a["offcpu.preempted_by.comm"] == "cpuhog" and a["offcpu.preempted_by.pid"] == 999
    assert a["offcpu.waker.kind"] == "preempted" and "offcpu.waker.comm" not in a
    assert a["offcpu.runqueue_delay_ns"] == 3_000_000
    assert not [k for k in a if k.startswith("offcpu.stack")]


def test_a_round_without_connections_leaves_its_waits_as_roots() -> None:
    rec = RoundRecord(TGID, TID, 9, 0, 5_000_000, 1, 2_000_000, 0, 1, 0, waits=[_wait("io")])
    (span,) = _builder(None).round_spans(rec)
    assert span.name == "offcpu.wait" and span.parent_span_id is None
    assert span.attributes["process.pid"] == TGID


def test_waker_categories_follow_the_seeds_vocabulary() -> None:
    assert classify_waker(["try_to_wake_up+0x1", "eventfd_write+0x80", "ksys_write+0x9"]) == "eventfd"
    assert classify_waker(["try_to_wake_up+0x1", "sock_def_readable+0x3", "unix_stream_sendmsg+0x2"]) == \
        "unix_socket"
    assert classify_waker(["ep_poll_callback+0x1", "sock_def_readable+0x3", "tcp_data_queue+0x5"]) == "tcp"
    assert classify_waker(["try_to_wake_up+0x1", "hrtimer_wakeup+0x1e", "__hrtimer_run_queues+0x1"]) \
        == "timer"
    assert classify_waker(["ep_poll_callback+0x1", "__udp4_lib_rcv+0x3"]) == "udp"
    assert classify_waker(["something_else+0x1"]) == "other"


class _WakerStacks(_Stacks):
    def kernel(self, stack_id: int) -> list[str]:
        return {3: ["try_to_wake_up+0x1", "ep_poll_callback+0x1", "sock_def_readable+0x3",
                    "tcp_data_queue+0x5"],
                4: ["try_to_wake_up+0x1", "hrtimer_wakeup+0x1e"]}.get(stack_id) or super().kernel(stack_id)


def test_a_round_after_a_long_sleep_names_who_woke_the_thread() -> None:
    woken = RoundRecord(TGID, TID, 7, 1_000, 2_000, 1, 0, 0, 0, 0, connections=[("a" * 32, "1" * 16, 30)],
                        idle_ns=50_000_000, waker_kstack_id=3, waker_pid=777, waker_tgid=770,
                        waker_comm="curl")
    (span,) = _builder(_WakerStacks()).round_spans(woken)
    a = span.attributes
    assert a["envoy.event_loop.idle_before_ns"] == 50_000_000
    assert a["envoy.event_loop.waker.kind"] == "tcp" and a["envoy.event_loop.waker.comm"] == "curl"
    assert a["envoy.event_loop.waker.pid"] == 770 and a["envoy.event_loop.waker.tid"] == 777
    assert a["envoy.event_loop.waker.stack.kernel"][-1] == "tcp_data_queue+0x5"
    # a short sleep: the kernel took no waker, so the round names none
    short = RoundRecord(TGID, TID, 8, 1_000, 2_000, 1, 0, 0, 0, 0, connections=[("a" * 32, "1" * 16, 30)],
                        idle_ns=200_000)
    (span,) = _builder(_WakerStacks()).round_spans(short)
    assert span.attributes["envoy.event_loop.idle_before_ns"] == 200_000
    assert not [k for k in span.attributes if k.startswith("envoy.event_loop.waker")]


def test_idle_wakeups_are_summed_by_thread_and_waker_kind() -> None:
    wakes = {(TID, 500, 3): (10, 1, "curl"), (TID, 501, 3): (20, 2, "wrk"), (TID, 0, 4): (5, 7, "swapper/0"),
             (TID + 1, 0, -14): (1, 1, "")}
    assert idle_wakes_by_kind(wakes, _WakerStacks().kernel) == {
        (TID, "tcp"): (30, 3), (TID, "timer"): (5, 7), (TID + 1, "unknown"): (1, 1)}

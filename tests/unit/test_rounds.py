"""Event-loop rounds and off-CPU waits: correlation (replayed kernel events). Their spans:
tests/unit/spans/test_round_spans.py."""

from __future__ import annotations

from otel_envoy.correlate.connections import ConnectionCorrelator
from otel_envoy.correlate.rounds import RoundRecord, WaitRecord
from otel_envoy.events.types import OffcpuEvent, RoundEvent
from tests.support.events import (
    LISTEN_FD,
    LPORT,
    TGID,
    TID,
    C,
    accept,
    listen_sockets,
    read,
    write,
)


def _offcpu(ts: int, start: int, round_: int, reason: str, *, runnable: int = 0, other: str = "cpuhog",
            kstack: int = -1, ustack: int = -1, waker_kstack: int = -1) -> OffcpuEvent:
    code = C[f"OFFCPU_{reason.upper()}"]
    return OffcpuEvent(ts, C["EV_OFFCPU"], 0, TID, round_, start, runnable, 0, code, -1, kstack, ustack,
                       waker_kstack, 4242, 0 if reason == "preempted" else 4240, 0, other.encode())


def _round(ts: int, start: int, round_: int, offcpu: int = 0, waits: int = 0) -> RoundEvent:
    return RoundEvent(ts, C["EV_ROUND"], TGID, TID, round_, start, offcpu, offcpu, 3, waits, 0,
                      -1, 0, 0, 0, b"")


class _Harness:
    def __init__(self) -> None:
        self.rounds: list[RoundRecord] = []
        self.waits: list[WaitRecord] = []
        self.c = ConnectionCorrelator(lambda _c: None, on_round=self.rounds.append, on_wait=self.waits.append,
                                      http=False)
        self.c.set_listen_sockets(listen_sockets((TGID, LISTEN_FD, "0.0.0.0", LPORT, None)))

    def feed(self, *events) -> None:
        for ev in events:
            self.c.handle(ev)


def test_a_round_holds_the_connections_it_served_and_the_waits_inside_it() -> None:
    h = _Harness()
    h.feed(accept(1_000, 30, 40001), accept(1_100, 31, 40002))
    a, b = h.c.open[(TGID, 30)], h.c.open[(TGID, 31)]
    h.feed(read(2_000, 30, b"GET / HTTP/1.1\r\n\r\n")._replace(round=7),
           read(2_100, 31, b"GET / HTTP/1.1\r\n\r\n")._replace(round=7),
           _offcpu(5_000_000, 2_200, 7, "preempted", runnable=4_997_800),
           write(5_100_000, 30, b"HTTP/1.1 200 OK\r\n\r\n")._replace(round=7),
           _round(5_200_000, 1_900, 7, offcpu=4_997_800, waits=1))
    (rec,) = h.rounds
    assert rec.round == 7 and rec.tid == TID and rec.ready == 3
    assert [(t, s) for t, s, _ in rec.connections] == [(a.trace_id, a.span_id), (b.trace_id, b.span_id)]
    (w,) = rec.waits
    assert w.reason == "preempted" and w.other_comm == "cpuhog" and w.end_ns - w.start_ns == 4_997_800


def test_a_round_the_kernel_did_not_report_is_forgotten_and_waits_outside_rounds_stand_alone() -> None:
    h = _Harness()
    h.feed(accept(1_000, 30, 40001))
    h.feed(read(2_000, 30, b"x")._replace(round=3),  # round 3: short, never reported
           read(3_000, 30, b"y")._replace(round=4),
           _round(4_000, 2_900, 4))
    (rec,) = h.rounds
    assert rec.round == 4 and len(rec.connections) == 1 and rec.waits == []
    h.feed(_offcpu(9_000_000, 1_000_000, 0, "lock", other="envoy"))
    (w,) = h.waits
    assert w.reason == "lock" and w.round == 0 and w.other_comm == "envoy"


def test_the_round_event_carries_the_waker_into_the_record() -> None:
    h = _Harness()
    h.feed(RoundEvent(5_000, C["EV_ROUND"], TGID, TID, 3, 1_000, 0, 0, 1, 0, 0, 9, 40_000_000, 61, 60,
                      b"curl\0\0\0\0\0\0\0\0\0\0\0\0"))
    (rec,) = h.rounds
    assert (rec.idle_ns, rec.waker_kstack_id, rec.waker_pid, rec.waker_tgid, rec.waker_comm) == \
        (40_000_000, 9, 61, 60, "curl")

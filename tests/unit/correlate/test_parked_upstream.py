"""Upstream requests waiting for a downstream request reported after them (correlate/parked_upstream.py):
with request summaries the kernel reports a sampled request at its answer, after the upstream request Envoy
wrote for it; that one waits on its thread and is claimed by time window and request line."""

from __future__ import annotations

from collections import Counter

from otel_envoy.correlate.parked_upstream import PARK_NS, PARKED_MAX, ParkedUpstreams
from otel_envoy.correlate.records import (
    ConnectionRecord,
    RequestRecord,
    TcpConnect,
    UnpairedRequest,
    UpstreamRecord,
)
from otel_envoy.protocols.http import HttpExchange, HttpMessage
from tests.support.events import LISTEN_FD, LPORT, PEER, TGID, TID

OTHER_TID = TID + 1


def _upstream(fd: int, connect_ns: int = 0) -> UpstreamRecord:
    return UpstreamRecord(TGID, fd, TID, "worker_0", "10.0.0.9", 8080, "a" * 32, "b" * 16,
                          TcpConnect(connect_ns, 0, "c" * 16))


def _downstream_request(method: str, path: str) -> RequestRecord:
    conn = ConnectionRecord(TGID, 40, TID, "worker_0", LISTEN_FD, PEER, 40000, LPORT, 0)
    request = HttpMessage(start_ns=0, method=method, path=path, summary=True)
    return RequestRecord(conn, request, "d" * 16, None)


class _Parking:
    def __init__(self) -> None:
        self.stats: Counter[str] = Counter()
        self.unclaimed: list[tuple[UpstreamRecord, HttpExchange, UnpairedRequest]] = []
        self.parked = ParkedUpstreams(lambda: UnpairedRequest("e" * 32, "f" * 16, None, ""), self.stats)
        self.parked.on_unclaimed = lambda up, exchange, ids: self.unclaimed.append((up, exchange, ids))

    def write(self, up: UpstreamRecord, method: str, path: str, ts_ns: int, tid: int = TID) -> HttpMessage:
        msg = HttpMessage(start_ns=ts_ns, method=method, path=path)
        self.parked.park(up, msg, TGID, tid, ts_ns, f"{ts_ns:016x}")
        return msg


def test_a_summary_claims_the_upstream_request_written_while_it_was_served() -> None:
    p = _Parking()
    up = _upstream(50, connect_ns=1_000)
    msg = p.write(up, "GET", "/a", 2_000)
    assert p.parked.ended(HttpExchange(msg, HttpMessage(start_ns=3_000, status=200)))  # held, not emitted
    rr = _downstream_request("GET", "/a")
    p.parked.claim(rr, TID, 500, 4_000, by_line_only=True)
    assert [(u, m) for u, m, _ in rr.upstream] == [(up, msg)]
    assert up.cause.request is rr  # the connection was opened while it was served
    assert p.stats["upstream_paired_by_summary"] == 1
    p.parked.flush()
    assert p.unclaimed == []  # it left with its downstream request


def test_claims_go_by_time_window_then_request_line() -> None:
    p = _Parking()
    up = _upstream(50)
    first = p.write(up, "GET", "/same", 2_000)  # for a request served from 1 000 to 2 500
    second = p.write(up, "GET", "/same", 3_000)  # for one served from 2 800 to 3 500
    other = p.write(up, "POST", "/other", 3_100)
    late = _downstream_request("GET", "/same")
    p.parked.claim(late, TID, 2_800, 3_500, by_line_only=True)
    assert [m for _, m, _ in late.upstream] == [second]  # not the older one outside its window
    early = _downstream_request("GET", "/same")
    p.parked.claim(early, TID, 1_000, 2_500, by_line_only=True)
    assert [m for _, m, _ in early.upstream] == [first]
    rewritten = _downstream_request("GET", "/before-rewrite")
    p.parked.claim(rewritten, TID, 3_000, 3_600, by_line_only=True)
    assert rewritten.upstream == []  # sampled by a ratio: only the same request line pairs
    p.parked.claim(rewritten, TID, 3_000, 3_600, by_line_only=False)
    assert [m for _, m, _ in rewritten.upstream] == [other]  # every request traced: the oldest in its window


def test_other_threads_requests_are_not_claimed() -> None:
    p = _Parking()
    p.write(_upstream(50), "GET", "/a", 2_000, tid=OTHER_TID)
    rr = _downstream_request("GET", "/a")
    p.parked.claim(rr, TID, 0, 10_000, by_line_only=False)
    assert rr.upstream == []


def test_unclaimed_requests_leave_unpaired_when_they_age_or_the_thread_has_too_many() -> None:
    p = _Parking()
    up = _upstream(50)
    ended = p.write(up, "GET", "/never-sampled", 1_000)
    in_flight = p.write(up, "GET", "/still-running", 1_001)
    p.parked.ended(HttpExchange(ended, HttpMessage(start_ns=1_500, status=200)))
    p.write(up, "GET", "/later", 1_002 + PARK_NS)  # both are too old now
    assert [(u, x.request) for u, x, _ in p.unclaimed] == [(up, ended)]  # exported unpaired (or dropped)
    assert id(in_flight) in up.cause.unpaired  # it leaves unpaired when it ends
    assert not p.parked.ended(HttpExchange(in_flight, None))
    for i in range(PARKED_MAX + 3):
        p.write(up, "GET", "/flood", 2_000 + PARK_NS + i)
    assert p.stats["upstream_parked_unclaimed"] == 2 + 4  # the two aged, then the oldest four of the flood

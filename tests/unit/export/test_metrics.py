"""Per-worker metrics: instruments, attributes, units, the round histogram, temporality, failures."""

from __future__ import annotations

import logging
import math
from collections import Counter

import pytest
from opentelemetry.exporter.otlp.proto.common.metrics_encoder import encode_metrics
from opentelemetry.sdk.metrics import Histogram as SdkHistogram
from opentelemetry.sdk.metrics import ObservableCounter
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    Histogram,
    MetricExporter,
    MetricExportResult,
    MetricsData,
    Sum,
)
from opentelemetry.sdk.resources import Resource

from otel_envoy.export.metrics import (
    ROUND_BOUNDS_S,
    ROUND_DURATION,
    WorkerMetrics,
    round_bucket_counts,
)
from otel_envoy.export.metrics_settings import MetricPreferences
from otel_envoy.export.otlp import resolve_otlp_settings

PREEMPTED, LOCK, IO, IDLE, OTHER = 1, 2, 3, 4, 5
TGID = 4000
THREADS = {4001: (TGID, "wrk:worker_0"), 4002: (TGID, "wrk:worker_1"), 4000: (TGID, "envoy")}


class MemoryExporter(MetricExporter):
    """Keeps every batch it is given."""

    def __init__(self, temporality: AggregationTemporality = AggregationTemporality.CUMULATIVE) -> None:
        self.preferences = MetricPreferences({SdkHistogram: temporality, ObservableCounter: temporality}, {})
        super().__init__(preferred_temporality=self.preferences.temporality)
        self.batches: list[MetricsData] = []
        self.closed = False

    def export(self, metrics_data, timeout_millis=10_000, **kwargs):
        self.batches.append(metrics_data)
        return MetricExportResult.SUCCESS

    def force_flush(self, timeout_millis=10_000):
        return True

    def shutdown(self, timeout_millis=30_000, **kwargs):
        self.closed = True


class Sources:
    """Fake kernel tables and correlator counter, mutable between collections."""

    def __init__(self) -> None:
        self.offcpu = {
            (4001, IDLE): (2_500_000_000, 1_000_000, 1000),
            (4001, PREEMPTED): (30_000_000, 30_000_000, 12),
            (4002, IDLE): (2_000_000_000, 500_000, 900),
            (4002, LOCK): (4_000_000, 100_000, 3),
            (4002, 9): (1_000, 0, 1),  # a reason this build does not know
        }
        self.rounds = {4001: {0: 10, 3: 5, 5: 1}, 4002: {1: 7, 40: 1}}
        self.accepts: Counter[tuple[int, int, str, int]] = Counter(
            {(TGID, 4001, "wrk:worker_0", 7): 26, (TGID, 4002, "wrk:worker_1", 7): 24})
        self.wakes = {(4001, "tcp"): (900_000_000, 30), (4001, "timer"): (1_500_000_000, 15),
                      (4002, "eventfd"): (40_000_000, 2)}
        self.threads = dict(THREADS)
        self.offcpu_reads = 0
        self.fail: set[str] = set()

    def offcpu_totals(self):
        self.offcpu_reads += 1
        if "offcpu" in self.fail:
            raise OSError(9, "Bad file descriptor")
        return dict(self.offcpu)

    def round_histograms(self):
        if "rounds" in self.fail:
            raise OSError(9, "Bad file descriptor")
        return {tid: dict(slots) for tid, slots in self.rounds.items()}

    def idle_wakes(self):
        if "wakes" in self.fail:
            raise OSError(9, "Bad file descriptor")
        return dict(self.wakes)

    def accepts_by_thread(self):
        if "accepts" in self.fail:
            raise RuntimeError("boom")
        return self.accepts

    def identity(self, tid: int) -> tuple[int, str]:
        return self.threads.get(tid, (0, ""))


def _metrics(sources: Sources, exporter: MemoryExporter, interval_s: float = math.inf) -> WorkerMetrics:
    """Collections only when the test asks (no reader thread), unless ``interval_s`` is finite."""
    wm = WorkerMetrics(
        exporter, Resource.create({"service.name": "envoy-test"}), offcpu_totals=sources.offcpu_totals,
        round_histograms=sources.round_histograms, accepts=sources.accepts_by_thread,
        idle_wakes=sources.idle_wakes, interval_s=interval_s, identity=sources.identity,
        preferences=exporter.preferences)
    wm.start()
    return wm


@pytest.fixture
def setup():
    sources, exporter = Sources(), MemoryExporter()
    wm = _metrics(sources, exporter)
    yield sources, exporter, wm
    wm.shutdown()


def _collect(wm: WorkerMetrics, exporter: MemoryExporter) -> dict[str, object]:
    wm.force_flush()
    batch = exporter.batches[-1]
    assert len(batch.resource_metrics) == 1
    rm = batch.resource_metrics[0]
    assert rm.resource.attributes["service.name"] == "envoy-test"
    out = {}
    for sm in rm.scope_metrics:
        assert sm.scope.name == "otel_envoy"
        for m in sm.metrics:
            assert m.name not in out
            out[m.name] = m
    return out


def _points(metric) -> dict[tuple, object]:
    return {tuple(sorted(p.attributes.items())): p for p in metric.data.data_points}


def _key(tid: int, reason: str | None = None) -> tuple:
    attrs = {"thread.id": tid, "thread.name": THREADS[tid][1], "process.pid": TGID}
    if reason:
        attrs["offcpu.reason"] = reason
    return tuple(sorted(attrs.items()))


def test_offcpu_counters_values_units_and_attributes(setup):
    _sources, exporter, wm = setup
    m = _collect(wm, exporter)
    time_, runq, waits = (m["envoy.worker.offcpu.time"], m["envoy.worker.runqueue.delay"],
                          m["envoy.worker.offcpu.waits"])
    assert (time_.unit, runq.unit, waits.unit) == ("s", "s", "{wait}")
    for metric in (time_, runq, waits):
        assert isinstance(metric.data, Sum) and metric.data.is_monotonic
        assert metric.data.aggregation_temporality == AggregationTemporality.CUMULATIVE
    t, r, w = _points(time_), _points(runq), _points(waits)
    assert set(t) == set(r) == set(w) == {
        _key(4001, "idle"), _key(4001, "preempted"), _key(4002, "idle"), _key(4002, "lock"), _key(4002, "9")}
    assert t[_key(4001, "idle")].value == pytest.approx(2.5)
    assert t[_key(4001, "preempted")].value == pytest.approx(0.03)
    assert r[_key(4001, "preempted")].value == pytest.approx(0.03)
    assert r[_key(4002, "lock")].value == pytest.approx(0.0001)
    assert w[_key(4001, "idle")].value == 1000 and w[_key(4002, "lock")].value == 3
    assert isinstance(w[_key(4001, "idle")].value, int)


def test_idle_wakeups_by_waker_kind(setup):
    sources, exporter, wm = setup
    m = _collect(wm, exporter)
    wakeups, idle = m["envoy.worker.wakeups"], m["envoy.worker.wakeup.idle_time"]
    assert (wakeups.unit, idle.unit) == ("{wakeup}", "s") and wakeups.data.is_monotonic

    def by_kind(metric) -> dict[tuple[int, str], float]:
        return {(p.attributes["thread.id"], p.attributes["offcpu.waker.kind"]): p.value
                for p in metric.data.data_points}

    assert by_kind(wakeups) == {(4001, "tcp"): 30, (4001, "timer"): 15, (4002, "eventfd"): 2}
    assert by_kind(idle)[4001, "timer"] == pytest.approx(1.5)
    sources.wakes[4001, "tcp"] = (1_000_000_000, 31)
    assert by_kind(_collect(wm, exporter)["envoy.worker.wakeups"])[4001, "tcp"] == 31


def test_connections_accepted_per_thread(setup):
    sources, exporter, wm = setup
    m = _collect(wm, exporter)
    acc = m["envoy.worker.connections.accepted"]
    assert acc.unit == "{connection}" and acc.data.is_monotonic
    points = _points(acc)
    assert {k: p.value for k, p in points.items()} == {_key(4001): 26, _key(4002): 24}
    sources.accepts[(TGID, 4001, "wrk:worker_0", 7)] += 4
    points = _points(_collect(wm, exporter)["envoy.worker.connections.accepted"])
    assert points[_key(4001)].value == 30 and points[_key(4002)].value == 24


def test_round_bucket_counts_follow_the_kernel_slots():
    assert len(ROUND_BOUNDS_S) == 32
    assert ROUND_BOUNDS_S[0] == pytest.approx(2e-6)  # slot 0: [0, 2) us
    assert ROUND_BOUNDS_S[3] == pytest.approx(16e-6)  # slot 3: [8, 16) us
    assert ROUND_BOUNDS_S[-1] == pytest.approx(2**32 * 1e-6)
    counts = round_bucket_counts({0: 10, 3: 5, 31: 2, 32: 1, 45: 1, -1: 9, 7: 0})
    assert len(counts) == 33
    assert counts[0] == 10 and counts[3] == 5 and counts[31] == 2 and counts[32] == 2
    assert sum(counts) == 19
    # each slot lands in the bucket whose bounds are its own: slot s holds [2^s, 2^(s+1)) us
    for slot in range(1, 32):
        lo_us, hi_us = 2**slot, 2 ** (slot + 1)
        idx = round_bucket_counts({slot: 1}).index(1)
        assert ROUND_BOUNDS_S[idx - 1] == pytest.approx(lo_us * 1e-6)
        assert ROUND_BOUNDS_S[idx] == pytest.approx(hi_us * 1e-6)


def test_round_histogram_is_a_real_histogram(setup):
    sources, exporter, wm = setup
    h = _collect(wm, exporter)[ROUND_DURATION]
    assert h.unit == "s" and isinstance(h.data, Histogram)
    assert h.data.aggregation_temporality == AggregationTemporality.CUMULATIVE
    points = _points(h)
    assert set(points) == {_key(4001), _key(4002)}
    p1, p2 = points[_key(4001)], points[_key(4002)]
    assert p1.count == 16 and (p1.bucket_counts[0], p1.bucket_counts[3], p1.bucket_counts[5]) == (10, 5, 1)
    assert p2.count == 8 and p2.bucket_counts[1] == 7 and p2.bucket_counts[32] == 1
    rounds = _collect(wm, exporter)["envoy.event_loop.rounds"]
    assert rounds.unit == "{round}" and rounds.data.is_monotonic
    assert {k: p.value for k, p in _points(rounds).items()} == {_key(4001): 16, _key(4002): 8}
    assert list(p1.explicit_bounds) == list(ROUND_BOUNDS_S)
    assert p1.sum is None and p1.min is None and p1.max is None  # the kernel keeps none of them
    assert p1.start_time_unix_nano < p1.time_unix_nano
    # and it encodes as an OTLP histogram without a sum
    request = encode_metrics(exporter.batches[-1])
    metrics = {m.name: m for m in request.resource_metrics[0].scope_metrics[0].metrics}
    encoded = metrics[ROUND_DURATION]
    assert encoded.WhichOneof("data") == "histogram"
    assert encoded.histogram.aggregation_temporality == 2  # cumulative
    points = encoded.histogram.data_points
    assert sorted(p.count for p in points) == [8, 16]
    assert not any(p.HasField("sum") for p in points)
    assert len(points[0].bucket_counts) == len(points[0].explicit_bounds) + 1
    # cumulative: grows, same start time
    start = p1.start_time_unix_nano
    sources.rounds[4001][3] += 2
    p1 = _points(_collect(wm, exporter)[ROUND_DURATION])[_key(4001)]
    assert p1.count == 18 and p1.bucket_counts[3] == 7 and p1.start_time_unix_nano == start


def test_round_histogram_reset_when_counts_go_backwards(setup):
    sources, exporter, wm = setup
    first = _points(_collect(wm, exporter)[ROUND_DURATION])[_key(4001)]
    sources.rounds[4001] = {3: 1}  # the kernel's LRU table dropped and re-created the entries
    again = _points(_collect(wm, exporter)[ROUND_DURATION])[_key(4001)]
    assert again.count == 1
    assert again.start_time_unix_nano > first.start_time_unix_nano


def test_delta_temporality():
    sources, exporter = Sources(), MemoryExporter(AggregationTemporality.DELTA)
    wm = _metrics(sources, exporter)
    try:
        m = _collect(wm, exporter)
        assert m[ROUND_DURATION].data.aggregation_temporality == AggregationTemporality.DELTA
        accepted = m["envoy.worker.connections.accepted"]
        assert accepted.data.aggregation_temporality == AggregationTemporality.DELTA
        first = _points(m[ROUND_DURATION])[_key(4001)]
        assert first.count == 16
        sources.rounds[4001][0] += 3
        sources.accepts[(TGID, 4002, "wrk:worker_1", 7)] += 5
        m = _collect(wm, exporter)
        points = _points(m[ROUND_DURATION])
        assert set(points) == {_key(4001)}  # nothing new on 4002: no point
        second = points[_key(4001)]
        assert second.count == 3 and second.bucket_counts[0] == 3
        assert second.start_time_unix_nano == first.time_unix_nano
        accepted = _points(m["envoy.worker.connections.accepted"])
        assert accepted[_key(4002)].value == 5
    finally:
        wm.shutdown()


def test_one_table_read_per_collection(setup):
    sources, exporter, wm = setup
    _collect(wm, exporter)
    assert sources.offcpu_reads == 1  # three instruments, one snapshot
    _collect(wm, exporter)
    _collect(wm, exporter)
    assert sources.offcpu_reads == 3


def test_gone_threads_are_reported_once_more_then_dropped(setup):
    sources, exporter, wm = setup
    _collect(wm, exporter)
    del sources.threads[4002]  # the thread exited; its kernel entries stay
    sources.offcpu[(4002, IDLE)] = (2_100_000_000, 500_000, 950)  # what it did before exiting
    m = _collect(wm, exporter)
    assert _points(m["envoy.worker.offcpu.time"])[_key(4002, "idle")].value == pytest.approx(2.1)
    assert _key(4002) in _points(m[ROUND_DURATION])
    m = _collect(wm, exporter)
    assert not any(dict(k)["thread.id"] == 4002 for k in _points(m["envoy.worker.offcpu.time"]))
    assert _key(4002) not in _points(m[ROUND_DURATION])
    # a thread that was never seen alive cannot be named: left out
    sources.offcpu[(4999, IO)] = (5_000_000, 0, 1)
    m = _collect(wm, exporter)
    assert not any(dict(k)["thread.id"] == 4999 for k in _points(m["envoy.worker.offcpu.time"]))
    # accepted connections carry their own names (from the accept event): still reported
    assert _key(4002) in _points(m["envoy.worker.connections.accepted"])


def test_failing_sources_yield_nothing_and_log_once(setup, caplog):
    sources, exporter, wm = setup
    sources.fail = {"offcpu", "accepts"}
    with caplog.at_level(logging.WARNING, logger="otel_envoy.metrics"):
        m = _collect(wm, exporter)
        _collect(wm, exporter)
    assert "envoy.worker.offcpu.time" not in m and "envoy.worker.connections.accepted" not in m
    assert _points(m[ROUND_DURATION])  # the other source still works
    messages = [r.getMessage() for r in caplog.records if r.name == "otel_envoy.metrics"]
    assert len(messages) == 2, messages
    assert any("offcpu_totals" in msg for msg in messages) and any("accepts" in msg for msg in messages)
    sources.fail = set()
    m = _collect(wm, exporter)
    assert "envoy.worker.offcpu.time" in m and "envoy.worker.connections.accepted" in m


def test_shutdown_exports_last_values_and_closes_the_exporter():
    sources, exporter = Sources(), MemoryExporter()
    wm = _metrics(sources, exporter, interval_s=3600.0)  # the reader thread's last collection
    wm.shutdown()
    assert exporter.closed and len(exporter.batches) == 1
    (rm,) = exporter.batches[0].resource_metrics
    names = {m.name for sm in rm.scope_metrics for m in sm.metrics}
    assert ROUND_DURATION in names and "envoy.worker.connections.accepted" in names
    wm.shutdown()  # idempotent


def test_no_sources_no_metrics():
    exporter = MemoryExporter()
    wm = WorkerMetrics(exporter, Resource.create({}), interval_s=math.inf)
    wm.start()
    wm.force_flush()
    wm.shutdown()
    assert exporter.batches == []


def test_the_interval_must_be_positive():
    with pytest.raises(ValueError):
        WorkerMetrics(MemoryExporter(), Resource.create({}), interval_s=0)


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_metrics_reach_an_otlp_receiver(protocol, monkeypatch):
    from tests.support.otlp_receiver import OtlpReceiver

    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
                 "OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE", "OTEL_EXPORTER_OTLP_HEADERS",
                 "OTEL_EXPORTER_OTLP_METRICS_HEADERS"):
        monkeypatch.delenv(name, raising=False)
    sources = Sources()
    with OtlpReceiver() as rx:
        endpoint = rx.grpc_endpoint if protocol == "grpc" else rx.http_endpoint
        wm = WorkerMetrics.from_settings(
            resolve_otlp_settings(endpoint, protocol, {}), Resource.create({"service.name": "envoy-test"}),
            offcpu_totals=sources.offcpu_totals, round_histograms=sources.round_histograms,
            accepts=sources.accepts_by_thread, interval_s=math.inf, identity=sources.identity)
        wm.start()
        try:
            wm.force_flush()
            points = rx.wait_for_metrics(lambda p: any(x.name == ROUND_DURATION for x in p), timeout=10)
        finally:
            wm.shutdown()
        assert rx.requests == {"grpc": 0, "http/protobuf": 0, "http/json": 0}  # trace counters untouched
        assert rx.metric_requests[protocol] >= 1
    assert {p.protocol for p in points} == {protocol}
    assert {p.resource_attributes["service.name"] for p in points} == {"envoy-test"}
    hist = {p.attributes["thread.name"]: p for p in points if p.name == ROUND_DURATION}
    assert hist["wrk:worker_0"].kind == "histogram" and hist["wrk:worker_0"].count == 16
    assert hist["wrk:worker_0"].sum is None and hist["wrk:worker_0"].temporality == 2
    assert hist["wrk:worker_0"].explicit_bounds == pytest.approx(ROUND_BOUNDS_S)
    accepted = {p.attributes["thread.name"]: p.value for p in points
                if p.name == "envoy.worker.connections.accepted"}
    assert accepted == {"wrk:worker_0": 26, "wrk:worker_1": 24}
    idle = [p for p in points
            if p.name == "envoy.worker.offcpu.time" and p.attributes["offcpu.reason"] == "idle"]
    assert {p.attributes["thread.id"] for p in idle} == {4001, 4002}
    assert all(p.unit == "s" and p.kind == "sum" and p.is_monotonic for p in idle)

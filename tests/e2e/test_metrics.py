"""Per-worker metrics from a real Envoy over real OTLP/gRPC (real BPF, real connections)."""

from __future__ import annotations

import pytest

from otel_envoy.export.metrics import ROUND_BOUNDS_S, ROUND_DURATION
from otel_envoy.lab import clients
from tests.support.daemon import DaemonProcess
from tests.support.otlp_receiver import OtlpReceiver

pytestmark = pytest.mark.root

CONNECTIONS = 50
ACCEPTED = "envoy.worker.connections.accepted"
OFFCPU = "envoy.worker.offcpu.time"


@pytest.fixture(scope="module")
def metered(lab, receiver, tmp_path_factory):
    """The daemon exporting spans and metrics (every second) to the receiver over gRPC."""
    workdir = tmp_path_factory.mktemp("daemon-metrics")
    daemon = DaemonProcess(
        ["--pid", str(lab.pid), "--otlp-endpoint", receiver.grpc_endpoint, "--otlp-protocol", "grpc",
         "--metrics-interval", "1"], workdir, env={"OTEL_SERVICE_NAME": "envoy-metrics-test"},
    ).start()
    yield daemon
    assert daemon.stop() == 0, daemon.stderr()


def _of_lab(points: dict, pid: int) -> dict:
    return {k: p for k, p in points.items() if p.attributes.get("process.pid") == pid}


def test_connections_idle_time_and_rounds_per_worker(lab, receiver, metered):
    workers = lab.worker_threads()  # {"wrk:worker_0": tid, "wrk:worker_1": tid}
    assert len(workers) == 2
    burst = clients.burst(lab.http_port, CONNECTIONS, concurrency=5)
    assert all(r.status == 200 for r in burst.results), [r.error for r in burst.results if r.error]

    def accepted_total(_points) -> int:
        return sum(int(p.value) for p in _of_lab(receiver.latest_metric_points(ACCEPTED), lab.pid).values())

    receiver.wait_for_metrics(lambda p: accepted_total(p) >= CONNECTIONS, timeout=60)

    # connections accepted, per worker: the lab opens no other connections to Envoy
    accepted = _of_lab(receiver.latest_metric_points(ACCEPTED), lab.pid)
    by_thread = {p.attributes["thread.name"]: p for p in accepted.values()}
    assert sum(int(p.value) for p in by_thread.values()) == CONNECTIONS, by_thread
    assert set(by_thread) <= set(workers)
    assert len(by_thread) == 2, {n: p.value for n, p in by_thread.items()}  # both workers accepted some
    for name, p in by_thread.items():
        assert p.attributes["thread.id"] == workers[name]
        assert p.unit == "{connection}" and p.kind == "sum" and p.is_monotonic and p.temporality == 2
        assert p.resource_attributes["service.name"] == "envoy-metrics-test"
        assert p.scope_name == "otel_envoy"
    print("accepted per worker:", {n: int(p.value) for n, p in sorted(by_thread.items())})

    # off-CPU time: every worker waits for work in epoll_wait
    offcpu = _of_lab(receiver.latest_metric_points(OFFCPU), lab.pid)
    idle = {p.attributes["thread.name"]: p
            for p in offcpu.values() if p.attributes["offcpu.reason"] == "idle"}
    for name, tid in workers.items():
        assert name in idle, sorted(idle)
        assert idle[name].attributes["thread.id"] == tid
        assert idle[name].value > 0 and idle[name].unit == "s"
    assert {p.attributes["offcpu.reason"] for p in offcpu.values()} <= {"preempted", "lock", "io", "idle",
                                                                        "other"}
    waits = _of_lab(receiver.latest_metric_points("envoy.worker.offcpu.waits"), lab.pid)
    assert all(p.value >= 1 and p.unit == "{wait}" for p in waits.values())
    runq = _of_lab(receiver.latest_metric_points("envoy.worker.runqueue.delay"), lab.pid)
    assert runq and all(p.value >= 0 and p.unit == "s" for p in runq.values())

    # round durations: a real histogram per worker, with the kernel's log2 buckets
    hist = {p.attributes["thread.name"]: p
            for p in _of_lab(receiver.latest_metric_points(ROUND_DURATION), lab.pid).values()}
    for name in workers:
        h = hist[name]
        assert h.kind == "histogram" and h.unit == "s" and h.temporality == 2
        assert h.count > 0 and h.count == sum(h.bucket_counts)
        assert h.explicit_bounds == pytest.approx(ROUND_BOUNDS_S)
        assert h.sum is None  # the kernel keeps no sum
    # each connection took at least one round (accept) on its worker
    assert sum(hist[name].count for name in by_thread) >= CONNECTIONS
    rounds = {p.attributes["thread.name"]: p
              for p in _of_lab(receiver.latest_metric_points("envoy.event_loop.rounds"), lab.pid).values()}
    assert all(rounds[name].value > 0 for name in workers)


def test_last_values_are_exported_at_shutdown(lab, tmp_path):
    """A daemon whose interval never comes: its only export is the last collection, at exit."""
    with OtlpReceiver() as rx:
        daemon = DaemonProcess(
            ["--pid", str(lab.pid), "--otlp-endpoint", rx.grpc_endpoint, "--otlp-protocol", "grpc",
             "--metrics-interval", "3600"], tmp_path).start()
        try:
            burst = clients.burst(lab.http_port, 10, concurrency=2)
            assert all(r.status == 200 for r in burst.results)
            assert rx.metric_points() == []
        finally:
            assert daemon.stop() == 0, daemon.stderr()
        accepted = _of_lab(rx.latest_metric_points(ACCEPTED), lab.pid)
        assert sum(int(p.value) for p in accepted.values()) == 10  # it started after the other tests' burst
        assert _of_lab(rx.latest_metric_points(ROUND_DURATION), lab.pid)
        assert rx.metric_rejected == {"grpc": 0, "http/protobuf": 0, "http/json": 0}
    assert "Failed to export" not in daemon.stderr() and "metrics:" not in daemon.stderr(), daemon.stderr()

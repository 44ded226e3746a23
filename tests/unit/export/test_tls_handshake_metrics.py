"""``envoy.downstream.tls.handshake.duration`` from kernel series (export/request_metrics.py) and the
summary's TLS handshake counts (run_summary.py), from fixed series: the attributes and the merging."""

from __future__ import annotations

from opentelemetry.sdk.metrics.export import AggregationTemporality

from otel_envoy.envoy.listen_socket import ListenSocket
from otel_envoy.export.request_metrics import TLS_HANDSHAKE_DURATION, TlsHandshakeMetrics, tls_attributes
from otel_envoy.probes.loader import RequestTotals, TlsSeries
from otel_envoy.run_summary import tls_totals

LISTEN = ListenSocket("0.0.0.0", 10443, "tls_sni")
SERIES = {
    TlsSeries(7, 20, 0x0304, True, "done"): RequestTotals(30, 30_000_000, {9: 30}),
    TlsSeries(7, 21, 0x0304, True, "done"): RequestTotals(10, 20_000_000, {10: 10}),  # another worker's
    TlsSeries(7, 20, 0x0303, False, "done"): RequestTotals(2, 4_000_000, {11: 2}),
    TlsSeries(7, 20, 0, False, "closed"): RequestTotals(1, 1_000, {0: 1}),
}


def test_attributes_follow_the_conventions() -> None:
    done = tls_attributes(TlsSeries(7, 20, 0x0304, True, "done"), LISTEN)
    assert done == {"process.pid": 7, "server.address": "0.0.0.0", "server.port": 10443,
                    "envoy.listener.name": "tls_sni", "tls.protocol.name": "tls", "tls.resumed": True,
                    "tls.protocol.version": "1.3"}
    closed = tls_attributes(TlsSeries(7, 20, 0, False, "closed"), None)
    assert closed == {"process.pid": 7, "tls.protocol.name": "tls", "tls.resumed": False,
                      "error.type": "closed_during_handshake"}


def test_one_point_per_version_resumption_and_outcome_with_workers_merged() -> None:
    metrics = TlsHandshakeMetrics(lambda: SERIES, lambda: {(7, 20): LISTEN, (7, 21): LISTEN})
    metric = metrics.metric(AggregationTemporality.CUMULATIVE)
    assert metric is not None and metric.name == TLS_HANDSHAKE_DURATION and metric.unit == "s"
    points = {(p.attributes.get("tls.protocol.version"), p.attributes["tls.resumed"]): p
              for p in metric.data.data_points}
    assert points[("1.3", True)].count == 40 and points[("1.3", True)].sum == 0.05
    assert points[("1.2", False)].count == 2
    assert points[(None, False)].attributes["error.type"] == "closed_during_handshake"


def test_the_summary_counts_by_version_resumption_and_outcome() -> None:
    assert tls_totals(SERIES) == {"1.2/full/done": 2, "1.3/resumed/done": 40, "unknown/full/closed": 1}

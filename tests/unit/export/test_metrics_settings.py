"""Where the metrics go: interval, collector endpoint, the SDK's OTLP metric exporter and its preferences."""

from __future__ import annotations

import pytest
from opentelemetry.sdk.metrics import (
    Counter,
    Histogram,
    ObservableCounter,
    ObservableGauge,
    ObservableUpDownCounter,
    UpDownCounter,
)
from opentelemetry.sdk.metrics.export import AggregationTemporality
from opentelemetry.sdk.metrics.view import (
    ExplicitBucketHistogramAggregation,
    ExponentialBucketHistogramAggregation,
)

from otel_envoy.export.metrics_settings import (
    DEFAULT_INTERVAL_S,
    make_metric_exporter,
    metric_preferences,
    metrics_endpoint,
    metrics_interval,
)
from otel_envoy.export.otlp import resolve_otlp_settings

CUMULATIVE, DELTA = AggregationTemporality.CUMULATIVE, AggregationTemporality.DELTA


def test_interval_resolution():
    assert metrics_interval(None, {}) == DEFAULT_INTERVAL_S == 10.0
    assert metrics_interval(2.5, {"OTEL_METRIC_EXPORT_INTERVAL": "1000"}) == 2.5
    assert metrics_interval(0, {}) is None
    assert metrics_interval(None, {"OTEL_METRIC_EXPORT_INTERVAL": "1500"}) == 1.5
    assert metrics_interval(None, {"OTEL_METRICS_EXPORTER": "none"}) is None
    with pytest.raises(ValueError):
        metrics_interval(-1, {})
    with pytest.raises(ValueError):
        metrics_interval(None, {"OTEL_METRIC_EXPORT_INTERVAL": "soon"})


@pytest.mark.parametrize(("cli", "protocol", "env", "expected"), [
    ("http://c:4318", "http/protobuf", {}, "http://c:4318/v1/metrics"),
    ("http://c:4318/", "http/protobuf", {}, "http://c:4318/v1/metrics"),
    ("http://c:4318/v1/traces", "http/protobuf", {}, "http://c:4318/v1/metrics"),
    ("http://c:4317", "grpc", {}, "http://c:4317"),
    # the command line wins over every variable
    ("http://c:4318", "http/protobuf", {"OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": "http://m/x"},
     "http://c:4318/v1/metrics"),
    (None, "http/protobuf", {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://b:4318"}, "http://b:4318/v1/metrics"),
    (None, "http/protobuf", {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://b:4318",
                             "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": "http://m:9/custom"}, "http://m:9/custom"),
    (None, "http/protobuf", {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://t:4318/v1/traces"},
     "http://t:4318/v1/metrics"),
    (None, "http/protobuf", {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://t:4318/ingest/spans"},
     "http://t:4318/v1/metrics"),
    (None, "http/protobuf", {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://t:4318/v1/traces",
                             "OTEL_EXPORTER_OTLP_ENDPOINT": "http://b:4318"}, "http://b:4318/v1/metrics"),
    (None, "grpc", {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://t:4317"}, "http://t:4317"),
])
def test_metrics_endpoint(cli, protocol, env, expected):
    settings = resolve_otlp_settings(cli, protocol, env)
    assert settings is not None
    assert metrics_endpoint(settings, env) == expected


def test_make_metric_exporter_matches_the_span_protocol(monkeypatch):
    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
                 "OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE"):
        monkeypatch.delenv(name, raising=False)
    from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter as GrpcExporter
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter as HttpExporter

    grpc_exporter = make_metric_exporter(resolve_otlp_settings("http://127.0.0.1:4317", "grpc", {}))
    http_exporter = make_metric_exporter(resolve_otlp_settings("http://127.0.0.1:4318", "http/protobuf", {}))
    try:
        assert isinstance(grpc_exporter, GrpcExporter)
        assert isinstance(http_exporter, HttpExporter)
        assert http_exporter._endpoint == "http://127.0.0.1:4318/v1/metrics"
    finally:
        grpc_exporter.shutdown()
        http_exporter.shutdown()


@pytest.mark.parametrize(("value", "delta"), [
    (None, set()), ("cumulative", set()), ("Delta", {Counter, Histogram, ObservableCounter}),
    ("lowmemory", {Counter, Histogram}), ("weekly", set()),
])
def test_metric_preferences_follow_the_temporality_variable(value, delta):
    env = {} if value is None else {"OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE": value}
    prefs = metric_preferences(env)
    instruments = {Counter, UpDownCounter, Histogram, ObservableCounter, ObservableUpDownCounter,
                   ObservableGauge}
    assert prefs.temporality == {i: DELTA if i in delta else CUMULATIVE for i in instruments}
    assert type(prefs.aggregation[Histogram]) is ExplicitBucketHistogramAggregation
    exponential = metric_preferences({"OTEL_EXPORTER_OTLP_METRICS_DEFAULT_HISTOGRAM_AGGREGATION":
                                      "base2_exponential_bucket_histogram"})
    assert type(exponential.aggregation[Histogram]) is ExponentialBucketHistogramAggregation


@pytest.mark.parametrize("value", ["cumulative", "delta", "lowmemory"])
def test_metric_preferences_are_those_the_sdk_exporter_reads_itself(value, monkeypatch):
    """The SDK's OTLP metric exporter, left to read the variable itself, prefers the same temporality."""
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter

    monkeypatch.setenv("OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE", value)
    sdk = OTLPMetricExporter(endpoint="http://127.0.0.1:4318/v1/metrics")
    try:
        assert metric_preferences().temporality == sdk._preferred_temporality
    finally:
        sdk.shutdown()

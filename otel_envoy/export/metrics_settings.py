"""Where and how often the per-worker metrics go: the interval, the collector, the SDK's OTLP metric exporter.

The metrics go to the collector of the spans, over the spans' protocol, through the SDK's public
``OTLPMetricExporter`` (gRPC or HTTP/protobuf).  Its temporality and aggregation preferences are computed
here (:func:`metric_preferences`, as the SDK's OTLP exporters compute them from the environment) and handed
to it explicitly, so that :class:`otel_envoy.export.metrics.KernelHistogramExporter` can follow the same ones.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import NamedTuple
from urllib.parse import urlsplit

from opentelemetry.sdk.metrics import (
    Counter,
    Histogram,
    ObservableCounter,
    ObservableGauge,
    ObservableUpDownCounter,
    UpDownCounter,
)
from opentelemetry.sdk.metrics.export import AggregationTemporality, MetricExporter
from opentelemetry.sdk.metrics.view import (
    Aggregation,
    ExplicitBucketHistogramAggregation,
    ExponentialBucketHistogramAggregation,
)

from .log_limiter import ExporterLogFilter, install_log_filter
from .otlp import OtlpSettings

__all__ = [
    "DEFAULT_INTERVAL_S",
    "METRICS_PATH",
    "MetricPreferences",
    "make_metric_exporter",
    "metric_preferences",
    "metrics_endpoint",
    "metrics_interval",
]

DEFAULT_INTERVAL_S = 10.0
METRICS_PATH = "/v1/metrics"
_METRICS_ENDPOINT = "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT"
_ENDPOINT = "OTEL_EXPORTER_OTLP_ENDPOINT"
_TEMPORALITY = "OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE"
_HISTOGRAM_AGGREGATION = "OTEL_EXPORTER_OTLP_METRICS_DEFAULT_HISTOGRAM_AGGREGATION"

# The SDK loggers of a metrics export (the last one is the periodic reader's, which logs failed exports).
_SDK_METRIC_LOGGERS = (
    "opentelemetry.exporter.otlp.proto.grpc.exporter",
    "opentelemetry.exporter.otlp.proto.http.metric_exporter",
    "opentelemetry.exporter.otlp.common.http",
    "opentelemetry.sdk.metrics._internal.export",
)
_SDK_LOG_FILTER = ExporterLogFilter()


class MetricPreferences(NamedTuple):
    """The temporality and aggregation a metric exporter asks for, per instrument class."""

    temporality: dict[type, AggregationTemporality]
    aggregation: dict[type, Aggregation]


def metric_preferences(env: Mapping[str, str] = os.environ) -> MetricPreferences:
    """The preferences of the SDK's OTLP metric exporters, from the same variables they read.

    ``OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE``: ``cumulative`` (the default, and for values
    it does not know), ``delta`` (counters and histograms delta) or ``lowmemory`` (synchronous counters
    and histograms delta); ``OTEL_EXPORTER_OTLP_METRICS_DEFAULT_HISTOGRAM_AGGREGATION``: explicit buckets,
    or ``base2_exponential_bucket_histogram``.  (The SDK exporter, reading them too, warns about values it
    does not know.)
    """
    cumulative, delta = AggregationTemporality.CUMULATIVE, AggregationTemporality.DELTA
    preference = env.get(_TEMPORALITY, "CUMULATIVE").upper().strip()
    temporality: dict[type, AggregationTemporality] = dict.fromkeys(
        (Counter, UpDownCounter, Histogram, ObservableCounter, ObservableUpDownCounter, ObservableGauge),
        cumulative)
    if preference in ("DELTA", "LOWMEMORY"):
        temporality[Counter] = temporality[Histogram] = delta
        if preference == "DELTA":
            temporality[ObservableCounter] = delta
    exponential = env.get(_HISTOGRAM_AGGREGATION) == "base2_exponential_bucket_histogram"
    histogram: Aggregation = (ExponentialBucketHistogramAggregation() if exponential
                              else ExplicitBucketHistogramAggregation())
    aggregation: dict[type, Aggregation] = {Histogram: histogram}
    return MetricPreferences(temporality, aggregation)


def metrics_interval(cli_seconds: float | None, env: Mapping[str, str] = os.environ) -> float | None:
    """Export interval in seconds, ``None`` when metrics are off.

    ``--metrics-interval`` wins (0 turns metrics off); else ``OTEL_METRICS_EXPORTER=none`` turns them
    off and ``OTEL_METRIC_EXPORT_INTERVAL`` (milliseconds) sets the interval; else 10 s.
    Raises ``ValueError`` for a negative or unusable value.
    """
    if cli_seconds is not None:
        if cli_seconds < 0:
            raise ValueError("--metrics-interval must not be negative")
        return float(cli_seconds) or None
    if env.get("OTEL_METRICS_EXPORTER", "").strip().lower() == "none":
        return None
    raw = env.get("OTEL_METRIC_EXPORT_INTERVAL", "").strip()
    if raw:
        try:
            millis = float(raw)
        except ValueError:
            raise ValueError(f"OTEL_METRIC_EXPORT_INTERVAL: not a number of milliseconds: {raw!r}") from None
        if millis <= 0:
            raise ValueError("OTEL_METRIC_EXPORT_INTERVAL must be positive")
        return millis / 1000.0
    return DEFAULT_INTERVAL_S


def _metrics_url(base: str) -> str:
    trimmed = base.rstrip("/")
    if trimmed.endswith(METRICS_PATH):
        return trimmed
    trimmed = trimmed.removesuffix("/v1/traces")
    return trimmed + METRICS_PATH


def metrics_endpoint(settings: OtlpSettings, env: Mapping[str, str] = os.environ) -> str:
    """Where the metrics of these span settings go: the same collector.

    ``--otlp-endpoint`` (``source == "cli"``) is used for both signals. Otherwise
    ``OTEL_EXPORTER_OTLP_METRICS_ENDPOINT`` (as-is), else ``OTEL_EXPORTER_OTLP_ENDPOINT``, else the
    traces endpoint. For ``http/protobuf`` a base endpoint gets ``/v1/metrics``, and a traces URL has
    its ``/v1/traces`` replaced (a traces URL with another path keeps only its scheme and host).
    """
    endpoint = settings.endpoint
    if settings.source != "cli":
        if (e := env.get(_METRICS_ENDPOINT, "").strip()):
            return e
        if (e := env.get(_ENDPOINT, "").strip()):
            endpoint = e
    if settings.protocol == "grpc":
        return endpoint
    if settings.source == "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT" and endpoint == settings.endpoint:
        path = urlsplit(endpoint).path.rstrip("/")
        if not path.endswith("/v1/traces"):
            parts = urlsplit(endpoint)
            return f"{parts.scheme}://{parts.netloc}{METRICS_PATH}"
    return _metrics_url(endpoint)


def make_metric_exporter(settings: OtlpSettings, timeout: float = 5.0,
                         env: Mapping[str, str] = os.environ,
                         preferences: MetricPreferences | None = None) -> MetricExporter:
    """The SDK's OTLP metric exporter for the spans' protocol and endpoint.

    Headers, certificates and compression come from the usual ``OTEL_EXPORTER_OTLP_[METRICS_]*``
    variables, read by the SDK exporter itself (as for spans); the temporality and aggregation
    preferences are ``preferences``, by default :func:`metric_preferences` of ``env``.
    """
    prefs = preferences or metric_preferences(env)
    install_log_filter(_SDK_LOG_FILTER, _SDK_METRIC_LOGGERS)  # one line per template per 30 s: collector down
    endpoint = metrics_endpoint(settings, env)
    if settings.protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter

        scheme = urlsplit(endpoint).scheme.lower()
        insecure = True if scheme == "http" else False if scheme == "https" else None
        return OTLPMetricExporter(endpoint=endpoint, insecure=insecure, timeout=timeout,
                                  preferred_temporality=prefs.temporality,
                                  preferred_aggregation=prefs.aggregation)
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter as HttpExporter

    return HttpExporter(endpoint=endpoint, timeout=timeout, preferred_temporality=prefs.temporality,
                        preferred_aggregation=prefs.aggregation)

"""Export side of otel-envoy: turning finished span records into OTLP and getting them out.

Modules:

* :mod:`otel_envoy.export.span_queue` -- the non-blocking span queue with its background export thread.
* :mod:`otel_envoy.export.sinks` -- what the queue feeds: a JSON-lines file, an OTLP collector.
* :mod:`otel_envoy.export.sink_worker` -- each sink's own thread: a buffer bounded by bytes, retries.
* :mod:`otel_envoy.export.otlp_grpc`, :mod:`otel_envoy.export.otlp_http` -- send serialised trace requests
  to a collector, with the SDK exporters' settings; :mod:`otel_envoy.export.retry` -- their shared retry
  schedule.
* :mod:`otel_envoy.export.otlp_proto` -- writes the OTLP protobuf request of span records directly.
* :mod:`otel_envoy.export.otlp_json` -- a fast OTLP/JSON encoder of span records;
  :mod:`otel_envoy.export.otlp_json_decode` reads such requests back.
* :mod:`otel_envoy.export.grouping`, :mod:`otel_envoy.export.constant_cache` -- what both encoders share:
  records grouped by resource and scope, encodings of shared objects computed once.
* :mod:`otel_envoy.export.otlp` -- OTLP endpoint settings from the CLI and the standard
  ``OTEL_EXPORTER_OTLP_*`` environment variables, plus a reachability check.
* :mod:`otel_envoy.export.metrics`, :mod:`otel_envoy.export.metrics_settings` -- per-worker metrics.
* :mod:`otel_envoy.export.log_limiter` -- rate-limited logging of export failures.
* :mod:`otel_envoy.export.terminal` -- renders a JSON-lines span file as per-trace waterfalls.

The span model itself lives in :mod:`otel_envoy.spans.model`.
"""

__all__: list[str] = []

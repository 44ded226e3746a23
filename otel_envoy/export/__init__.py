"""Export side of otel-envoy: turning finished spans into OTLP and getting them out.

Modules:

* :mod:`otel_envoy.export.otlp_json` -- a fast OTLP/JSON encoder (and decoder) for
  ``ExportTraceServiceRequest`` payloads built from SDK ``ReadableSpan`` objects.
* :mod:`otel_envoy.export.records` -- :class:`SpanRecord`, a flat, plain-Python view of an
  exported span, built from OTLP/JSON or from the protobuf request.
* :mod:`otel_envoy.export.pipeline` -- the non-blocking span queue with its background export
  thread, and the sinks it feeds (JSON-lines file, OTLP gRPC / HTTP).
* :mod:`otel_envoy.export.otlp` -- OTLP endpoint settings from the CLI and the standard
  ``OTEL_EXPORTER_OTLP_*`` environment variables, plus a reachability check.
* :mod:`otel_envoy.export.terminal` -- renders a JSON-lines span file as per-trace waterfalls.
"""

__all__: list[str] = []

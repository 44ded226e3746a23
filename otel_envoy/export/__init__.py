"""Export side of otel-envoy: turning finished spans into OTLP and getting them out.

Modules:

* :mod:`otel_envoy.export.otlp_json` -- a fast OTLP/JSON encoder (and decoder) for
  ``ExportTraceServiceRequest`` payloads built from span records (or SDK ``ReadableSpan`` objects).
* :mod:`otel_envoy.export.records` -- :class:`SpanRecord`, the flat span the builders produce and the
  decoders return, and ``encode_request_proto``, which writes the OTLP protobuf request directly.
* :mod:`otel_envoy.export.pipeline` -- the non-blocking span queue with its background export
  thread, and the sinks it feeds (JSON-lines file, OTLP gRPC / HTTP).
* :mod:`otel_envoy.export.otlp` -- OTLP endpoint settings from the CLI and the standard
  ``OTEL_EXPORTER_OTLP_*`` environment variables, plus a reachability check.
* :mod:`otel_envoy.export.terminal` -- renders a JSON-lines span file as per-trace waterfalls.
"""

__all__: list[str] = []

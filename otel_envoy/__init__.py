"""otel-envoy: eBPF-derived OpenTelemetry spans for what happens inside Envoy's connections."""

__version__ = "0.1.0"

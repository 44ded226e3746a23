"""The only place that builds OpenTelemetry spans (finished ReadableSpans, built directly)."""

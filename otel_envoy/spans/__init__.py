"""The span model (spans.model.SpanRecord) and the only place that builds spans: finished span records, built
directly from the correlator's records."""

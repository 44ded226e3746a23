"""The only place that builds spans: finished span records (export.records.SpanRecord), built directly."""

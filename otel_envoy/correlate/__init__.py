"""Per-connection state machines that turn typed kernel events into finished connection records.

Pure: no bcc, no OpenTelemetry, time comes from the events themselves.
"""

"""The daemon's helpers that run without BPF."""

from __future__ import annotations


def test_new_kernel_drops_are_reported_while_running(caplog) -> None:
    """Above the rate the daemon follows, the kernel drops records: a warning says so at the next look."""
    import logging

    from otel_envoy.daemon import _report_new_drops

    class Probes:
        counts = {"ringbuf_full": 0, "conn_table_full": 0}

        def drop_counts(self) -> dict[str, int]:
            return dict(self.counts)

    probes = Probes()
    with caplog.at_level(logging.WARNING, logger="otel_envoy.daemon"):
        seen = _report_new_drops(probes, {})  # type: ignore[arg-type]
        assert not caplog.records
        probes.counts["ringbuf_full"] = 1234
        seen = _report_new_drops(probes, seen)  # type: ignore[arg-type]
        assert len(caplog.records) == 1 and "ringbuf_full=1234" in caplog.records[0].getMessage()
        _report_new_drops(probes, seen)  # type: ignore[arg-type]
        assert len(caplog.records) == 1  # nothing new: nothing said

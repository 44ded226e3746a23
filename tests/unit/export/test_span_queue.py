"""The span queue: bounded, never blocking, drained by one thread into every sink; failures counted per
sink."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from otel_envoy.export.otlp_json_decode import decode_request_json
from otel_envoy.export.sinks import JsonLinesFileSink, SpanSink
from otel_envoy.export.span_queue import ExportSpan, SpanPipeline
from otel_envoy.spans.model import SpanRecord
from tests.support.span_samples import BATCH_TRACE, batch_records, check_batch_records

TRACE = BATCH_TRACE


class BlockingSink(SpanSink):
    """Blocks the export thread (in :meth:`encode`) until released; records what it got."""

    name = "blocking"

    def __init__(self) -> None:
        self.release = threading.Event()
        self.entered = threading.Event()
        self.batches: list[int] = []
        self.closed = False

    def encode(self, spans: Sequence[SpanRecord]):
        self.entered.set()
        self.release.wait(10.0)
        return super().encode(spans)

    def export(self, spans: Sequence[SpanRecord]) -> bool:
        self.batches.append(len(spans))
        return True

    def shutdown(self) -> None:
        self.closed = True


class StuckSink(SpanSink):
    """Its deliveries block until released (a collector that does not answer)."""

    name = "stuck"

    def __init__(self) -> None:
        self.release = threading.Event()
        self.entered = threading.Event()
        self.spans: list[SpanRecord] = []

    def export(self, spans: Sequence[SpanRecord]) -> bool:
        self.entered.set()
        self.release.wait(20.0)
        self.spans.extend(spans)
        return True


class RaisingSink(SpanSink):
    name = "raising"

    def export(self, spans: Sequence[SpanRecord]) -> bool:
        raise RuntimeError("disk on fire")


class FalseSink(SpanSink):
    name = "false"

    def export(self, spans: Sequence[SpanRecord]) -> bool:
        return False


def test_queue_overflow_counts_drops_and_never_blocks() -> None:
    sink = BlockingSink()
    pipeline = SpanPipeline([sink], max_queue=10, max_batch=4, flush_interval=0.01)
    try:
        spans = batch_records(4)
        assert pipeline.submit(spans) == 4
        assert sink.entered.wait(5.0)  # the export thread now holds a batch of 4, queue is empty
        accepted = [pipeline.submit(spans) for _ in range(5)]  # 20 more spans, room for 10
        assert accepted == [4, 4, 2, 0, 0]
        stats = pipeline.stats()
        assert stats["drops"] == {"queue_full": 10}
        assert stats["queue_depth"] == 10
        assert stats["in_flight"] == 4
        assert stats["submitted"] == 24
        sink.release.set()
        assert pipeline.flush(10.0)
    finally:
        sink.release.set()
        pipeline.shutdown(5.0)
    assert sum(sink.batches) == 14
    assert max(sink.batches) <= 4
    assert sink.closed
    assert pipeline.stats()["exported"] == {"blocking": 14}


def test_failing_sinks_are_isolated(caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    good = JsonLinesFileSink(tmp_path / "out.jsonl")
    pipeline = SpanPipeline([RaisingSink(), FalseSink(), good], flush_interval=0.02)
    try:
        with caplog.at_level(logging.WARNING, logger="otel_envoy.export"):
            for i in range(3):
                pipeline.submit(batch_records(2, trace_id=TRACE + i))
                assert pipeline.flush(5.0)
    finally:
        pipeline.shutdown(5.0)
    stats = pipeline.stats()
    assert stats["drops"] == {"export_failed:raising": 6, "export_failed:false": 6}
    assert stats["exported"] == {"raising": 0, "false": 0, "jsonl": 6}
    messages = [r.getMessage() for r in caplog.records if r.name == "otel_envoy.export"]
    assert len(messages) == 2  # one per failure kind, rate-limited
    assert any("RuntimeError: disk on fire" in m for m in messages)


def test_a_sink_that_does_not_answer_delays_only_itself(tmp_path: Path) -> None:
    stuck = StuckSink()
    path = tmp_path / "out.jsonl"
    pipeline = SpanPipeline([stuck, JsonLinesFileSink(path)], max_batch=4, flush_interval=0.01)
    try:
        pipeline.submit(batch_records(4))
        assert stuck.entered.wait(5.0)
        for i in range(5):
            pipeline.submit(batch_records(4, first_id=100 + 10 * i))
        deadline = time.monotonic() + 5.0
        while pipeline.stats()["exported"]["jsonl"] < 24 and time.monotonic() < deadline:
            time.sleep(0.01)
        stats = pipeline.stats()
        assert stats["exported"] == {"stuck": 0, "jsonl": 24}  # the file got everything meanwhile
        assert stats["buffered"]["stuck"] == 24
        assert len(path.read_text().splitlines()) == 6
        stuck.release.set()
        assert pipeline.flush(10.0)
        assert pipeline.stats()["exported"] == {"stuck": 24, "jsonl": 24}
        assert len(stuck.spans) == 24
    finally:
        stuck.release.set()
        pipeline.shutdown(5.0)


def test_duplicate_sink_names_are_made_unique() -> None:
    pipeline = SpanPipeline([FalseSink(), FalseSink()])
    try:
        assert set(pipeline.stats()["exported"]) == {"false", "false#2"}
    finally:
        pipeline.shutdown(1.0)


def test_flush_interval_sends_partial_batches() -> None:
    sink = BlockingSink()
    sink.release.set()
    pipeline = SpanPipeline([sink], max_batch=1000, flush_interval=0.05)
    try:
        pipeline.submit(batch_records(3))
        assert pipeline.flush(5.0)
        assert sink.batches == [3]
    finally:
        pipeline.shutdown(5.0)


def test_shutdown_drains_queue(tmp_path: Path) -> None:
    path = tmp_path / "spans.jsonl"
    pipeline = SpanPipeline([JsonLinesFileSink(path)], max_batch=5, flush_interval=10.0)
    pipeline.submit(batch_records(12))
    pipeline.shutdown(5.0)
    pipeline.shutdown(5.0)  # idempotent
    lines = path.read_text().splitlines()
    assert len(lines) == 3  # 5 + 5 + 2
    records = [r for line in lines for r in decode_request_json(json.loads(line))]
    check_batch_records(records, 12)


# ------------------------------------------------------------------------------ waiting instead of dropping


class _SlowSink(SpanSink):
    name = "slow"

    def __init__(self) -> None:
        self.spans: list[ExportSpan] = []
        self.lock = threading.Lock()

    def export(self, spans: Sequence[ExportSpan]) -> bool:
        time.sleep(0.002)
        with self.lock:
            self.spans.extend(spans)
        return True


def _span(i: int) -> SpanRecord:
    return SpanRecord(f"{1:032x}", f"{i + 1:016x}", None, "s")


def test_a_blocking_pipeline_waits_for_room_instead_of_dropping() -> None:
    sink = _SlowSink()
    pipeline = SpanPipeline([sink], max_queue=10, max_batch=4, flush_interval=0.01, block_when_full=True)
    for i in range(0, 99, 3):
        assert pipeline.submit([_span(i), _span(i + 1), _span(i + 2)]) == 3
    pipeline.shutdown(10.0)
    assert len(sink.spans) == 99
    assert pipeline.stats()["drops"] == {}


def test_a_default_pipeline_still_drops_when_full() -> None:
    sink = _SlowSink()
    pipeline = SpanPipeline([sink], max_queue=10, max_batch=4, flush_interval=0.01)
    accepted = sum(pipeline.submit([_span(i), _span(i + 1), _span(i + 2)]) for i in range(0, 99, 3))
    pipeline.shutdown(10.0)
    assert accepted == len(sink.spans) < 99
    assert pipeline.stats()["drops"]["queue_full"] == 99 - accepted

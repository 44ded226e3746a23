"""Span pipeline and sinks, against a real in-process OTLP receiver (gRPC and HTTP)."""

from __future__ import annotations

import json
import logging
import socket
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanContext, SpanKind, TraceFlags
from opentelemetry.trace.status import Status, StatusCode

from otel_envoy.export.otlp import (
    OtlpSettings,
    check_reachable,
    endpoint_host_port,
    resolve_otlp_settings,
)
from otel_envoy.export.otlp_json import decode_request_json, encode_request_json
from otel_envoy.export.pipeline import JsonLinesFileSink, OtlpSink, SpanPipeline, SpanSink
from otel_envoy.export.records import SpanRecord
from tests.support.otlp_receiver import OtlpReceiver

RESOURCE = Resource.create({"service.name": "otel-envoy-test"})
SCOPE = InstrumentationScope("otel-envoy", "0.1.0")
T0 = 1_700_000_000_000_000_000
TRACE = 0xABCDEF0123456789ABCDEF0123456789


@pytest.fixture(autouse=True)
def _clean_otel_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("OTEL_"):
            monkeypatch.delenv(name)


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as rx:
        yield rx


@pytest.fixture
def rx(receiver: OtlpReceiver) -> OtlpReceiver:
    receiver.set_failing(False)
    receiver.clear()
    return receiver


def make_spans(n: int, trace_id: int = TRACE, first_id: int = 1) -> list[ReadableSpan]:
    """A root span plus ``n - 1`` children, with events, links and a mix of statuses."""
    root_ctx = SpanContext(trace_id, first_id, False, TraceFlags(1))
    spans = []
    for i in range(n):
        span_id = first_id + i
        spans.append(
            ReadableSpan(
                name="envoy.connection" if i == 0 else f"child.{i}",
                context=SpanContext(trace_id, span_id, False, TraceFlags(1)),
                parent=None if i == 0 else root_ctx,
                resource=RESOURCE,
                attributes={
                    "index": i,
                    "network.peer.address": "10.0.0.1",
                    "tls.resumed": i % 2 == 0,
                    "ratio": i / 4,
                    "names": ("a", "b"),
                },
                events=[Event("evt", {"n": i}, timestamp=T0 + i * 1000 + 500)],
                links=[Link(SpanContext(trace_id, first_id, False, TraceFlags(1)), {"why": "x"})]
                if i
                else [],
                kind=SpanKind.SERVER if i == 0 else SpanKind.INTERNAL,
                status=Status(StatusCode.ERROR, "boom") if i == 2 else Status(StatusCode.UNSET),
                start_time=T0 + i * 1000,
                end_time=T0 + i * 1000 + 900,
                instrumentation_scope=SCOPE,
            )
        )
    return spans


def _check_records(records: list, n: int) -> None:
    by_name = {r.name: r for r in records}
    assert len(by_name) == n
    root = by_name["envoy.connection"]
    assert root.trace_id == f"{TRACE:032x}"
    assert root.span_id == "0000000000000001"
    assert root.parent_span_id is None
    assert root.kind == 2
    assert root.resource_attributes["service.name"] == "otel-envoy-test"
    child = by_name["child.2"]
    assert child.parent_span_id == "0000000000000001"
    assert child.attributes == {
        "index": 2,
        "network.peer.address": "10.0.0.1",
        "tls.resumed": True,
        "ratio": 0.5,
        "names": ["a", "b"],
    }
    assert child.status_code == 2 and child.status_message == "boom"
    assert child.events == [(T0 + 2500, "evt", {"n": 2})]
    assert child.links == [(f"{TRACE:032x}", "0000000000000001", {"why": "x"})]
    assert child.start_ns == T0 + 2000 and child.end_ns == T0 + 2900


# --------------------------------------------------------------------------------------------- OTLP


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_spans_arrive_intact(rx: OtlpReceiver, protocol: str) -> None:
    endpoint = rx.grpc_endpoint if protocol == "grpc" else rx.http_endpoint  # http: base URL
    sink = OtlpSink(protocol, endpoint, timeout=5.0)
    pipeline = SpanPipeline([sink], flush_interval=0.05)
    try:
        assert pipeline.submit(make_spans(5)) == 5
        assert pipeline.flush(10.0)
        records = rx.wait_for(lambda s: len(s) >= 5, timeout=10.0)
    finally:
        pipeline.shutdown(5.0)
    _check_records(records, 5)
    key = "grpc" if protocol == "grpc" else "http/protobuf"
    assert rx.requests[key] >= 1
    stats = pipeline.stats()
    assert stats["exported"] == {sink.name: 5}
    assert stats["drops"] == {}
    assert stats["queue_depth"] == 0


def test_http_endpoint_gets_traces_path() -> None:
    assert OtlpSink("http/protobuf", "http://127.0.0.1:4318").endpoint == "http://127.0.0.1:4318/v1/traces"
    assert OtlpSink("http/protobuf", "http://h:4318/").endpoint == "http://h:4318/v1/traces"
    assert OtlpSink("http/protobuf", "http://h:4318/v1/traces").endpoint == "http://h:4318/v1/traces"
    sink = OtlpSink("http/protobuf", "http://h/custom", append_traces_path=False)
    assert sink.endpoint == "http://h/custom"


def test_from_settings_uses_env_endpoint(rx: OtlpReceiver, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", rx.http_endpoint)
    settings = resolve_otlp_settings(None, None)
    assert settings is not None and settings.protocol == "http/protobuf"
    sink = OtlpSink.from_settings(settings, timeout=5.0)
    assert sink.export(make_spans(3))
    _check_records(rx.wait_for(lambda s: len(s) >= 3), 3)
    sink.shutdown()


def test_sdk_reads_env_when_endpoint_is_none(rx: OtlpReceiver, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", rx.grpc_endpoint)
    sink = OtlpSink("grpc", None, timeout=5.0)
    try:
        assert sink.export(make_spans(3))
    finally:
        sink.shutdown()
    assert len(rx.wait_for(lambda s: len(s) >= 3)) == 3


def test_many_batches(rx: OtlpReceiver) -> None:
    pipeline = SpanPipeline([OtlpSink("grpc", rx.grpc_endpoint)], max_batch=64, flush_interval=0.05)
    try:
        for i in range(20):
            pipeline.submit(make_spans(10, trace_id=TRACE + i))
        assert pipeline.flush(15.0)
    finally:
        pipeline.shutdown(5.0)
    assert len(rx.wait_for(lambda s: len(s) >= 200)) == 200
    stats = pipeline.stats()
    assert stats["exported"]["otlp-grpc"] == 200
    assert stats["batches"]["otlp-grpc"] >= 4  # 200 spans in batches of at most 64


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_failing_receiver_counts_export_failures(
    rx: OtlpReceiver, protocol: str, caplog: pytest.LogCaptureFixture
) -> None:
    endpoint = rx.grpc_endpoint if protocol == "grpc" else rx.http_endpoint
    # A short timeout: the SDK gives up instead of sleeping through its exponential backoff.
    sink = OtlpSink(protocol, endpoint, timeout=0.5)
    rx.set_failing(True)
    pipeline = SpanPipeline([sink], flush_interval=0.05)
    try:
        with caplog.at_level(logging.WARNING, logger="otel_envoy.export"):
            assert pipeline.submit(make_spans(4)) == 4
            assert pipeline.flush(15.0)
            assert pipeline.submit(make_spans(3, first_id=100)) == 3
            assert pipeline.flush(15.0)
        stats = pipeline.stats()
        assert stats["drops"] == {f"export_failed:{sink.name}": 7}
        assert stats["exported"][sink.name] == 0
        key = "grpc" if protocol == "grpc" else "http/protobuf"
        assert rx.rejected[key] >= 2
        ours = [r for r in caplog.records if r.name == "otel_envoy.export"]
        assert len(ours) == 1  # rate-limited: one line per failure kind
        assert sink.name in ours[0].getMessage()

        # The receiver recovers: the next batch goes through.
        rx.set_failing(False)
        pipeline.submit(make_spans(2, first_id=200))
        assert pipeline.flush(15.0)
        assert pipeline.stats()["exported"][sink.name] == 2
    finally:
        pipeline.shutdown(5.0)


def test_unreachable_endpoint_never_raises_and_shutdown_is_bounded() -> None:
    port = _closed_port()
    sink = OtlpSink("grpc", f"http://127.0.0.1:{port}", timeout=5.0)
    pipeline = SpanPipeline([sink], flush_interval=0.05)
    for _ in range(5):
        pipeline.submit(make_spans(3))
    pipeline.shutdown(1.0)  # must not hang on the SDK's retries
    stats = pipeline.stats()
    assert stats["exported"]["otlp-grpc"] == 0
    assert sum(stats["drops"].values()) == 15
    assert set(stats["drops"]) <= {"export_failed:otlp-grpc", "shutdown"}
    assert pipeline.submit(make_spans(1)) == 0
    assert pipeline.stats()["drops"]["shutdown"] >= 1


# --------------------------------------------------------------------------------------------- pipeline


class BlockingSink(SpanSink):
    """Blocks every export until released; records what it got."""

    name = "blocking"

    def __init__(self) -> None:
        self.release = threading.Event()
        self.entered = threading.Event()
        self.batches: list[int] = []
        self.closed = False

    def export(self, spans: Sequence[ReadableSpan]) -> bool:
        self.entered.set()
        self.release.wait(10.0)
        self.batches.append(len(spans))
        return True

    def shutdown(self) -> None:
        self.closed = True


class RaisingSink(SpanSink):
    name = "raising"

    def export(self, spans: Sequence[ReadableSpan]) -> bool:
        raise RuntimeError("disk on fire")


class FalseSink(SpanSink):
    name = "false"

    def export(self, spans: Sequence[ReadableSpan]) -> bool:
        return False


def test_queue_overflow_counts_drops_and_never_blocks() -> None:
    sink = BlockingSink()
    pipeline = SpanPipeline([sink], max_queue=10, max_batch=4, flush_interval=0.01)
    try:
        spans = make_spans(4)
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
                pipeline.submit(make_spans(2, trace_id=TRACE + i))
                assert pipeline.flush(5.0)
    finally:
        pipeline.shutdown(5.0)
    stats = pipeline.stats()
    assert stats["drops"] == {"export_failed:raising": 6, "export_failed:false": 6}
    assert stats["exported"] == {"raising": 0, "false": 0, "jsonl": 6}
    messages = [r.getMessage() for r in caplog.records if r.name == "otel_envoy.export"]
    assert len(messages) == 2  # one per failure kind, rate-limited
    assert any("RuntimeError: disk on fire" in m for m in messages)


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
        pipeline.submit(make_spans(3))
        assert pipeline.flush(5.0)
        assert sink.batches == [3]
    finally:
        pipeline.shutdown(5.0)


def test_shutdown_drains_queue(tmp_path: Path) -> None:
    path = tmp_path / "spans.jsonl"
    pipeline = SpanPipeline([JsonLinesFileSink(path)], max_batch=5, flush_interval=10.0)
    pipeline.submit(make_spans(12))
    pipeline.shutdown(5.0)
    pipeline.shutdown(5.0)  # idempotent
    lines = path.read_text().splitlines()
    assert len(lines) == 3  # 5 + 5 + 2
    records = [r for line in lines for r in decode_request_json(json.loads(line))]
    _check_records(records, 12)


def test_jsonl_sink_truncates_and_writes_one_line_per_batch(tmp_path: Path) -> None:
    path = tmp_path / "spans.jsonl"
    path.write_text("old content\n")
    sink = JsonLinesFileSink(path)
    assert path.read_text() == ""
    assert sink.export(make_spans(3))
    assert sink.export([])  # empty batch: no line
    assert sink.export(make_spans(2, trace_id=TRACE + 1))
    # Flushed after every batch: readable before shutdown.
    lines = path.read_text().splitlines()
    assert len(lines) == 2
    assert [len(decode_request_json(json.loads(line))) for line in lines] == [3, 2]
    sink.shutdown()
    sink.shutdown()
    assert sink.export(make_spans(1)) is False


# --------------------------------------------------------------------------------------------- settings


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_resolve_settings_precedence() -> None:
    assert resolve_otlp_settings(None, None, env={}) is None
    assert resolve_otlp_settings(None, "grpc", env={}) is None

    s = resolve_otlp_settings("http://c:4318", None, env={})
    assert s == OtlpSettings("http://c:4318", "http/protobuf", "http://c:4318/v1/traces", "cli")

    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://base:4318",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
    }
    s = resolve_otlp_settings(None, None, env=env)
    assert s is not None
    assert (s.endpoint, s.protocol, s.export_endpoint, s.source) == (
        "http://base:4318",
        "grpc",
        "http://base:4318",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
    )

    env["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"] = "http://traces:4318/custom/path"
    env["OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"] = "http/protobuf"
    s = resolve_otlp_settings(None, None, env=env)
    assert s is not None
    # The signal-specific endpoint is a full URL: used as-is.
    assert (s.endpoint, s.protocol, s.export_endpoint) == (
        "http://traces:4318/custom/path",
        "http/protobuf",
        "http://traces:4318/custom/path",
    )

    # CLI beats everything.
    s = resolve_otlp_settings("http://cli:4317", "grpc", env=env)
    assert s is not None and (s.endpoint, s.protocol, s.source) == ("http://cli:4317", "grpc", "cli")

    # Empty values count as unset.
    s = resolve_otlp_settings("", " ", env={"OTEL_EXPORTER_OTLP_ENDPOINT": "http://e:4318"})
    assert s is not None and s.protocol == "http/protobuf" and s.export_endpoint == "http://e:4318/v1/traces"


def test_resolve_settings_rejects_unknown_protocol() -> None:
    with pytest.raises(ValueError, match="http/json"):
        resolve_otlp_settings("http://c:4318", "http/json", env={})
    with pytest.raises(ValueError, match="OTEL_EXPORTER_OTLP_PROTOCOL"):
        resolve_otlp_settings("http://c:4318", None, env={"OTEL_EXPORTER_OTLP_PROTOCOL": "carrier-pigeon"})


def test_endpoint_host_port() -> None:
    assert endpoint_host_port("http://127.0.0.1:4317", "grpc") == ("127.0.0.1", 4317)
    assert endpoint_host_port("https://collector.example", "http/protobuf") == ("collector.example", 443)
    assert endpoint_host_port("http://collector", "http/protobuf") == ("collector", 80)
    assert endpoint_host_port("collector", "grpc") == ("collector", 4317)
    assert endpoint_host_port("collector:9999", "grpc") == ("collector", 9999)
    assert endpoint_host_port("http://[::1]:4318/v1/traces", "http/protobuf") == ("::1", 4318)


def test_check_reachable(rx: OtlpReceiver) -> None:
    ok = resolve_otlp_settings(rx.grpc_endpoint, "grpc", env={})
    assert ok is not None and check_reachable(ok) is None
    ok_http = resolve_otlp_settings(rx.http_endpoint, None, env={})
    assert ok_http is not None and check_reachable(ok_http) is None

    endpoint = f"http://127.0.0.1:{_closed_port()}"
    bad = resolve_otlp_settings(endpoint, "grpc", env={})
    assert bad is not None
    message = check_reachable(bad, timeout=2.0)
    assert message == f"OTLP endpoint {endpoint} is unreachable: Connection refused"
    assert "\n" not in message

    unresolvable = resolve_otlp_settings("http://no-such-host.invalid:4317", "grpc", env={})
    assert unresolvable is not None
    message = check_reachable(unresolvable, timeout=2.0)
    assert message is not None and message.startswith(
        "OTLP endpoint http://no-such-host.invalid:4317 is unreachable"
    )


# --------------------------------------------------------------------------------------------- records


def make_records(n: int, trace_id: int = TRACE, first_id: int = 1) -> list[SpanRecord]:
    """The spans of :func:`make_spans` as records (what the span builder hands the pipeline)."""
    records = decode_request_json(json.loads(encode_request_json(make_spans(n, trace_id, first_id))))
    shared = records[0].resource_attributes
    for r in records:  # one resource dict, as the builder does
        r.resource_attributes = shared
    return records


def _by_id(records: list[SpanRecord]) -> list[SpanRecord]:
    return sorted(records, key=lambda r: r.span_id)


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_records_arrive_intact(rx: OtlpReceiver, protocol: str) -> None:
    endpoint = rx.grpc_endpoint if protocol == "grpc" else rx.http_endpoint
    sink = OtlpSink(protocol, endpoint, timeout=5.0)
    # Our own encoder on the SDK exporter's transport, not the SDK's encoder.
    if protocol == "grpc":
        assert type(sink._exporter._client).__name__ == "_RawTraceServiceStub"
    else:
        assert sink._exporter._encodes_records
    records = make_records(5)
    pipeline = SpanPipeline([sink], flush_interval=0.05)
    try:
        assert pipeline.submit(records) == 5
        assert pipeline.flush(10.0)
        received = rx.wait_for(lambda s: len(s) >= 5, timeout=10.0)
    finally:
        pipeline.shutdown(5.0)
    _check_records(received, 5)
    assert _by_id(received) == _by_id(records)
    assert pipeline.stats()["exported"] == {sink.name: 5}


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_records_and_sdk_spans_in_one_batch(rx: OtlpReceiver, protocol: str) -> None:
    endpoint = rx.grpc_endpoint if protocol == "grpc" else rx.http_endpoint
    sink = OtlpSink(protocol, endpoint, timeout=5.0)
    try:
        assert sink.export([*make_records(3), *make_spans(2, trace_id=TRACE + 1)])
    finally:
        sink.shutdown()
    received = rx.wait_for(lambda s: len(s) >= 5)
    assert sorted(r.trace_id for r in received) == [f"{TRACE:032x}"] * 3 + [f"{TRACE + 1:032x}"] * 2


def test_otlp_sinks_fall_back_when_sdk_internals_differ(rx: OtlpReceiver) -> None:
    """Should an SDK release move what the fast paths use, records still go out (through SDK objects)."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2_grpc import TraceServiceStub

    grpc_sink = OtlpSink("grpc", rx.grpc_endpoint, timeout=5.0)
    grpc_sink._exporter._client = TraceServiceStub(grpc_sink._exporter._channel)  # the SDK's own stub
    http_sink = OtlpSink("http/protobuf", rx.http_endpoint, timeout=5.0)
    http_sink._exporter._encodes_records = False
    try:
        for sink, key in ((grpc_sink, "grpc"), (http_sink, "http/protobuf")):
            rx.clear()
            assert sink.export(make_records(3))
            _check_records(rx.wait_for(lambda s: len(s) >= 3), 3)
            assert rx.requests[key] == 1
    finally:
        grpc_sink.shutdown()
        http_sink.shutdown()


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_failing_receiver_counts_record_export_failures(rx: OtlpReceiver, protocol: str) -> None:
    endpoint = rx.grpc_endpoint if protocol == "grpc" else rx.http_endpoint
    # Room for exactly one retry: the SDK backs off 0.8-1.2 s after a first failure, 1.6-2.4 s after a second.
    sink = OtlpSink(protocol, endpoint, timeout=2.3)
    rx.set_failing(True)
    pipeline = SpanPipeline([sink], flush_interval=0.05)
    try:
        assert pipeline.submit(make_records(4)) == 4
        assert pipeline.flush(15.0)
        assert pipeline.stats()["drops"] == {f"export_failed:{sink.name}": 4}
        key = "grpc" if protocol == "grpc" else "http/protobuf"
        assert rx.rejected[key] == 2  # the SDK's retry sent the same request again
        if protocol == "grpc":  # UNAVAILABLE made the SDK build a new channel: still with our stub
            assert type(sink._exporter._client).__name__ == "_RawTraceServiceStub"
        rx.set_failing(False)
        pipeline.submit(make_records(2, first_id=200))
        assert pipeline.flush(15.0)
        assert pipeline.stats()["exported"][sink.name] == 2
    finally:
        pipeline.shutdown(5.0)


def test_jsonl_sink_writes_records(tmp_path: Path) -> None:
    path = tmp_path / "records.jsonl"
    sink = JsonLinesFileSink(path)
    records = make_records(4)
    assert sink.export(records)
    assert sink.export(make_spans(4))  # the same spans as SDK spans
    sink.shutdown()
    first, second = path.read_text().splitlines()
    assert _by_id(decode_request_json(json.loads(first))) == _by_id(records)
    assert _by_id(decode_request_json(json.loads(second))) == _by_id(records)

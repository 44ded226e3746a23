"""The sinks: OTLP (gRPC and HTTP, against a real in-process OTLP receiver) and the JSON-lines file."""

from __future__ import annotations

import dataclasses
import json
import logging
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from otel_envoy.export.otlp import resolve_otlp_settings
from otel_envoy.export.otlp_grpc import GrpcTraceSender
from otel_envoy.export.otlp_http import HttpTraceSender
from otel_envoy.export.otlp_json import encode_request_json
from otel_envoy.export.otlp_json_decode import decode_request_json
from otel_envoy.export.sinks import (
    JsonLinesFileSink,
    OtlpSink,
    encode_leaving_out_bad,
    span_ids_valid,
    spans_with_valid_ids,
)
from otel_envoy.export.span_queue import SpanPipeline
from otel_envoy.spans.model import SpanRecord
from tests.support.otlp_receiver import OtlpReceiver
from tests.support.span_samples import BATCH_TRACE, batch_records, check_batch_records

TRACE = BATCH_TRACE


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


def _by_id(records: list[SpanRecord]) -> list[SpanRecord]:
    return sorted(records, key=lambda r: r.span_id)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------------------------- OTLP


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_records_arrive_intact(rx: OtlpReceiver, protocol: str) -> None:
    endpoint = rx.grpc_endpoint if protocol == "grpc" else rx.http_endpoint  # http: base URL
    sink = OtlpSink(protocol, endpoint, timeout=5.0)
    # Our own encoder and sender, not the SDK's exporter.
    assert type(sink.sender) is (GrpcTraceSender if protocol == "grpc" else HttpTraceSender)
    records = batch_records(5)
    pipeline = SpanPipeline([sink], flush_interval=0.05)
    try:
        assert pipeline.submit(records) == 5
        assert pipeline.flush(10.0)
        received = rx.wait_for(lambda s: len(s) >= 5, timeout=10.0)
    finally:
        pipeline.shutdown(5.0)
    check_batch_records(received, 5)
    assert _by_id(received) == _by_id(records)
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
    assert sink.export(batch_records(3))
    check_batch_records(rx.wait_for(lambda s: len(s) >= 3), 3)
    sink.shutdown()


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_env_endpoint_when_endpoint_is_none(rx: OtlpReceiver, protocol: str,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    endpoint = rx.grpc_endpoint if protocol == "grpc" else rx.http_endpoint
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
    sink = OtlpSink(protocol, None, timeout=5.0)
    try:
        assert sink.export(batch_records(3))
    finally:
        sink.shutdown()
    assert len(rx.wait_for(lambda s: len(s) >= 3)) == 3


@pytest.mark.parametrize(("protocol", "compression"),  # OTLP/gRPC compresses with gzip only
                         [("grpc", "gzip"), ("http/protobuf", "gzip"), ("http/protobuf", "deflate")])
def test_compression_from_the_environment(rx: OtlpReceiver, protocol: str, compression: str,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_COMPRESSION", compression)
    sink = OtlpSink(protocol, rx.grpc_endpoint if protocol == "grpc" else rx.http_endpoint, timeout=5.0)
    try:
        assert sink.export(batch_records(4))
    finally:
        sink.shutdown()
    check_batch_records(rx.wait_for(lambda s: len(s) >= 4), 4)


def test_many_batches(rx: OtlpReceiver) -> None:
    pipeline = SpanPipeline([OtlpSink("grpc", rx.grpc_endpoint)], max_batch=64, flush_interval=0.05)
    try:
        for i in range(20):
            pipeline.submit(batch_records(10, trace_id=TRACE + i))
        assert pipeline.flush(15.0)
    finally:
        pipeline.shutdown(5.0)
    assert len(rx.wait_for(lambda s: len(s) >= 200)) == 200
    stats = pipeline.stats()
    assert stats["exported"]["otlp-grpc"] == 200
    assert stats["batches"]["otlp-grpc"] >= 4  # 200 spans in batches of at most 64


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def _accounted(stats: dict) -> None:
    """Every span handed to each sink is sent, dropped with a reason, or still buffered."""
    for name, st in stats["sinks"].items():
        settled = st["sent"] + st["buffer_full"] + st["failed"] + st["unsent"]
        assert st["handed"] == settled + st["buffered"], (name, st)


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_a_failing_receiver_s_batches_are_kept_and_arrive_when_it_recovers(
    rx: OtlpReceiver, protocol: str, caplog: pytest.LogCaptureFixture
) -> None:
    endpoint = rx.grpc_endpoint if protocol == "grpc" else rx.http_endpoint
    # A short timeout: the sender gives up quickly and the sink's worker keeps the batch to try again.
    sink = OtlpSink(protocol, endpoint, timeout=0.5)
    rx.set_failing(True)
    pipeline = SpanPipeline([sink], flush_interval=0.05)
    key = "grpc" if protocol == "grpc" else "http/protobuf"
    try:
        with caplog.at_level(logging.WARNING, logger="otel_envoy.export"):
            assert pipeline.submit(batch_records(4)) == 4
            assert pipeline.submit(batch_records(3, first_id=100)) == 3
            assert not pipeline.flush(1.5)  # not delivered: kept
            _wait(lambda: pipeline.stats()["sinks"][sink.name]["retries"] >= 1, 10, "a retry")
            stats = pipeline.stats()
            assert stats["drops"] == {}
            assert stats["buffered"][sink.name] == 7 and stats["exported"][sink.name] == 0
            _accounted(stats)
            assert rx.rejected[key] >= 2
            ours = [r for r in caplog.records if r.name == "otel_envoy.export"]
            assert len(ours) == 1 and sink.name in ours[0].getMessage()  # rate-limited
            sender_lines = [r for r in caplog.records if r.name == "otel_envoy.export.otlp"]
            assert len(sender_lines) <= 2  # the sender's own lines: once per template within 30 s

        rx.set_failing(False)  # the receiver recovers: both batches arrive, in order
        assert pipeline.flush(15.0)
        stats = pipeline.stats()
        assert stats["exported"][sink.name] == 7 and stats["buffered"][sink.name] == 0
        assert stats["drops"] == {}
        _accounted(stats)
        sent = batch_records(4) + batch_records(3, first_id=100)
        assert [r.span_id for r in rx.spans()] == [r.span_id for r in sent]
    finally:
        pipeline.shutdown(5.0)


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_a_refused_batch_is_counted_not_retried(rx: OtlpReceiver, protocol: str) -> None:
    endpoint = rx.grpc_endpoint if protocol == "grpc" else rx.http_endpoint
    sink = OtlpSink(protocol, endpoint, timeout=5.0)
    rx.set_failing(True, permanent=True)
    pipeline = SpanPipeline([sink], flush_interval=0.05)
    try:
        assert pipeline.submit(batch_records(4)) == 4
        assert pipeline.flush(15.0)
        stats = pipeline.stats()
        assert stats["drops"] == {f"export_failed:{sink.name}": 4}
        assert stats["sinks"][sink.name]["retries"] == 0
        key = "grpc" if protocol == "grpc" else "http/protobuf"
        assert rx.rejected[key] == 1  # the sender did not send it again either
        _accounted(stats)
        rx.set_failing(False)
        pipeline.submit(batch_records(2, first_id=200))
        assert pipeline.flush(15.0)
        assert pipeline.stats()["exported"][sink.name] == 2
    finally:
        pipeline.shutdown(5.0)


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_a_collector_restart_loses_nothing(protocol: str) -> None:
    """The receiver is stopped (its port closed: connections refused), spans are made, it starts again on
    the same port: every span arrives."""
    rx = OtlpReceiver().start()
    endpoint = rx.grpc_endpoint if protocol == "grpc" else rx.http_endpoint
    sink = OtlpSink(protocol, endpoint, timeout=1.0)
    pipeline = SpanPipeline([sink], flush_interval=0.05)
    try:
        pipeline.submit(batch_records(2))
        assert pipeline.flush(10.0)
        rx.stop()
        for i in range(5):
            pipeline.submit(batch_records(3, first_id=100 + 10 * i))
            time.sleep(0.3)
        assert not pipeline.flush(0.5)
        rx.start(same_ports=True)
        assert pipeline.flush(30.0), pipeline.stats()
        stats = pipeline.stats()
        assert stats["exported"][sink.name] == 17 and stats["drops"] == {}
        assert stats["sinks"][sink.name]["retries"] >= 1
        ids = {r.span_id for r in rx.spans()}  # the 2 before the outage and the 15 made during it
        assert ids == {r.span_id for i in range(5) for r in batch_records(3, first_id=100 + 10 * i)} | {
            r.span_id for r in batch_records(2)}
    finally:
        pipeline.shutdown(5.0)
        rx.stop()


def test_the_buffer_stays_within_its_bound_and_counts_what_it_drops() -> None:
    port = _closed_port()
    sink = OtlpSink("http/protobuf", f"http://127.0.0.1:{port}", timeout=0.3)
    one = len(sink.encode(batch_records(10)).payload)  # type: ignore[union-attr]
    bound = 5 * one
    pipeline = SpanPipeline([sink], flush_interval=0.01, max_batch=10, buffer_bytes=bound)
    try:
        peak = 0
        for i in range(40):
            pipeline.submit(batch_records(10, first_id=1000 + 10 * i))
            time.sleep(0.01)
            peak = max(peak, pipeline.stats()["sinks"][sink.name]["buffered_bytes"])
        _wait(lambda: pipeline.stats()["sinks"][sink.name]["handed"] == 400, 10, "every batch handed")
        stats = pipeline.stats()
        assert peak <= bound and stats["sinks"][sink.name]["peak_buffered_bytes"] <= bound
        assert stats["sinks"][sink.name]["buffered_bytes"] <= bound
        assert stats["drops"][f"export_buffer_full:{sink.name}"] >= 300
        assert stats["exported"][sink.name] == 0
        _accounted(stats)
    finally:
        pipeline.shutdown(1.0)
    stats = pipeline.stats()
    assert sum(stats["drops"].values()) == 400
    assert set(stats["drops"]) == {f"export_buffer_full:{sink.name}", f"export_unsent:{sink.name}"}


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_unreachable_endpoint_never_raises_and_shutdown_is_bounded(protocol: str) -> None:
    port = _closed_port()
    sink = OtlpSink(protocol, f"http://127.0.0.1:{port}", timeout=5.0)
    pipeline = SpanPipeline([sink], flush_interval=0.05)
    for _ in range(5):
        pipeline.submit(batch_records(3))
    started = time.monotonic()
    pipeline.shutdown(1.0)  # must not hang on the sender's retries
    assert time.monotonic() - started < 2.5
    stats = pipeline.stats()
    assert stats["exported"][sink.name] == 0
    assert sum(stats["drops"].values()) == 15
    assert set(stats["drops"]) <= {f"export_unsent:{sink.name}", "shutdown"}
    assert pipeline.submit(batch_records(1)) == 0
    assert pipeline.stats()["drops"]["shutdown"] >= 1


def test_a_shut_down_sink_exports_nothing(rx: OtlpReceiver) -> None:
    sink = OtlpSink("http/protobuf", rx.http_endpoint, timeout=5.0)
    sink.shutdown()
    sink.shutdown()  # idempotent
    assert sink.export(batch_records(1)) is False
    assert rx.requests["http/protobuf"] == 0


# --------------------------------------------------------------------------------------------- JSON lines


def test_jsonl_sink_truncates_and_writes_one_line_per_batch(tmp_path: Path) -> None:
    path = tmp_path / "spans.jsonl"
    path.write_text("old content\n")
    sink = JsonLinesFileSink(path)
    assert path.read_text() == ""
    assert sink.export(batch_records(3))
    assert sink.export([])  # empty batch: no line
    assert sink.export(batch_records(2, trace_id=TRACE + 1))
    # Flushed after every batch: readable before shutdown.
    lines = path.read_text().splitlines()
    assert len(lines) == 2
    assert [len(decode_request_json(json.loads(line))) for line in lines] == [3, 2]
    sink.shutdown()
    sink.shutdown()
    assert sink.export(batch_records(1)) is False


def test_jsonl_sink_writes_records(tmp_path: Path) -> None:
    path = tmp_path / "records.jsonl"
    sink = JsonLinesFileSink(path)
    records = batch_records(4)
    assert sink.export(records)
    sink.shutdown()
    (first,) = path.read_text().splitlines()
    assert _by_id(decode_request_json(json.loads(first))) == _by_id(records)


# --------------------------------------------------------------------------------- one bad span, not a batch


def _bad_spans() -> list[SpanRecord]:
    """Spans each wrong in one way: a signed id (what int(x, 16) once let through), an all-zero trace id, a
    parent id of the wrong length, a link to an upper-case trace id."""
    base = batch_records(1)[0]
    return [
        dataclasses.replace(base, span_id="-000000000000001", name="signed-id"),
        dataclasses.replace(base, trace_id="0" * 32, span_id="00000000000000a1", name="zero-trace"),
        dataclasses.replace(base, span_id="00000000000000a2", parent_span_id="abc", name="short-parent"),
        dataclasses.replace(base, span_id="00000000000000a3", links=[("AB" * 16, "00000000000000a4", {})],
                            name="bad-link"),
    ]


def test_when_a_batch_fails_to_encode_each_span_is_tried_alone() -> None:
    """The ids pass but the encoder still raises for one span (a value it cannot take): that span is left
    out and counted, the others are encoded together."""
    good = batch_records(4)
    poisoned = dataclasses.replace(good[0], span_id="00000000000000b1", name="poisoned")

    def encode(spans):
        if any(r.name == "poisoned" for r in spans):
            raise ValueError("cannot encode")
        return encode_request_json(spans)

    line, left_out = encode_leaving_out_bad(encode, [*good[:2], poisoned, *good[2:]])
    assert left_out == 1
    assert line is not None and _by_id(decode_request_json(json.loads(line))) == _by_id(good)
    assert encode_leaving_out_bad(encode, [poisoned]) == (None, 1)


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf", "jsonl"])
def test_bad_spans_are_left_out_and_counted_and_the_rest_of_the_batch_arrives(
        rx: OtlpReceiver, protocol: str, tmp_path: Path) -> None:
    good = batch_records(6)
    bad = _bad_spans()
    path = tmp_path / "spans.jsonl"
    if protocol == "jsonl":
        sink: JsonLinesFileSink | OtlpSink = JsonLinesFileSink(path)
    else:
        sink = OtlpSink(protocol, rx.grpc_endpoint if protocol == "grpc" else rx.http_endpoint, timeout=5.0)
    pipeline = SpanPipeline([sink], flush_interval=0.05)
    try:
        assert pipeline.submit([*good[:3], *bad, *good[3:]]) == len(good) + len(bad)  # one batch
        assert pipeline.flush(10.0)
        if protocol != "jsonl":
            received = rx.wait_for(lambda s: len(s) >= len(good), timeout=10.0)
    finally:
        pipeline.shutdown(5.0)
    if protocol == "jsonl":
        lines = path.read_text().splitlines()
        assert len(lines) == 1
        received = decode_request_json(json.loads(lines[0]))  # the line is valid OTLP/JSON
    assert _by_id(received) == _by_id(good)
    stats = pipeline.stats()
    assert stats["exported"] == {sink.name: len(good)}
    assert stats["drops"] == {f"invalid_span:{sink.name}": len(bad)}


@pytest.mark.parametrize("value", ["0", "-5", "nan", "2000000"])
def test_the_cli_refuses_a_buffer_bound_out_of_range(value: str) -> None:
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    root = Path(__file__).resolve().parents[3]
    cmd = [sys.executable, "-m", "otel_envoy.cli", "run", "--pid", "1", "--export-buffer-mb", value]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "--export-buffer-mb" in proc.stderr


def test_span_ids_valid_is_the_otlp_rule() -> None:
    """Against the rule written as regular expressions, on ids wrong in every way one character can be."""
    import random
    import re

    trace_re, span_re = re.compile(r"[0-9a-f]{32}"), re.compile(r"[0-9a-f]{16}")

    def rule(r: SpanRecord) -> bool:
        return bool(trace_re.fullmatch(r.trace_id) and r.trace_id != "0" * 32
                    and span_re.fullmatch(r.span_id) and r.span_id != "0" * 16
                    and (not r.parent_span_id or (span_re.fullmatch(r.parent_span_id)
                                                  and r.parent_span_id != "0" * 16))
                    and all(trace_re.fullmatch(t) and span_re.fullmatch(s) for t, s, _ in r.links))

    rng = random.Random(7)
    base = batch_records(1)[0]

    def mangle(value: str) -> str:
        i = rng.randrange(len(value) + 1)
        how = rng.choice(["upper", "char", "cut", "add", "zero", "keep"])
        if how == "upper":
            return value.upper()
        if how == "char":
            return value[:i] + rng.choice("gG- \n\u00e9Z") + value[i + 1:]
        if how == "cut":
            return value[:i] + value[i + 1:]
        if how == "add":
            return value[:i] + rng.choice("0af") + value[i:]
        if how == "zero":
            return "0" * len(value)
        return value

    checked = {True: 0, False: 0}
    for _ in range(3000):
        links = [(mangle(base.trace_id), mangle(base.span_id), {})] if rng.random() < 0.3 else []
        parent = rng.choice([None, "", mangle("b7ad6b7169203331")])
        span = dataclasses.replace(base, trace_id=mangle(base.trace_id), span_id=mangle(base.span_id),
                                   parent_span_id=parent, links=links)
        assert span_ids_valid(span) == rule(span), span
        checked[rule(span)] += 1
    assert min(checked.values()) > 50  # both answers were exercised
    assert all(not span_ids_valid(s) for s in _bad_spans())


def test_a_batch_keeps_the_spans_whose_ids_are_valid_one_by_one() -> None:
    """spans_with_valid_ids (one decoding of a batch's ids together) keeps exactly the spans span_ids_valid
    keeps, in order: batches all valid, and batches with one or more spans wrong in one character, case or
    length anywhere among them (a wrong length ends the batch check early, a wrong digit fails the joint
    decoding)."""
    import random

    rng = random.Random(11)
    good = batch_records(6)
    assert all(span_ids_valid(r) for r in good)
    assert spans_with_valid_ids(good) == good
    bad = _bad_spans()
    for _ in range(400):
        batch = [*good]
        for _k in range(rng.randrange(1, 3)):
            batch.insert(rng.randrange(len(batch) + 1), rng.choice(bad))
        rng.shuffle(batch)
        assert spans_with_valid_ids(batch) == [r for r in batch if span_ids_valid(r)]
    upper = dataclasses.replace(good[0], trace_id=good[0].trace_id.upper())  # right length, wrong case
    assert upper.trace_id != good[0].trace_id
    assert spans_with_valid_ids([*good, upper]) == good
    linked = dataclasses.replace(good[1], links=[(good[0].trace_id, "g" * 16, {})])  # a bad link digit
    assert spans_with_valid_ids([linked, *good]) == good

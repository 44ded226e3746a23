"""ConnectionSpanBuilder.build_records on the connections of the real recording tests/data/lab.events.

The records are what the daemon exports.  Made into SDK spans (the test oracle,
:func:`tests.support.sdk_oracle.readable_connection_spans`), they must encode, through the SDK's own encoder,
to the request our encoders write: the same protobuf bytes, the same OTLP/JSON content.  (The span contents
themselves are checked in spans/test_connection.py and test_replay_golden.py.)
"""

from __future__ import annotations

import copy
import json
import random
import re
from pathlib import Path

import pytest
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource

from otel_envoy.correlate.records import ConnectionRecord
from otel_envoy.event_pipeline import EventPipeline
from otel_envoy.events.recording import RecordingReader
from otel_envoy.export.otlp_json import encode_request_json
from otel_envoy.export.otlp_json_decode import decode_request_json
from otel_envoy.export.otlp_proto import encode_request_proto
from otel_envoy.export.span_queue import SpanPipeline
from otel_envoy.spans.clock import MonotonicClock
from otel_envoy.spans.connection import SCOPE, ConnectionSpanBuilder
from otel_envoy.spans.model import SPAN_FLAGS_LOCAL, SpanRecord
from tests.support.sdk_oracle import (
    assert_same_request,
    parse_otlp_json,
    readable_connection_spans,
    records_from_proto,
)

RESOURCE = Resource.create({"service.name": "records-test"})
RECORDING = Path(__file__).resolve().parents[2] / "data" / "lab.events"


class _Collector(EventPipeline):
    """Keeps the correlator's ConnectionRecords instead of building spans."""

    def __init__(self, clock: MonotonicClock) -> None:
        super().__init__(SpanPipeline([]), RESOURCE, clock)
        self.connections: list[ConnectionRecord] = []

    def _on_connection(self, conn: ConnectionRecord) -> None:
        self.connections.append(conn)


def collect_connections() -> tuple[list[ConnectionRecord], MonotonicClock]:
    """Replay the recording (as `otel-envoy replay` does) and return its connections and clock."""
    items = list(RecordingReader(RECORDING))
    clock = MonotonicClock(int(items[0][1]["offset_ns"]))  # type: ignore[index]
    pipeline = _Collector(clock)
    pipeline.replay(items[1:])
    pipeline.spans_out.shutdown(1.0)
    return pipeline.connections, clock


def is_tls(conn: ConnectionRecord) -> bool:
    return conn.tls.handshake is not None and conn.tls.handshake.client_hello is not None


@pytest.fixture(scope="module")
def recorded() -> tuple[list[ConnectionRecord], MonotonicClock]:
    conns, clock = collect_connections()
    assert len(conns) == 24 and 0 < sum(map(is_tls, conns)) < 24
    return conns, clock


def test_records_and_sdk_spans_encode_identically(
    recorded: tuple[list[ConnectionRecord], MonotonicClock],
) -> None:
    conns, clock = recorded
    all_records: list[SpanRecord] = []
    all_spans = []
    for seed, conn in enumerate(conns):
        records = ConnectionSpanBuilder(RESOURCE, clock, rng=random.Random(seed)).build_records(conn)
        oracle_builder = ConnectionSpanBuilder(RESOURCE, clock, rng=random.Random(seed))
        spans = readable_connection_spans(oracle_builder, conn)
        assert [r.name for r in records] == [s.name for s in spans]
        assert_same_request(parse_otlp_json(json.loads(encode_request_json(records))), encode_spans(spans))
        assert encode_request_proto(records) == encode_spans(spans).SerializeToString()
        all_records += records
        all_spans += spans
    # one batch, one resource group
    all_json = json.loads(encode_request_json(all_records))
    assert_same_request(parse_otlp_json(all_json), encode_spans(all_spans))
    assert encode_request_proto(all_records) == encode_spans(all_spans).SerializeToString()
    assert len(json.loads(encode_request_json(all_records))["resourceSpans"]) == 1


def _arrays_as_lists(records: list[SpanRecord]) -> list[SpanRecord]:
    """Copies whose tuples are lists: an array attribute may be a tuple (the shared, immutable cipher-suite
    names of a client), and so may a span's empty events or links (one shared empty tuple); they decode as
    lists, the wire form being the same."""
    out = []
    for r in records:
        c = copy.copy(r)
        c.attributes = {k: list(v) if type(v) is tuple else v for k, v in r.attributes.items()}
        c.events, c.links = list(r.events), list(r.links)
        out.append(c)
    return out


def test_records_round_trip(recorded: tuple[list[ConnectionRecord], MonotonicClock]) -> None:
    conns, clock = recorded
    builder = ConnectionSpanBuilder(RESOURCE, clock)
    records = [r for conn in conns for r in builder.build_records(conn)]
    # the shared-tuple path is covered
    assert any(type(v) is tuple for r in records for v in r.attributes.values())
    expected = _arrays_as_lists(records)
    for _ in range(2):  # the second time, shared tuples come from the encoders' identity caches
        assert decode_request_json(json.loads(encode_request_json(records))) == expected
        proto = ExportTraceServiceRequest.FromString(encode_request_proto(records))
        assert records_from_proto(proto) == expected


def test_record_fields(recorded: tuple[list[ConnectionRecord], MonotonicClock]) -> None:
    conns, clock = recorded
    builder = ConnectionSpanBuilder(RESOURCE, clock)
    seen_ids: set[str] = set()
    for conn in conns:
        records = builder.build_records(conn)
        root = records[0]
        assert root.name == "envoy.downstream.connection" and root.parent_span_id is None and root.kind == 2
        assert len(records) == (4 if is_tls(conn) else 3)
        for r in records:
            assert re.fullmatch("[0-9a-f]{32}", r.trace_id) and re.fullmatch("[0-9a-f]{16}", r.span_id)
            assert r.trace_id == root.trace_id
            assert r is root or (r.parent_span_id == root.span_id and r.kind == 1)
            assert r.resource_attributes is records[0].resource_attributes  # shared: encoded once per batch
            assert r.resource_attributes == dict(RESOURCE.attributes)
            assert (r.scope_name, r.scope_version) == (SCOPE.name, SCOPE.version)
            assert r.flags == SPAN_FLAGS_LOCAL and r.trace_state == "" and not r.links
            assert root.start_ns <= r.start_ns <= r.end_ns <= root.end_ns
            assert r.span_id not in seen_ids
            seen_ids.add(r.span_id)


class _ZeroRandom(random.Random):
    def getrandbits(self, k: int) -> int:
        return 0


def test_all_zero_ids_are_never_used(recorded: tuple[list[ConnectionRecord], MonotonicClock]) -> None:
    conns, clock = recorded
    conn = copy.copy(next(c for c in conns if is_tls(c)))
    conn.trace_id = conn.span_id = ""  # ids the builder draws itself (the correlator names them live)
    records = ConnectionSpanBuilder(RESOURCE, clock, rng=_ZeroRandom()).build_records(conn)
    assert {r.trace_id for r in records} == {"0" * 31 + "1"}
    assert {r.span_id for r in records} == {"0" * 15 + "1"}

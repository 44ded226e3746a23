"""OTLP/JSON reader: what the encoder writes decodes back to the records; protobuf's canonical JSON too."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from google.protobuf import json_format
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

from otel_envoy.export.otlp_json import encode_request_json
from otel_envoy.export.otlp_json_decode import decode_request_json
from otel_envoy.spans.model import SpanRecord
from tests.support.sdk_oracle import records_from_proto, records_from_sdk_spans
from tests.support.span_samples import (
    T0,
    TRACE_A,
    TRACE_B,
    sample_records,
    sample_spans,
    special_values_record,
    strict_json_loads,
)


def _normalise(records: list[SpanRecord]) -> list[SpanRecord]:
    return sorted(records, key=lambda r: (r.trace_id, r.span_id))


def test_empty_batch() -> None:
    assert decode_request_json({"resourceSpans": []}) == []


def test_decode_matches_records_from_proto() -> None:
    spans = sample_spans()
    from_json = decode_request_json(json.loads(encode_request_json(records_from_sdk_spans(spans))))
    from_proto = records_from_proto(encode_spans(spans))
    assert _normalise(from_json) == _normalise(from_proto)


def test_decoded_records_are_plain_python() -> None:
    encoded = encode_request_json(records_from_sdk_spans(sample_spans()))
    records = {r.name: r for r in decode_request_json(json.loads(encoded))}
    root = records["envoy.connection"]
    assert root.trace_id == "0af7651916cd43dd8448eb211c80319c"
    assert root.parent_span_id is None
    assert root.kind == 2
    assert root.start_ns == T0 and root.end_ns == T0 + 12_500_000
    assert root.duration_ns == 12_500_000
    assert root.attributes["network.peer.port"] == 51234
    assert root.attributes["arr.str"] == ["a", "b", ""]
    assert root.attributes["arr.bool"] == [True, False]
    assert root.attributes["unicode"] == 'héllo ☃ "quoted" \\ back\nslash\t\u0001'
    assert root.resource_attributes["service.name"] == "envoy"
    assert root.scope_name == "otel-envoy" and root.scope_version == "0.1.0"
    assert root.status_code == 1 and root.status_message == ""
    tls = records["tls.handshake"]
    assert tls.parent_span_id == "1111111111111111"
    assert tls.is_error and tls.status_message == "certificate expired"
    assert tls.events == [
        (T0 + 1_600_000, "tls.client_hello", {"size": 517, "sni": "example.com"}),
        (T0 + 2_500_000, "tls.server_hello", {}),
    ]
    assert tls.links == [
        (f"{TRACE_B:032x}", "3333333333333333", {"link.reason": "follows"}),
        (f"{TRACE_B:032x}", "4444444444444444", {}),
    ]
    assert records["client.call"].parent_span_id == "00000000000000ff"
    assert records["client.call"].flags == 0x300  # parent is remote


def test_decode_accepts_protobuf_json_variants() -> None:
    """Base64 ids and enum names (protobuf's canonical JSON) are accepted too."""
    canonical = json_format.MessageToDict(encode_spans(sample_spans()[:2]))
    records = decode_request_json(canonical)
    assert records[0].trace_id == "0af7651916cd43dd8448eb211c80319c"
    assert records[0].kind == 2
    assert records[1].status_code == 2


@pytest.mark.parametrize(
    "obj",
    [
        [],
        {"foo": 1},
        {"resourceSpans": {}},
        {"resourceSpans": [{"scopeSpans": [{"spans": [{"spanId": "1111111111111111"}]}]}]},
        {"resourceSpans": [{"scopeSpans": [{"spans": [{"traceId": "xyz", "spanId": "1111111111111111"}]}]}]},
        {
            "resourceSpans": [
                {"scopeSpans": [{"spans": [{"traceId": "0" * 32, "spanId": "1" * 16, "kind": "X"}]}]}
            ]
        },
        {
            "resourceSpans": [
                {"scopeSpans": [{"spans": [{"traceId": "0" * 32, "spanId": "1" * 16, "attributes": 3}]}]}
            ]
        },
    ],
)
def test_decode_rejects_malformed(obj: Any) -> None:
    with pytest.raises(ValueError):
        decode_request_json(obj)


def test_records_round_trip_through_json() -> None:
    records = sample_records()
    records[1].links = [
        (f"{TRACE_B:032x}", "3333333333333333", {"why": "x"}),
        (f"{TRACE_B:032x}", "44" * 8, {}),
    ]
    records[2].flags = 0  # a record without flags keeps none
    records[2].status_message = "message without an error code"
    records[3].attributes = {"nested": {"kv": [1, {"x": b"\x01"}]}}
    from_json = decode_request_json(strict_json_loads(encode_request_json(records)))
    assert _normalise(from_json) == _normalise(records)


def test_record_special_values() -> None:
    r = special_values_record()
    (decoded,) = decode_request_json(strict_json_loads(encode_request_json([r])))  # still strict JSON
    assert math.isnan(decoded.attributes["nan"])
    assert decoded.attributes["inf"] == float("-inf")
    assert decoded.attributes["huge"] == str(2**70)  # not representable as int64: a string
    assert decoded.attributes["neg.huge"] == str(-(2**64))
    assert decoded.attributes["none"] is None
    assert decoded.trace_id == f"{TRACE_A:032x}"

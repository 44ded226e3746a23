"""OTLP protobuf writer: byte-identical to the SDK's encoding of the same spans, and read back unchanged."""

from __future__ import annotations

import math

import pytest
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from otel_envoy.export import otlp_proto
from otel_envoy.export.otlp_proto import encode_request_proto
from otel_envoy.spans.model import SpanRecord
from tests.support.sdk_oracle import records_from_proto, to_readable_spans
from tests.support.span_samples import TRACE_B, record, sample_records, special_values_record


def _normalise(records: list[SpanRecord]) -> list[SpanRecord]:
    return sorted(records, key=lambda r: (r.trace_id, r.span_id))


def _decode(payload: bytes) -> list[SpanRecord]:
    return records_from_proto(ExportTraceServiceRequest.FromString(payload))


def test_records_encode_exactly_like_the_same_sdk_spans() -> None:
    records = sample_records()
    spans = to_readable_spans(records)
    assert encode_request_proto(records) == encode_spans(spans).SerializeToString()
    for r, span in zip(records, spans, strict=True):
        assert encode_request_proto([r]) == encode_spans([span]).SerializeToString()


def test_the_oracle_comparison_can_fail() -> None:
    """A different value or a lost event gives other bytes than the SDK's."""
    records = sample_records()
    expected = encode_spans(to_readable_spans(records)).SerializeToString()
    records[0].attributes["int.127"] = 126
    assert encode_request_proto(records) != expected
    records = sample_records()
    records[0].events.pop()
    assert encode_request_proto(records) != expected


def test_records_round_trip_through_protobuf() -> None:
    records = sample_records()
    records[1].links = [
        (f"{TRACE_B:032x}", "3333333333333333", {"why": "x"}),
        (f"{TRACE_B:032x}", "44" * 8, {}),
    ]
    records[2].flags = 0  # a record without flags keeps none
    records[2].status_message = "message without an error code"
    records[3].attributes = {"nested": {"kv": [1, {"x": b"\x01"}]}}
    assert _normalise(_decode(encode_request_proto(records))) == _normalise(records)


def test_record_special_values() -> None:
    r = special_values_record()
    (pb,) = _decode(encode_request_proto([r]))
    assert math.isnan(pb.attributes["nan"])
    assert pb.attributes["inf"] == float("-inf")
    assert pb.attributes["huge"] == str(2**70)  # not representable as int64: a string
    assert pb.attributes["neg.huge"] == str(-(2**64))
    assert pb.attributes["none"] is None


def test_changed_resource_dict_is_encoded_again() -> None:
    resource = {"service.name": "a"}
    r = record("r", 1, resource_attributes=resource)
    assert b"\x0a\x01a" in encode_request_proto([r])
    resource["service.name"] = "b"
    (decoded,) = _decode(encode_request_proto([r]))
    assert decoded.resource_attributes == {"service.name": "b"}


def test_empty_record_batch() -> None:
    assert encode_request_proto([]) == b""


@pytest.mark.parametrize(
    "ids",
    [{"trace_id": "abcd"}, {"span_id": "0" * 15 + "x"}, {"parent_span_id": "00" * 9}],
    ids=["short_trace_id", "not_hex", "long_parent_id"],
)
def test_bad_record_ids_fail_the_protobuf_encoding(ids: dict[str, str]) -> None:
    r = record("bad", 1, 2)
    for field, value in ids.items():
        setattr(r, field, value)
    with pytest.raises(ValueError):  # rather than a malformed request
        encode_request_proto([r])


def test_shared_tuples_are_encoded_once_and_stay_right() -> None:
    """Tuple attribute values are cached by identity; a tuple's bytes are its own."""
    shared = ("TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384")
    other = ("h2", "http/1.1")
    for _ in range(2):
        assert otlp_proto._pb_tuple(shared) == otlp_proto._pb_array(list(shared))
        assert otlp_proto._pb_tuple(other) == otlp_proto._pb_array(list(other))
    for i in range(10):
        t = (f"v{i}",)
        assert otlp_proto._pb_tuple(t) == otlp_proto._pb_array([f"v{i}"])
    span = SpanRecord("0" * 31 + "1", "0" * 15 + "1", None, "s", 1, 1, 2, {"a": shared, "b": list(other)},
                      [], [], 0, "", {}, "scope", "", "", 0, "")
    assert [d.attributes for d in _decode(encode_request_proto([span, span]))] == \
        [{"a": list(shared), "b": list(other)}] * 2

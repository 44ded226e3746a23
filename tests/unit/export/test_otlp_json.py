"""OTLP/JSON encoder: must match the SDK's protobuf encoding of the same spans, modulo OTLP/JSON's hex ids.

The SDK's own encoder is the oracle: the records of SDK spans (read back from the SDK's encoding) and SDK
spans made from records (:func:`tests.support.sdk_oracle.to_readable_spans`) must give the request the SDK
encoder gives for those spans.
"""

from __future__ import annotations

import json

import pytest
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

from otel_envoy.export import otlp_json
from otel_envoy.export.otlp_json import (
    JSON_ENCODER,
    array_json,
    encode_request,
    encode_request_json,
    encode_value,
)
from otel_envoy.export.otlp_json_decode import decode_request_json
from otel_envoy.spans.model import SpanRecord
from tests.support.sdk_oracle import (
    assert_same_request,
    parse_otlp_json,
    records_from_sdk_spans,
    to_readable_spans,
    without_record_gaps,
)
from tests.support.span_samples import (
    T0,
    TRACE_B,
    record,
    sample_records,
    sample_spans,
    special_values_record,
    strict_json_loads,
)


def test_json_string_matches_sdk_protobuf_encoding() -> None:
    spans = sample_spans()
    records = records_from_sdk_spans(spans)
    assert_same_request(parse_otlp_json(strict_json_loads(encode_request_json(records))),
                        without_record_gaps(encode_spans(spans)))


def test_dict_matches_sdk_protobuf_encoding() -> None:
    spans = sample_spans()
    records = records_from_sdk_spans(spans)
    assert_same_request(parse_otlp_json(encode_request(records)), without_record_gaps(encode_spans(spans)))


def test_json_string_and_dict_paths_agree() -> None:
    records = records_from_sdk_spans(sample_spans())
    assert strict_json_loads(encode_request_json(records)) == encode_request(records)


def test_each_span_alone_matches_sdk() -> None:
    for span in sample_spans():
        records = records_from_sdk_spans([span])
        assert_same_request(parse_otlp_json(strict_json_loads(encode_request_json(records))),
                            without_record_gaps(encode_spans([span])))


def test_the_oracle_comparison_can_fail() -> None:
    """A changed value, a lost attribute or a wrong kind in our output is caught by the comparison."""
    spans = sample_spans()
    expected = without_record_gaps(encode_spans(spans))
    for change in (lambda r: r.attributes.update({"network.peer.port": 51235}),
                   lambda r: r.attributes.pop("double"),
                   lambda r: setattr(r, "kind", 3)):
        records = records_from_sdk_spans(spans)
        change(records[0])
        with pytest.raises(AssertionError):
            assert_same_request(parse_otlp_json(encode_request(records)), expected)


def test_otlp_json_conventions() -> None:
    records = records_from_sdk_spans(sample_spans())
    obj = strict_json_loads(encode_request_json(records))
    resource_spans = obj["resourceSpans"]
    assert len(resource_spans) == 2  # RESOURCE (and its equal copy) + OTHER_RESOURCE
    assert resource_spans[1]["schemaUrl"] == "https://opentelemetry.io/schemas/1.21.0"
    scopes = [ss["scope"] for ss in resource_spans[0]["scopeSpans"]]
    assert scopes == [
        {"name": "otel-envoy", "version": "0.1.0"},
        {"name": "otel-envoy.extra", "version": "9.9"},
        {},
    ]
    first = resource_spans[0]["scopeSpans"][0]["spans"]
    root, tls = first[0], first[1]
    assert root["traceId"] == "0af7651916cd43dd8448eb211c80319c"
    assert root["spanId"] == "1111111111111111"
    assert "parentSpanId" not in root
    assert tls["parentSpanId"] == "1111111111111111"
    assert root["kind"] == 2 and tls["kind"] == 1
    assert root["startTimeUnixNano"] == str(T0)
    assert isinstance(root["endTimeUnixNano"], str)
    assert root["traceState"] == "vendor=value,other=x"
    attrs = {kv["key"]: kv["value"] for kv in root["attributes"]}
    assert attrs["network.peer.port"] == {"intValue": "51234"}
    assert attrs["int.min"] == {"intValue": str(-(2**63))}
    assert attrs["bool.true"] == {"boolValue": True}
    assert attrs["double"] == {"doubleValue": 3.25}
    assert attrs["arr.int"] == {
        "arrayValue": {"values": [{"intValue": "1"}, {"intValue": "-2"}, {"intValue": "3"}]}
    }
    assert root["status"] == {"code": 1}
    assert tls["status"] == {"code": 2, "message": "certificate expired"}
    assert tls["events"][0] == {
        "timeUnixNano": str(T0 + 1_600_000),
        "name": "tls.client_hello",
        "attributes": [
            {"key": "size", "value": {"intValue": "517"}},
            {"key": "sni", "value": {"stringValue": "example.com"}},
        ],
    }
    assert tls["links"][0]["traceId"] == f"{TRACE_B:032x}"
    assert tls["links"][0]["spanId"] == "3333333333333333"
    kinds = {s["name"]: s["kind"] for rs in resource_spans for ss in rs["scopeSpans"] for s in ss["spans"]}
    assert kinds["client.call"] == 3 and kinds["produce"] == 4 and kinds["consume"] == 5
    # Output is one line (JSON-lines friendly) and pure ASCII.
    text = encode_request_json(records)
    assert "\n" not in text and text.isascii()


def test_special_values() -> None:
    assert encode_value(float("nan")) == {"doubleValue": "NaN"}
    assert encode_value(float("inf")) == {"doubleValue": "Infinity"}
    assert encode_value(float("-inf")) == {"doubleValue": "-Infinity"}
    assert encode_value(2**64) == {"stringValue": str(2**64)}  # not representable as int64
    assert encode_value(b"\x00\xff") == {"bytesValue": "AP8="}
    assert encode_value({"a": 1}) == {"kvlistValue": {"values": [{"key": "a", "value": {"intValue": "1"}}]}}
    assert encode_value(None) == {}
    assert encode_value([]) == {"arrayValue": {"values": []}}


def test_empty_batch() -> None:
    assert encode_request([]) == {"resourceSpans": []}
    assert json.loads(encode_request_json([])) == {"resourceSpans": []}
    assert encode_request_json([]) == '{"resourceSpans":[]}'


# --------------------------------------------------------------------------------------------- records


def test_records_encode_exactly_like_the_same_sdk_spans() -> None:
    records = sample_records()
    spans = to_readable_spans(records)
    expected = encode_spans(spans)
    assert_same_request(parse_otlp_json(strict_json_loads(encode_request_json(records))), expected)
    assert_same_request(parse_otlp_json(encode_request(records)), expected)
    assert strict_json_loads(encode_request_json(records)) == encode_request(records)
    for r, span in zip(records, spans, strict=True):
        ours = parse_otlp_json(strict_json_loads(encode_request_json([r])))
        assert_same_request(ours, encode_spans([span]))


def test_record_grouping() -> None:
    obj = strict_json_loads(encode_request_json(sample_records()))
    groups = [
        (rs.get("schemaUrl"), [(ss["scope"], [s["name"] for s in ss["spans"]]) for ss in rs["scopeSpans"]])
        for rs in obj["resourceSpans"]
    ]
    assert groups == [
        (
            None,
            [
                (
                    {"name": "otel-envoy", "version": "0.1.0"},
                    ["envoy.downstream.connection", "tcp.accept_queue", "tls.handshake", "remote.child",
                     "no.times", "equal.resource"],
                ),
                ({"name": "otel-envoy.extra"}, ["other.scope"]),
            ],
        ),
        ("https://opentelemetry.io/schemas/1.21.0", [({"name": "otel-envoy", "version": "0.1.0"},
                                                      ["other.resource"])]),
        (None, [({}, ["no.scope"])]),
    ]  # fmt: skip
    assert "attributes" not in obj["resourceSpans"][2]["resource"]


def test_record_special_values() -> None:
    r = special_values_record()
    obj = strict_json_loads(encode_request_json([r]))  # still strict JSON
    (span,) = obj["resourceSpans"][0]["scopeSpans"][0]["spans"]
    assert {kv["key"]: kv["value"] for kv in span["attributes"]} == {
        "nan": {"doubleValue": "NaN"}, "inf": {"doubleValue": "-Infinity"},
        "huge": {"stringValue": str(2**70)}, "neg.huge": {"stringValue": str(-(2**64))}, "none": {}}


def test_changed_resource_dict_is_encoded_again() -> None:
    resource = {"service.name": "a"}
    r = record("r", 1, resource_attributes=resource)
    assert '"stringValue":"a"' in encode_request_json([r])
    resource["service.name"] = "b"
    (decoded,) = decode_request_json(json.loads(encode_request_json([r])))
    assert decoded.resource_attributes == {"service.name": "b"}


def test_shared_tuples_are_encoded_once_and_stay_right() -> None:
    """Tuple attribute values are cached by identity; a tuple's text is its own, and a tuple keeps its
    entry alive so its id cannot be reused for other contents."""
    shared = ("TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384")
    other = ("h2", "http/1.1")
    for _ in range(2):
        assert otlp_json._tuple_json(shared) == array_json(list(shared))
        assert otlp_json._tuple_json(other) == array_json(list(other))
    for i in range(10):
        t = (f"v{i}",)
        assert otlp_json._tuple_json(t) == '{"arrayValue":{"values":[{"stringValue":"v' + str(i) + '"}]}}'
    span = SpanRecord("0" * 31 + "1", "0" * 15 + "1", None, "s", 1, 1, 2, {"a": shared, "b": list(other)},
                      [], [], 0, "", {}, "scope", "", "", 0, "")
    decoded = decode_request_json(json.loads(encode_request_json([span, span])))
    assert [d.attributes for d in decoded] == [{"a": list(shared), "b": list(other)}] * 2


@pytest.mark.parametrize("values", [
    ["h2", "http/1.1"], ["quote\"d", "é", "\n"], ["a", 1, True], ["a", b"x"], [], ("t",), [1, "a"],
    [type("S", (str,), {})("sub"), "x"], ["x", type("S", (str,), {})("sub")],
])
def test_string_array_shortcut_gives_the_generic_text(values: list) -> None:
    assert array_json(values) == JSON_ENCODER.encode(encode_value(values))

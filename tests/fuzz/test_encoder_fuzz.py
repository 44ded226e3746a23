"""Property tests: whatever a span carries (ids of any shape, names and attribute values of any text,
integers of any size, NaN and infinities, nested lists, bytes, None), the OTLP encoders used through
``encode_leaving_out_bad`` never raise, every span with OTLP-valid ids that can be encoded is kept, and
what comes out decodes: the protobuf request with the OTLP protobuf classes, the JSON line with
``json.loads`` and the project's OTLP/JSON decoder. One bad span never costs the others."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from otel_envoy.export.otlp_json import encode_request_json
from otel_envoy.export.otlp_json_decode import decode_request_json
from otel_envoy.export.otlp_proto import encode_request_proto
from otel_envoy.export.sinks import encode_leaving_out_bad, span_ids_valid
from otel_envoy.spans.model import SpanRecord
from tests.fuzz.fuzz_settings import FUZZ

HEX = "0123456789abcdef"
TEXT = st.text(max_size=12)  # any code point, surrogates included
ID32 = st.one_of(st.text(alphabet=HEX, min_size=32, max_size=32), TEXT, st.just("0" * 32),
                 st.text(alphabet=HEX + "ABCDEF-", min_size=30, max_size=34))
ID16 = st.one_of(st.text(alphabet=HEX, min_size=16, max_size=16), TEXT, st.just("0" * 16),
                 st.text(alphabet=HEX + "ABCDEF", min_size=15, max_size=17))
SCALAR = st.one_of(TEXT, st.integers(), st.floats(allow_nan=True, allow_infinity=True), st.booleans(),
                   st.binary(max_size=8), st.none())
VALUE = st.one_of(SCALAR, st.lists(SCALAR, max_size=4), st.lists(st.lists(SCALAR, max_size=2), max_size=2),
                  st.dictionaries(TEXT, SCALAR, max_size=2))
ATTRS = st.dictionaries(TEXT, VALUE, max_size=4)
TIME = st.integers(min_value=-(1 << 65), max_value=1 << 65)


@st.composite
def spans(draw: st.DrawFn) -> SpanRecord:
    return SpanRecord(
        trace_id=draw(ID32), span_id=draw(ID16), parent_span_id=draw(st.one_of(st.none(), ID16)),
        name=draw(TEXT), kind=draw(st.integers(-2, 8)), start_ns=draw(TIME), end_ns=draw(TIME),
        attributes=draw(ATTRS),
        events=draw(st.lists(st.tuples(TIME, TEXT, ATTRS), max_size=2)),
        links=draw(st.lists(st.tuples(ID32, ID16, ATTRS), max_size=2)),
        status_code=draw(st.integers(-1, 4)), status_message=draw(TEXT),
        resource_attributes=draw(ATTRS), scope_name=draw(TEXT), trace_state=draw(TEXT),
        flags=draw(st.integers(-1, 1 << 33)))


def _proto_span_ids(body: bytes) -> list[str]:
    request = ExportTraceServiceRequest.FromString(body)
    return [s.span_id.hex() for rs in request.resource_spans for ss in rs.scope_spans for s in ss.spans]


def _json_span_ids(line: str) -> list[str]:
    assert "\n" not in line  # one batch, one line
    return [r.span_id for r in decode_request_json(json.loads(line))]


ENCODERS = {"protobuf": (encode_request_proto, _proto_span_ids),
            "json": (encode_request_json, _json_span_ids)}


@pytest.mark.parametrize("encoding", sorted(ENCODERS))
@FUZZ
@given(batch=st.lists(spans(), min_size=1, max_size=4))
def test_an_encoder_keeps_every_encodable_span_and_never_raises(encoding: str,
                                                                 batch: list[SpanRecord]) -> None:
    encode, span_ids_of = ENCODERS[encoding]
    encoded, left_out = encode_leaving_out_bad(encode, batch)
    assert left_out >= len(batch) - sum(span_ids_valid(r) for r in batch)
    decoded = [] if encoded is None else span_ids_of(encoded)
    assert len(decoded) == len(batch) - left_out
    kept = set(decoded)
    assert kept <= {r.span_id for r in batch if span_ids_valid(r)}
    _left_out_only_if_unencodable(encode, batch, kept)


def _left_out_only_if_unencodable(encode, batch: list[SpanRecord], kept: set[str]) -> None:
    """A valid span that was left out cannot be encoded even alone (its neighbours cost it nothing)."""
    for r in batch:
        if span_ids_valid(r) and r.span_id not in kept:
            try:
                encode([r])
            except Exception:
                continue
            raise AssertionError(f"span {r.span_id} encodes alone but was left out of its batch")

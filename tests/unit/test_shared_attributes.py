"""SharedAttributes: read-only, copied and pickled as a dict of its own, and encoded exactly as a dict."""

from __future__ import annotations

import copy
import pickle

import pytest

from otel_envoy.export.otlp_json import encode_request_json
from otel_envoy.export.otlp_proto import encode_request_proto
from otel_envoy.shared_attributes import SharedAttributes
from otel_envoy.spans.model import SpanRecord

ATTRS = {"tls.protocol.version": "1.3", "tls.client.supported_alpn": ["h2"], "tls.resumed": False,
         "tls.client.supported_ciphers": ("TLS_AES_128_GCM_SHA256",), "envoy.tls.records": 4}


def test_it_cannot_be_changed() -> None:
    shared = SharedAttributes(ATTRS)
    for change in (lambda a: a.__setitem__("k", 1), lambda a: a.update(k=1), lambda a: a.pop("tls.resumed"),
                   lambda a: a.popitem(), lambda a: a.clear(), lambda a: a.setdefault("k", 1),
                   lambda a: a.__delitem__("tls.resumed")):
        with pytest.raises(TypeError):
            change(shared)
    assert shared == ATTRS
    assert {**shared, "k": 1} == {**ATTRS, "k": 1}  # a span's own copy can be changed


def test_copies_and_pickles_are_equal() -> None:
    shared = SharedAttributes(ATTRS)
    for other in (copy.copy(shared), copy.deepcopy(shared), pickle.loads(pickle.dumps(shared))):
        assert type(other) is SharedAttributes and other == shared


@pytest.mark.parametrize("encode", [encode_request_json, encode_request_proto])
def test_encoded_as_the_equal_dict_every_time(encode) -> None:
    def span(attrs: dict) -> SpanRecord:
        return SpanRecord("ab" * 16, "cd" * 8, None, "tls.handshake", attributes=attrs)

    shared = SharedAttributes(ATTRS)
    plain = encode([span(dict(ATTRS))])
    assert encode([span(shared)]) == plain  # the first time: encoded
    assert encode([span(shared), span(shared)]) == encode([span(dict(ATTRS)), span(dict(ATTRS))])  # reused
    other = SharedAttributes({**ATTRS, "tls.resumed": True})  # another object: its own encoding
    assert encode([span(other)]) != plain

"""Shortcuts on the per-event path keep the results of the general code they bypass."""

from __future__ import annotations

import ssl
import threading
import time
from collections.abc import Sequence

import pytest

from otel_envoy.export.otlp_json import _JSON, _array_json, encode_value
from otel_envoy.export.pipeline import ExportSpan, SpanPipeline, SpanSink
from otel_envoy.export.records import SpanRecord
from otel_envoy.protocols.tls.record_layer import (
    HandshakeReassembler,
    TlsRecordReader,
    first_handshake_message,
)

# ------------------------------------------------------------------------------ peek shortcut


def _client_hello_record() -> bytes:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname="a.example.com")
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


def _general_first_message(data: bytes) -> tuple[int, bytes] | None:
    """What TlsHandshakeTracker._client_peek finds without the shortcut: the first handshake message."""
    hs = HandshakeReassembler()
    for rec in TlsRecordReader(collect_types={22}).feed(data, len(data)):
        if rec.content_type != 22:
            return None
        for msg in hs.feed(rec.fragment, rec.length - len(rec.fragment)):
            return msg
        return None
    return None


def _variants(hello: bytes) -> list[bytes]:
    out = [hello, hello + b"\x17\x03\x03\x00\x05hello", hello[:-1], hello[:9], hello[:5], b""]
    for i in range(9):  # a byte of the record or message header changed
        for value in (0, 1, 3, 4, 5, 0x16, 0xFF):
            out.append(hello[:i] + bytes([value]) + hello[i + 1 :])
    return out


def test_peek_shortcut_finds_what_the_record_reader_finds() -> None:
    hello = _client_hello_record()
    assert first_handshake_message(hello) == _general_first_message(hello) is not None
    for data in _variants(hello):
        fast = first_handshake_message(data)
        if fast is not None:  # None: the general path decides
            assert fast == _general_first_message(data), data[:9].hex()


# ------------------------------------------------------------------------------ JSON arrays


@pytest.mark.parametrize("values", [
    ["h2", "http/1.1"], ["quote\"d", "é", "\n"], ["a", 1, True], ["a", b"x"], [], ("t",), [1, "a"],
    [type("S", (str,), {})("sub"), "x"], ["x", type("S", (str,), {})("sub")],
])
def test_string_array_shortcut_gives_the_generic_text(values: list) -> None:
    assert _array_json(values) == _JSON.encode(encode_value(values))


# ------------------------------------------------------------------------------ replay export


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

"""The recording file format: what RecordingWriter writes RecordingReader reads back, damage is an error."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from otel_envoy.events.recording import MAGIC, RecordingError, RecordingReader, RecordingWriter
from tests.support.events import accept, close, encode, established, read
from tests.support.replay import RECORD_HEAD, RECORDING


def test_recording_writer_reader_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "rt.events"
    kernel = [encode(established(1_000, 40000)), encode(accept(2_000, 30, 40000)),
              encode(read(3_000, 30, b"GET / HTTP/1.1\r\n\r\n")), encode(close(4_000, 30, rx=18)),
              b"", bytes(range(256)) * 16]
    contexts: list[dict[str, Any]] = [
        {"type": "clock", "offset_ns": 1_795_304_973_826_974_574},
        {"type": "listen_sockets", "sockets": [[10566, 17, "127.0.0.1", 58239], [10566, 18, "::", 443]]},
        {"type": "listener_names", "names": [["0.0.0.0", 8080, "plain_http"], ["::", 443, "tls ✓"]]},
    ]
    w = RecordingWriter(path)
    expected: list[tuple[str, object]] = []
    for i in range(max(len(kernel), len(contexts))):
        if i < len(contexts):
            w.context(contexts[i])
            expected.append(("context", contexts[i]))
        if i < len(kernel):
            w.kernel(kernel[i])
            expected.append(("kernel", kernel[i]))
    w.close()
    assert w.records == len(kernel)  # counts kernel records
    assert path.read_bytes().startswith(MAGIC)
    assert list(RecordingReader(path)) == expected
    assert list(RecordingReader(path)) == expected  # a reader can be iterated again


def test_reader_rejects_damaged_headers(tmp_path: Path) -> None:
    path = tmp_path / "damaged.events"
    with open(path, "wb") as f:
        f.write(MAGIC + RECORD_HEAD.pack(7, 3) + b"abc")
    with pytest.raises(RecordingError, match="record 0 is damaged"):
        list(RecordingReader(path))
    with open(path, "wb") as f:
        f.write(MAGIC + RECORD_HEAD.pack(1, 1 << 30))
    with pytest.raises(RecordingError, match="damaged"):
        list(RecordingReader(path))


def test_rewriting_the_recording_is_byte_identical(tmp_path: Path) -> None:
    # a copy written record by record with RecordingWriter is byte-identical to the original
    items = list(RecordingReader(RECORDING))
    copy = tmp_path / "copy.events"
    w = RecordingWriter(copy)
    for kind, payload in items:
        if kind == "kernel":
            w.kernel(payload)  # type: ignore[arg-type]
        else:
            w.context(payload)  # type: ignore[arg-type]
    w.close()
    assert copy.read_bytes() == RECORDING.read_bytes()
    assert sum(1 for k, _ in items if k == "kernel") == w.records > 150  # 24 connections' records

"""The event-stream file of `otel-envoy record` / `replay`: raw kernel records plus user-space context.

Layout: the magic line, then records of (1-byte type, 4-byte little-endian length, payload).
Type 1 is a kernel record exactly as the ring buffer delivered it (decoded with the same events.h layout);
type 2 is a JSON object of context the correlator needs (clock offset, listening sockets, listener
names; their schema is :mod:`.recording_context`), written at the moment it became known, so a replay sees
the same world the live run saw.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

__all__ = ["MAGIC", "RecordingError", "RecordingReader", "RecordingWriter"]

MAGIC = b"OTEL-ENVOY-EVENTS 1\n"
KERNEL, CONTEXT = 1, 2
_HEAD = struct.Struct("<BI")
_MAX_RECORD = 1 << 20


class RecordingError(ValueError):
    """The file is not an otel-envoy event recording, or is damaged (message is one line)."""


class RecordingWriter:
    """Appends records to a recording file (buffered; call ``close``)."""

    def __init__(self, path: str | Path) -> None:
        self._f: BinaryIO = open(path, "wb")  # noqa: SIM115 - closed in close()
        self._f.write(MAGIC)
        self.records = 0

    def kernel(self, raw: bytes) -> None:
        """Write one raw kernel record."""
        self._f.write(_HEAD.pack(KERNEL, len(raw)))
        self._f.write(raw)
        self.records += 1

    def context(self, obj: dict) -> None:
        """Write one context object."""
        payload = json.dumps(obj, separators=(",", ":")).encode()
        self._f.write(_HEAD.pack(CONTEXT, len(payload)))
        self._f.write(payload)

    def close(self) -> None:
        """Flush and close."""
        self._f.close()


class RecordingReader:
    """Iterates ("kernel", bytes) and ("context", dict) items of a recording."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __iter__(self) -> Iterator[tuple[str, object]]:
        try:
            f = open(self.path, "rb")  # noqa: SIM115
        except OSError as exc:
            raise RecordingError(f"{self.path}: {exc.strerror}") from exc
        with f:
            if f.read(len(MAGIC)) != MAGIC:
                raise RecordingError(f"{self.path}: not an otel-envoy event recording (bad magic)")
            index = 0
            while True:
                head = f.read(_HEAD.size)
                if not head:
                    return
                if len(head) < _HEAD.size:
                    raise RecordingError(f"{self.path}: truncated after record {index}")
                kind, length = _HEAD.unpack(head)
                if length > _MAX_RECORD or kind not in (KERNEL, CONTEXT):
                    raise RecordingError(f"{self.path}: record {index} is damaged (type {kind}, {length} B)")
                payload = f.read(length)
                if len(payload) < length:
                    raise RecordingError(f"{self.path}: truncated in record {index}")
                index += 1
                if kind == KERNEL:
                    yield "kernel", payload
                else:
                    try:
                        yield "context", json.loads(payload)
                    except ValueError as exc:
                        raise RecordingError(f"{self.path}: record {index} is not JSON") from exc

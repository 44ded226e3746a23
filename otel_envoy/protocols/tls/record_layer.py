"""The TLS record layer of one direction of a captured byte stream, and handshake-message reassembly.

:class:`TlsRecordReader` reassembles the records of one direction from captured messages that may be cut
short (capture truncation) and split anywhere.  A capture gap inside a record body keeps the reader in
sync (the record length is known); a gap covering a record header desynchronises it.
:class:`HandshakeReassembler` turns handshake-record fragments into handshake messages.  Memory is
bounded: one record (<= :data:`MAX_RECORD_LEN` bytes) and one handshake message (<=
:data:`MAX_HANDSHAKE_MESSAGE` bytes) at most.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = [
    "CT_ALERT",
    "CT_APPLICATION_DATA",
    "CT_CHANGE_CIPHER_SPEC",
    "CT_HANDSHAKE",
    "CT_HEARTBEAT",
    "MAX_HANDSHAKE_MESSAGE",
    "MAX_RECORD_LEN",
    "HandshakeReassembler",
    "TlsRecord",
    "TlsRecordReader",
    "first_handshake_message",
    "whole_record_types",
]

MAX_RECORD_LEN = 2**14 + 2048  # largest legal TLSCiphertext.length (RFC 5246 6.2.3): 18432
MAX_HANDSHAKE_MESSAGE = 65536  # handshake-reassembly buffer bound (header + body)

# Record content types (RFC 8446 5.1; heartbeat: RFC 6520).
CT_CHANGE_CIPHER_SPEC = 20
CT_ALERT = 21
CT_HANDSHAKE = 22
CT_APPLICATION_DATA = 23
CT_HEARTBEAT = 24

_RECORD_HEADER = struct.Struct(">BBBH")  # content type, version major, minor, length


@dataclass(slots=True)
class TlsRecord:
    """One record whose header was seen and whose body was fully accounted for (captured or missing).

    ``fragment`` holds the captured body prefix: shorter than ``length`` when capture gaps hit the body
    (``complete`` is then False), or empty when the reader was told not to collect this content type.
    """

    content_type: int
    version: int
    length: int
    fragment: bytes
    complete: bool


def _plausible_header(data: bytes | bytearray | memoryview) -> bool:
    """Strict check that ``data`` starts with a record header (used to resynchronise after a gap)."""
    return (len(data) >= 5 and CT_CHANGE_CIPHER_SPEC <= data[0] <= CT_APPLICATION_DATA and data[1] == 3
            and data[2] <= 4 and ((data[3] << 8) | data[4]) <= MAX_RECORD_LEN)


def first_handshake_message(data: bytes | bytearray | memoryview) -> tuple[int, bytes] | None:
    """``(msg_type, body)`` of the first handshake message when ``data`` starts with a valid handshake
    record that was captured whole and holds that whole message; else None (then a TlsRecordReader and a
    HandshakeReassembler give the answer). The same result as theirs, without building them: a
    listener filter's peek of a ClientHello is one such record."""
    n = len(data)
    if n < 9 or data[0] != CT_HANDSHAKE or data[1] != 3 or data[2] > 4:
        return None
    length = (data[3] << 8) | data[4]
    if length > MAX_RECORD_LEN or 5 + length > n:
        return None
    size = (data[6] << 16) | (data[7] << 8) | data[8]
    if 4 + size > length:
        return None
    return data[5], bytes(data[9 : 9 + size])


def whole_record_types(data: bytes | bytearray | memoryview) -> list[int] | None:
    """The content types of the records in ``data`` when it holds nothing but whole, valid records (what a
    TlsRecordReader at a record boundary returns complete from it, staying at a boundary); else None."""
    n = len(data)
    pos = 0
    types: list[int] = []
    unpack_header = _RECORD_HEADER.unpack_from
    while n - pos >= 5:
        ct, major, minor, length = unpack_header(data, pos)
        if not CT_CHANGE_CIPHER_SPEC <= ct <= CT_HEARTBEAT or major != 3 or minor > 4 \
                or length > MAX_RECORD_LEN:
            return None
        pos += 5 + length
        types.append(ct)
    return types if pos == n else None


class TlsRecordReader:
    """Reassembles the TLS records of ONE direction from captured messages.

    ``feed(data, total_len)`` returns the records completed by this message.  ``total_len > len(data)``
    means the message's tail was not captured: inside a record body that is harmless (the record is
    returned with ``complete=False`` and the reader stays in sync); over a record header the reader is
    desynchronised: ``error`` is set and no more records come out, unless ``resync=True`` and a later
    message starts with a plausible record header (writes usually start on a record boundary).
    Invalid content types or lengths set ``error`` ("not a TLS record: ...") for good.

    ``collect_types`` limits which content types keep their fragments (None = all); others are skipped
    without copying.  At most one record is buffered (<= :data:`MAX_RECORD_LEN` bytes).
    """

    __slots__ = (
        "_append", "_frag", "_gapped", "_hdr", "_in_record", "_keep", "_len", "_need", "_resync",
        "_type", "_ver", "bytes", "collect_types", "desynced", "error", "missing_bytes", "records",
        "resyncs",
    )

    def __init__(self, *, collect_types: Iterable[int] | None = None, resync: bool = False) -> None:
        self.collect_types: frozenset[int] | None = (
            None if collect_types is None else frozenset(collect_types))
        self.error: str | None = None
        self.desynced = False  # error is a capture-gap desync (recoverable with resync=True)
        self.records: dict[int, int] = {}  # content type -> records seen
        self.bytes = 0  # stream bytes accounted for, captured or not
        self.missing_bytes = 0  # of which not captured
        self.resyncs = 0
        self._resync = resync
        self._hdr = bytearray()
        self._frag = bytearray()
        self._in_record = False
        self._type = 0
        self._ver = 0
        self._len = 0
        self._need = 0
        self._keep = False  # this record's fragment is returned
        self._append = False  # bytes are still appended to it (False after a gap)
        self._gapped = False

    @property
    def buffered_bytes(self) -> int:
        """Bytes held for a partially received record (header and body)."""
        return len(self._hdr) + len(self._frag)

    @property
    def total_records(self) -> int:
        """Records seen, all content types."""
        return sum(self.records.values())

    def partial_header(self) -> tuple[int, int] | None:
        """(content type, length) of the record whose header was read but whose body is still due."""
        return (self._type, self._len) if self._in_record else None

    def feed(self, data: bytes | bytearray | memoryview, total_len: int | None = None) -> list[TlsRecord]:
        """Consume one captured message; return the records it completed, in stream order."""
        if type(data) is bytes:
            buf: bytes | memoryview = data
        else:
            buf = memoryview(data)
            if buf.format != "B" or buf.ndim != 1:
                buf = buf.cast("B")
        n = len(buf)
        if total_len is None or total_len <= n:
            gap = 0
            self.bytes += n
        else:
            gap = total_len - n
            self.bytes += total_len
        if self.error is not None:
            if not (self.desynced and self._resync and _plausible_header(buf)):
                self.missing_bytes += gap
                return []
            self.error = None
            self.desynced = False
            self.resyncs += 1
        elif not gap:
            # Fast paths for reads the way TLS libraries do them: a 5-byte header, then the body.
            if self._in_record:
                if n == self._need:  # exactly the rest of the pending body
                    if not self._append:
                        frag = bytes(self._frag) if self._keep else b""
                    elif self._frag:
                        self._frag += buf
                        frag = bytes(self._frag)
                    else:
                        frag = bytes(buf)
                    self._frag.clear()
                    self._need = 0
                    self._in_record = False
                    ct = self._type
                    records = self.records
                    records[ct] = records.get(ct, 0) + 1
                    return [TlsRecord(ct, self._ver, self._len, frag, not self._gapped)]
            elif n == 5 and not self._hdr:  # exactly one record header
                ct, major, minor, length = _RECORD_HEADER.unpack(buf)
                if not CT_CHANGE_CIPHER_SPEC <= ct <= CT_HEARTBEAT or major != 3 or minor > 4 \
                        or length > MAX_RECORD_LEN:
                    self._fail(f"not a TLS record: header {ct:02x} {major:02x}{minor:02x} length {length}")
                    return []
                if not length:
                    records = self.records
                    records[ct] = records.get(ct, 0) + 1
                    return [TlsRecord(ct, (major << 8) | minor, 0, b"", True)]
                collect = self.collect_types
                self._in_record = True
                self._type, self._ver, self._len, self._need = ct, (major << 8) | minor, length, length
                self._keep = self._append = collect is None or ct in collect
                self._gapped = False
                return []
        out: list[TlsRecord] = []
        pos = 0
        if self._in_record:  # continue a record body
            take = self._need if self._need <= n else n
            if self._append:
                self._frag += buf[:take]
            pos = take
            self._need -= take
            if self._need == 0:
                out.append(self._finish())
        elif self._hdr:  # a header split across messages: parse it from a joined copy
            buf = bytes(self._hdr) + bytes(buf)
            self._hdr.clear()
            n = len(buf)
        collect = self.collect_types
        records = self.records
        unpack_header = _RECORD_HEADER.unpack_from
        while n - pos >= 5:  # at a record boundary
            ct, major, minor, length = unpack_header(buf, pos)
            if not CT_CHANGE_CIPHER_SPEC <= ct <= CT_HEARTBEAT or major != 3 or minor > 4 \
                    or length > MAX_RECORD_LEN:
                self._fail(f"not a TLS record: header {ct:02x} {major:02x}{minor:02x} length {length}")
                return out
            pos += 5
            end = pos + length
            keep = collect is None or ct in collect
            if end <= n:  # whole body in this message
                out.append(TlsRecord(ct, (major << 8) | minor, length,
                                     bytes(buf[pos:end]) if keep else b"", True))
                records[ct] = records.get(ct, 0) + 1
                pos = end
                continue
            self._in_record = True  # the body goes on in later messages
            self._type, self._ver, self._len, self._need = ct, (major << 8) | minor, length, end - n
            self._keep = self._append = keep
            self._gapped = False
            if keep:
                self._frag += buf[pos:]
            pos = n
        if pos < n:  # the start of a header
            self._hdr += buf[pos:]
        if gap:
            self._apply_gap(gap, out)
        return out

    def _apply_gap(self, gap: int, out: list[TlsRecord]) -> None:
        self.missing_bytes += gap
        if self._in_record:
            self._gapped = True
            self._append = False
            if gap <= self._need:  # the hole is inside this body: still in sync
                self._need -= gap
                if self._need == 0:
                    out.append(self._finish())
                return
            self._need = 0  # the hole runs past this record: hand out what we have, then desync
            out.append(self._finish())
        self._desync(f"desynchronised: capture gap of {gap} bytes covers a record header")

    def _finish(self) -> TlsRecord:
        frag = bytes(self._frag) if self._keep else b""
        self._frag.clear()
        ct = self._type
        self.records[ct] = self.records.get(ct, 0) + 1
        self._in_record = False
        return TlsRecord(ct, self._ver, self._len, frag, not self._gapped)

    def _reset_partial(self) -> None:
        self._hdr.clear()
        self._frag = bytearray()
        self._in_record = False
        self._need = 0

    def _desync(self, msg: str) -> None:
        self._reset_partial()
        self.error = msg
        self.desynced = True

    def _fail(self, msg: str) -> None:
        self._reset_partial()
        self.error = msg
        self.desynced = False


class HandshakeReassembler:
    """Turns the fragments of handshake records (one direction) into ``(msg_type, body)`` messages.

    Messages may span records and records may hold several messages.  ``feed(fragment, missing)`` takes
    a record's captured fragment and the number of its bytes that were not captured: the reassembler
    stays in sync when the hole falls inside a message whose header was seen (that message is dropped
    and counted in ``lost``); otherwise ``error`` is set and nothing more is produced.  Messages larger
    than ``max_message`` bytes are skipped without buffering (counted in ``skipped``) so the buffer
    never exceeds ``max_message`` bytes.
    """

    __slots__ = ("_buf", "_max", "_skip", "error", "lost", "messages", "skipped")

    def __init__(self, max_message: int = MAX_HANDSHAKE_MESSAGE) -> None:
        self._buf = bytearray()
        self._max = max_message
        self._skip = 0  # bytes still to drop (rest of a skipped or lost message)
        self.error: str | None = None
        self.messages = 0
        self.skipped = 0
        self.lost = 0

    @property
    def buffered_bytes(self) -> int:
        """Bytes held for a partially received message."""
        return len(self._buf)

    def feed(self, fragment: bytes | bytearray | memoryview, missing: int = 0) -> list[tuple[int, bytes]]:
        """Consume one handshake-record fragment (+ ``missing`` uncaptured bytes after it)."""
        if self.error is not None:
            return []
        if type(fragment) is bytes:
            data: bytes | memoryview = fragment
        else:
            data = memoryview(fragment)
            if data.format != "B" or data.ndim != 1:
                data = data.cast("B")
        if self._skip:
            k = min(self._skip, len(data))
            data = data[k:]
            self._skip -= k
        out: list[tuple[int, bytes]] = []
        buf = self._buf
        if buf:  # continue a message: parse from the buffer
            if len(data):
                buf += data
            src: bytes | bytearray | memoryview = buf
        else:  # parse straight from the fragment, buffer only an incomplete tail
            src = data
        off, blen = 0, len(src)
        max_message = self._max
        while blen - off >= 4:
            total = 4 + ((src[off + 1] << 16) | (src[off + 2] << 8) | src[off + 3])
            if total > max_message:  # too big to buffer (and never one we parse): skip it
                self.skipped += 1
                if blen - off >= total:
                    off += total
                    continue
                self._skip = total - (blen - off)
                off = blen
                break
            if blen - off < total:
                break
            out.append((src[off], bytes(src[off + 4 : off + total])))
            off += total
        if src is buf:
            if off:
                del buf[:off]
        elif off < blen:
            buf += src[off:]
        if out:
            self.messages += len(out)
        if missing > 0:
            self._apply_gap(missing)
        return out

    def _apply_gap(self, missing: int) -> None:
        buf = self._buf
        if self._skip:
            remaining = self._skip
        elif len(buf) >= 4:
            remaining = 4 + ((buf[1] << 16) | (buf[2] << 8) | buf[3]) - len(buf)
            self.lost += 1
        else:
            remaining = -1  # the hole starts at (or inside) a message header
        buf.clear()
        if missing <= remaining:
            self._skip = remaining - missing
        else:
            self._skip = 0
            self.error = "handshake stream desynchronised by a capture gap"

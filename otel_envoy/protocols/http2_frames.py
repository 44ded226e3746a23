"""HTTP/2 frame reading for one direction of a connection: frames, header blocks and HPACK decoding.

A :class:`FrameReader` takes the bytes one side of an HTTP/2 cleartext connection sent (the client's
starting with the connection preface), in syscall-sized pieces, and hands every complete frame's meaning to
its :class:`FrameHandlers`: a decoded header block, a DATA frame's body size, a RST_STREAM, a GOAWAY.
SETTINGS are applied to the reader of the other direction (``peer``). Pairing requests with responses is
:mod:`.http2`'s job.

Frames may be split across syscalls anywhere. Each direction buffers at most one frame header and one
header block or control frame (:data:`MAX_HEADER_BLOCK`); DATA is counted, never buffered; a frame above
the maximum frame size the receiving peer announced (16 KiB by default) is an error. Every header block
is HPACK-decoded (the dynamic table must follow the encoder, PUSH_PROMISE included) with one decoder per
direction; other header values only pass through the decoder, whose dynamic table (bounded, never
exposed) necessarily holds recently indexed fields.

Capture gaps (a syscall moved more bytes than were captured) inside a DATA payload (or an ignored frame's)
are just counted; anywhere else they end reading of that direction: ``failed`` is set and nothing more is
handed on. Malformed bytes never raise out of a reader.

Condensed records (``frames_only=True``). On a connection that starts with the client preface the kernel
does not send the first bytes of each read and write (a frame header beyond them would be a fatal gap) but
their *framing* (``DATA_FLAG_H2_FRAMES``, bpf/conn.bpf.c ``capture_h2``): the ``total_len`` bytes the
syscall moved, in order, with every DATA frame's payload left out, except the first payload byte (the pad
length) of a PADDED one. So the preface bytes, every 9-byte frame header and the whole payload of every
other frame (HEADERS, CONTINUATION, PUSH_PROMISE, SETTINGS, RST_STREAM, GOAWAY, PING, WINDOW_UPDATE,
PRIORITY, unknown types) are there; a DATA frame's body size still comes from its header. The kernel walks
each direction from its first byte, so a record covers exactly its syscall's bytes and the contract is per
call: any call may be plain or condensed (the first one, which showed the kernel the preface, is condensed
too; a direction whose framing the kernel lost goes back to plain records), and a piece (a frame header
included) may straddle two calls of either kind. A condensed record that ends where the walk still needs
bytes is the kernel's way of saying it lost the framing (more than ``CAPTURE_MAX`` condensed bytes or too
many frames in one syscall): the same error as a capture gap in the framing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import NamedTuple

import hpack

__all__ = [
    "MAX_FRAME_SIZE", "MAX_HEADER_BLOCK", "MAX_TABLE_SIZE", "PREFACE", "FrameHandlers", "FrameReader",
    "HeaderBlock",
]

#: What an HTTP/2 client sends first (RFC 9113 3.4).
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
#: Bytes of one header block (HEADERS/PUSH_PROMISE + CONTINUATION payloads), or of any other frame we
#: buffer (SETTINGS, RST_STREAM, GOAWAY), at most; DATA and ignored frames are counted, never buffered.
MAX_HEADER_BLOCK = 256 * 1024
_MAX_HEADER_LIST = 512 * 1024  # decoded size (RFC 7541 accounting) of one header block, at most
_DEFAULT_FRAME_SIZE = 16384  # SETTINGS_MAX_FRAME_SIZE until the peer announces more
#: The frame length field's limit: the largest frame size a peer can allow.
MAX_FRAME_SIZE = (1 << 24) - 1
_DEFAULT_TABLE_SIZE = 4096  # SETTINGS_HEADER_TABLE_SIZE until the peer announces more
#: HPACK dynamic table we follow at most (an encoder going beyond is an error).
MAX_TABLE_SIZE = 65536

_DATA, _HEADERS, _RST_STREAM, _SETTINGS, _PUSH_PROMISE, _GOAWAY, _CONTINUATION = 0, 1, 3, 4, 5, 7, 9
_BUFFERED = frozenset({_HEADERS, _RST_STREAM, _SETTINGS, _PUSH_PROMISE, _GOAWAY, _CONTINUATION})
_END_STREAM = 0x1  # also SETTINGS' ACK
_END_HEADERS = 0x4
_PADDED = 0x8
_PRIORITY = 0x20
_SETTINGS_HEADER_TABLE_SIZE, _SETTINGS_MAX_FRAME_SIZE = 1, 5
_GAP = "capture gap inside HTTP/2 framing"

# hpack logs every decoded header (values included) at DEBUG: never let secrets reach a log
logging.getLogger("hpack").setLevel(logging.WARNING)


@dataclass(slots=True)
class HeaderBlock:
    """A header block being assembled from HEADERS / PUSH_PROMISE + CONTINUATION frames."""

    stream_id: int
    push: bool
    end_stream: bool
    start: tuple[int, int, int]  # (ts_ns, tid, round) of its first frame's first byte
    fragments: bytearray


class FrameHandlers(NamedTuple):
    """What a :class:`FrameReader` hands on, as it completes frames (one set per connection)."""

    #: A decoded request or response header block (or trailers): (reader, block, fields, ts, round).
    headers: Callable[[FrameReader, HeaderBlock, Iterable[tuple[bytes, bytes]], int, int], None]
    #: A DATA frame: (reader, stream id, body bytes without padding, END_STREAM, ts).
    data: Callable[[FrameReader, int, int, bool, int], None]
    #: A RST_STREAM frame: (stream id, error code, ts).
    reset: Callable[[int, int, int], None]
    #: A GOAWAY frame: (reader, last stream id, error code, ts).
    goaway: Callable[[FrameReader, int, int, int], None]
    #: h2c upgrade: bytes of the HTTP/1.1 request body read before the preface: (bytes, ts).
    upgrade_body: Callable[[int, int], None]


class FrameReader:
    """One direction's frame reader: reassembles frames and hands complete ones to its handlers."""

    __slots__ = (
        "block",
        "client",
        "decoder",
        "failed",
        "flags",
        "frame_at",
        "handlers",
        "head",
        "in_payload",
        "left",
        "length",
        "max_frame",
        "pad",
        "pad_seen",
        "payload",
        "peer",
        "pre_body",
        "preface_left",
        "seen_frame",
        "stream_id",
        "table_allowed",
        "type",
    )

    def __init__(self, handlers: FrameHandlers, *, client: bool) -> None:
        """``client``: this direction sends requests (and the preface)."""
        self.handlers = handlers
        self.peer: FrameReader | None = None  # the other direction: SETTINGS sent here apply to it
        self.client = client  # sends requests (and the preface)
        self.preface_left = len(PREFACE) if client else 0
        self.pre_body = 0  # h2c upgrade: HTTP/1.1 request body bytes still ahead of the preface
        self.decoder = hpack.Decoder(max_header_list_size=_MAX_HEADER_LIST)
        self.table_allowed = _DEFAULT_TABLE_SIZE
        self.decoder.max_allowed_table_size = _DEFAULT_TABLE_SIZE
        self.max_frame = _DEFAULT_FRAME_SIZE  # the largest frame this side may send (its peer's setting)
        self.failed: str | None = None
        self.seen_frame = False
        self.head = bytearray()  # frame header being assembled (9 bytes)
        self.frame_at = (0, 0, 0)  # (ts_ns, tid, round) of the current frame's first byte
        self.type = self.flags = self.stream_id = self.length = 0
        self.in_payload = False
        self.left = 0  # payload bytes of the current frame still to come
        self.payload = bytearray()  # buffered payload (types in _BUFFERED only)
        self.pad = 0  # DATA: pad length
        self.pad_seen = False
        self.block: HeaderBlock | None = None

    def fail(self, reason: str) -> None:
        """Stop reading this direction for ``reason`` (the first reason stays) and drop what is buffered."""
        if self.failed is None:
            self.failed = reason
            self.head.clear()
            self.payload = bytearray()
            self.block = None

    def allow(self, *, table_size: int | None = None, frame_size: int | None = None) -> None:
        """Its peer announced a setting for what this side sends. Passive observers cannot tell when the
        encoder adopts a change, so limits only ever grow (up to our bounds)."""
        if table_size is not None:
            self.table_allowed = max(self.table_allowed, min(table_size, MAX_TABLE_SIZE))
            self.decoder.max_allowed_table_size = self.table_allowed
        if frame_size is not None:
            self.max_frame = max(self.max_frame, min(frame_size, MAX_FRAME_SIZE))

    def feed(self, ts: int, data: bytes | memoryview, tid: int, rnd: int) -> None:
        """Bytes this direction sent, captured whole, from syscall ``tid``/``rnd`` at ``ts``."""
        view = memoryview(data)
        pos, n = 0, len(view)
        while pos < n and self.failed is None:
            if self.pre_body:
                k = min(self.pre_body, n - pos)
                self.pre_body -= k
                pos += k
                self.handlers.upgrade_body(k, ts)
            elif self.preface_left:
                k = min(self.preface_left, n - pos)
                at = len(PREFACE) - self.preface_left
                if view[pos:pos + k] != PREFACE[at:at + k]:
                    self.fail("not an HTTP/2 connection preface")
                    return
                self.preface_left -= k
                pos += k
            elif not self.in_payload:
                if not self.head:
                    self.frame_at = (ts, tid, rnd)
                k = min(9 - len(self.head), n - pos)
                self.head += view[pos:pos + k]
                pos += k
                if len(self.head) == 9:
                    self._begin_frame(ts, tid, rnd)
            else:
                k = min(self.left, n - pos)
                if self.type in _BUFFERED:
                    self.payload += view[pos:pos + k]
                elif self.type == _DATA and self.flags & _PADDED and not self.pad_seen:
                    self.pad, self.pad_seen = view[pos], True
                self.left -= k
                pos += k
                if not self.left:
                    self._end_frame(ts, tid, rnd)

    def feed_frames(self, ts: int, data: bytes | memoryview, total: int, tid: int, rnd: int) -> None:
        """A condensed record: ``data`` holds the ``total`` bytes the syscall moved but the DATA payloads
        (the module docstring); those are counted as they would be from a capture gap."""
        view = memoryview(data)
        pos, n = 0, len(view)
        while total > 0 and self.failed is None:
            if self.pre_body:  # the kernel condenses connections that start with the preface only
                self.fail("condensed HTTP/2 record inside an h2c upgrade")
                return
            elided = self._elided()
            if elided:
                k = min(elided, total)
                self.gap(ts, k, tid, rnd)
            else:
                if pos >= n:  # bytes the walk needs are missing: the kernel lost the framing
                    self.fail(_GAP)
                    return
                k = min(self._present(), n - pos, total)
                self.feed(ts, view[pos:pos + k], tid, rnd)
                pos += k
            total -= k
        if pos < n and self.failed is None:
            self.fail("condensed HTTP/2 record longer than its framing")

    def _elided(self) -> int:
        """Bytes from here on that a condensed record leaves out: the rest of a DATA payload (after the pad
        length of a PADDED frame)."""
        if self.in_payload and self.type == _DATA and (self.pad_seen or not self.flags & _PADDED):
            return self.left
        return 0

    def _present(self) -> int:
        """Bytes from here on that a condensed record holds, up to where it may leave some out."""
        if self.preface_left:
            return self.preface_left
        if not self.in_payload:
            return 9 - len(self.head)
        return 1 if self.type == _DATA else self.left  # a PADDED DATA frame's pad length

    def gap(self, ts: int, n: int, tid: int, rnd: int) -> None:
        """``n`` bytes were moved but not captured: fine inside a payload we only count, fatal elsewhere."""
        while n > 0 and self.failed is None:
            if self.pre_body:
                k = min(self.pre_body, n)
                self.pre_body -= k
                self.handlers.upgrade_body(k, ts)
            elif self.in_payload and self.type not in _BUFFERED:
                k = min(self.left, n)
                self.pad_seen = True  # an uncaptured pad length reads as 0, like the zeros HTTP/1 fills in
                self.left -= k
                if not self.left:
                    self._end_frame(ts, tid, rnd)
            else:
                self.fail(_GAP)
                return
            n -= k

    def _begin_frame(self, ts: int, tid: int, rnd: int) -> None:
        h = self.head
        self.length = int.from_bytes(h[0:3], "big")
        self.type, self.flags = h[3], h[4]
        self.stream_id = int.from_bytes(h[5:9], "big") & 0x7FFFFFFF
        h.clear()
        if self.length > self.max_frame:
            self.fail(f"HTTP/2 frame of {self.length} bytes exceeds the maximum frame size {self.max_frame}")
            return
        if self.type in _BUFFERED and self.length > MAX_HEADER_BLOCK:  # what we buffer stays bounded
            self.fail(f"HTTP/2 frame of type {self.type} and {self.length} bytes is too large to follow")
            return
        if not self.seen_frame and self.type != _SETTINGS:
            self.fail("HTTP/2 connection did not start with SETTINGS")
            return
        self.seen_frame = True
        if self.block is not None and (self.type != _CONTINUATION or self.stream_id != self.block.stream_id):
            self.fail("HTTP/2 header block interrupted (CONTINUATION expected)")
            return
        if self.type == _CONTINUATION and self.block is None:
            self.fail("HTTP/2 CONTINUATION without a header block")
            return
        self.in_payload, self.left = True, self.length
        self.pad, self.pad_seen = 0, False
        if not self.left:
            self._end_frame(ts, tid, rnd)

    def _end_frame(self, ts: int, tid: int, rnd: int) -> None:
        self.in_payload = False
        t, flags, sid, length = self.type, self.flags, self.stream_id, self.length
        p, self.payload = self.payload, bytearray()
        if t == _DATA:
            body = length - (1 + self.pad if flags & _PADDED else 0)
            if body < 0:
                self.fail("HTTP/2 DATA padding exceeds the frame")
            else:
                self.handlers.data(self, sid, body, bool(flags & _END_STREAM), ts)
        elif t in (_HEADERS, _PUSH_PROMISE):
            skip = (1 if flags & _PADDED else 0) + (5 if t == _HEADERS and flags & _PRIORITY else 0)
            skip += 4 if t == _PUSH_PROMISE else 0
            pad = p[0] if flags & _PADDED and p else 0
            if skip + pad > length:
                self.fail("HTTP/2 padding exceeds the frame")
                return
            self.block = HeaderBlock(sid, t == _PUSH_PROMISE, bool(flags & _END_STREAM), self.frame_at,
                                bytearray(p[skip:length - pad]))
            self._header_fragment(flags, ts, rnd)
        elif t == _CONTINUATION:
            assert self.block is not None  # checked in _begin_frame
            self.block.fragments += p
            self._header_fragment(flags, ts, rnd)
        elif t == _RST_STREAM:
            if length != 4:
                self.fail("HTTP/2 RST_STREAM frame of the wrong size")
            else:
                self.handlers.reset(sid, int.from_bytes(p, "big"), ts)
        elif t == _SETTINGS:
            if flags & _END_STREAM:  # ACK
                return
            if length % 6:
                self.fail("HTTP/2 SETTINGS frame of the wrong size")
                return
            peer = self.peer
            assert peer is not None  # set by the connection that made both readers
            for i in range(0, length, 6):
                ident, value = int.from_bytes(p[i:i + 2], "big"), int.from_bytes(p[i + 2:i + 6], "big")
                if ident == _SETTINGS_HEADER_TABLE_SIZE:
                    peer.allow(table_size=value)
                elif ident == _SETTINGS_MAX_FRAME_SIZE:
                    peer.allow(frame_size=value)
        elif t == _GOAWAY:
            if length < 8:
                self.fail("HTTP/2 GOAWAY frame too short")
            else:
                last = int.from_bytes(p[0:4], "big") & 0x7FFFFFFF
                self.handlers.goaway(self, last, int.from_bytes(p[4:8], "big"), ts)
        # PRIORITY, PING, WINDOW_UPDATE and unknown types: nothing to record

    def _header_fragment(self, flags: int, ts: int, rnd: int) -> None:
        block = self.block
        assert block is not None
        if len(block.fragments) > MAX_HEADER_BLOCK:
            self.fail(f"HTTP/2 header block larger than {MAX_HEADER_BLOCK} bytes")
            return
        if not flags & _END_HEADERS:
            return
        self.block = None
        try:  # raw: no UTF-8 decoding (it could fail); names and values stay bytes
            fields = self.decoder.decode(bytes(block.fragments), raw=True)
        except Exception as exc:  # hpack errors, and surprises: the table state is lost either way
            self.fail(f"HPACK decoding failed ({type(exc).__name__})")  # (its text could quote bytes)
            return
        if not block.push:  # a promise's headers only matter for the table
            self.handlers.headers(self, block, fields, ts, rnd)



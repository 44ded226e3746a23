"""HTTP/2 cleartext (h2c) requests and responses from the bytes one connection read and wrote.

The HTTP/2 twin of :mod:`.http1`: one :class:`Http2Exchanges` per connection and point of view
(``requests_read=True`` downstream: Envoy reads the client's preface and frames; ``False`` upstream: Envoy
writes them), the same calls, and the same records (:class:`HttpMessage`, :class:`HttpExchange`, version
``"2"``), so the rest of the pipeline does not care which protocol carried a request. Each client stream
(odd id) is one request; the server's HEADERS on that stream are its response (1xx skipped); the exchange
completes at the response's END_STREAM or a RST_STREAM. Streams are multiplexed, so exchanges come out in
completion order.

Frames may be split across syscalls anywhere. Each direction buffers at most one frame header and one
header block or control frame (:data:`MAX_HEADER_BLOCK`); DATA is counted, never buffered; a frame above
the maximum frame size the receiving peer announced (16 KiB by default) is an error. Every header block
is HPACK-decoded (the dynamic table must follow the encoder, PUSH_PROMISE included) with one decoder per
direction. A server GOAWAY ends the streams above its last stream id at once, with an error.

What leaves this module is parsed fields only: method, path (never the query), status, body sizes
(padding excluded), and the values of the headers in :data:`.http.KEPT_HEADERS`. Other header values,
authorization, cookie and set-cookie included, are never stored; they only pass through the HPACK
decoder, whose dynamic table (bounded, never exposed) necessarily holds recently indexed fields.

Capture gaps (a syscall moved more bytes than were captured) inside a DATA payload (or an ignored frame's)
are just counted; anywhere else they end parsing of that direction. Malformed bytes never raise out of this
module: the direction records ``error`` and stops; requests still in flight carry it when ``finish`` ends
them.

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

An h2c upgrade (HTTP/1.1 ``Upgrade: h2c`` answered by ``101``) continues with :meth:`Http2Exchanges.
from_upgrade`, which takes over the upgrade request as stream 1 from an :class:`.http1.Http1Exchanges`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

import hpack

from .http import (
    KEPT_HEADERS,
    MAX_HEADER_VALUE,
    MAX_SYSCALL_BYTES,
    HttpExchange,
    HttpMessage,
    IoChunk,
    request_path,
)
from .http1 import Http1Exchanges

__all__ = ["MAX_HEADER_BLOCK", "MAX_STREAMS", "PREFACE", "GoAway", "Http2Exchanges", "is_h2_preface"]

#: What an HTTP/2 client sends first (RFC 9113 3.4).
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
#: Open streams tracked per connection; beyond this the oldest is ended unanswered.
MAX_STREAMS = 256
#: Bytes of one header block (HEADERS/PUSH_PROMISE + CONTINUATION payloads), or of any other frame we
#: buffer (SETTINGS, RST_STREAM, GOAWAY), at most; DATA and ignored frames are counted, never buffered.
MAX_HEADER_BLOCK = 256 * 1024
_MAX_HEADER_LIST = 512 * 1024  # decoded size (RFC 7541 accounting) of one header block, at most
_DEFAULT_FRAME_SIZE = 16384  # SETTINGS_MAX_FRAME_SIZE until the peer announces more
_MAX_FRAME_SIZE = (1 << 24) - 1  # the frame length field's limit
_DEFAULT_TABLE_SIZE = 4096  # SETTINGS_HEADER_TABLE_SIZE until the peer announces more
_MAX_TABLE_SIZE = 65536  # HPACK dynamic table we follow at most (an encoder going beyond is an error)

_DATA, _HEADERS, _RST_STREAM, _SETTINGS, _PUSH_PROMISE, _GOAWAY, _CONTINUATION = 0, 1, 3, 4, 5, 7, 9
_BUFFERED = frozenset({_HEADERS, _RST_STREAM, _SETTINGS, _PUSH_PROMISE, _GOAWAY, _CONTINUATION})
_END_STREAM = 0x1  # also SETTINGS' ACK
_END_HEADERS = 0x4
_PADDED = 0x8
_PRIORITY = 0x20
_SETTINGS_HEADER_TABLE_SIZE, _SETTINGS_MAX_FRAME_SIZE = 1, 5
_ERROR_CODES = (
    "NO_ERROR", "PROTOCOL_ERROR", "INTERNAL_ERROR", "FLOW_CONTROL_ERROR", "SETTINGS_TIMEOUT", "STREAM_CLOSED",
    "FRAME_SIZE_ERROR", "REFUSED_STREAM", "CANCEL", "COMPRESSION_ERROR", "CONNECT_ERROR", "ENHANCE_YOUR_CALM",
    "INADEQUATE_SECURITY", "HTTP_1_1_REQUIRED",
)
_GAP = "capture gap inside HTTP/2 framing"

# hpack logs every decoded header (values included) at DEBUG: never let secrets reach a log
logging.getLogger("hpack").setLevel(logging.WARNING)


def is_h2_preface(data: bytes) -> bool:
    """``data`` starts with the HTTP/2 client preface, or is a (non-empty) prefix of it.

    A read of 1 or 2 bytes ("P", "PR") may as well start an HTTP/1 ``POST``, ``PUT``, ``PROPFIND``...:
    callers deciding on so little should wait for more.
    """
    head = bytes(data[: len(PREFACE)])
    return bool(head) and PREFACE.startswith(head)


def _error_name(code: int) -> str:
    return _ERROR_CODES[code] if code < len(_ERROR_CODES) else f"0x{code:x}"


@dataclass(slots=True, frozen=True)
class GoAway:
    """A GOAWAY frame: who sent it, the last stream it processed (or will), and why."""

    ts_ns: int
    by_server: bool
    last_stream_id: int
    error: str


@dataclass(slots=True)
class _Stream:
    request: HttpMessage
    response: HttpMessage | None = None


@dataclass(slots=True)
class _Block:
    """A header block being assembled from HEADERS / PUSH_PROMISE + CONTINUATION frames."""

    stream_id: int
    push: bool
    end_stream: bool
    start: tuple[int, int, int]  # (ts_ns, tid, round) of its first frame's first byte
    fragments: bytearray


class _Side:
    """One direction's frame reader: reassembles frames and hands complete ones to the connection."""

    __slots__ = (
        "block",
        "client",
        "conn",
        "decoder",
        "failed",
        "flags",
        "frame_at",
        "head",
        "in_payload",
        "left",
        "length",
        "max_frame",
        "pad",
        "pad_seen",
        "payload",
        "pre_body",
        "preface_left",
        "seen_frame",
        "stream_id",
        "table_allowed",
        "type",
    )

    def __init__(self, conn: Http2Exchanges, *, client: bool) -> None:
        self.conn = conn
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
        self.block: _Block | None = None

    def fail(self, reason: str) -> None:
        if self.failed is None:
            self.failed = reason
            self.head.clear()
            self.payload = bytearray()
            self.block = None

    def allow(self, *, table_size: int | None = None, frame_size: int | None = None) -> None:
        """Its peer announced a setting for what this side sends. Passive observers cannot tell when the
        encoder adopts a change, so limits only ever grow (up to our bounds)."""
        if table_size is not None:
            self.table_allowed = max(self.table_allowed, min(table_size, _MAX_TABLE_SIZE))
            self.decoder.max_allowed_table_size = self.table_allowed
        if frame_size is not None:
            self.max_frame = max(self.max_frame, min(frame_size, _MAX_FRAME_SIZE))

    def feed(self, ts: int, data: bytes | memoryview, tid: int, rnd: int) -> None:
        view = memoryview(data)
        pos, n = 0, len(view)
        while pos < n and self.failed is None:
            if self.pre_body:
                k = min(self.pre_body, n - pos)
                self.pre_body -= k
                pos += k
                self.conn._upgrade_body(k, ts)
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
                self.conn._upgrade_body(k, ts)
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
                self.conn._on_data(self, sid, body, bool(flags & _END_STREAM), ts)
        elif t in (_HEADERS, _PUSH_PROMISE):
            skip = (1 if flags & _PADDED else 0) + (5 if t == _HEADERS and flags & _PRIORITY else 0)
            skip += 4 if t == _PUSH_PROMISE else 0
            pad = p[0] if flags & _PADDED and p else 0
            if skip + pad > length:
                self.fail("HTTP/2 padding exceeds the frame")
                return
            self.block = _Block(sid, t == _PUSH_PROMISE, bool(flags & _END_STREAM), self.frame_at,
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
                self.conn._on_reset(sid, int.from_bytes(p, "big"), ts)
        elif t == _SETTINGS:
            if flags & _END_STREAM:  # ACK
                return
            if length % 6:
                self.fail("HTTP/2 SETTINGS frame of the wrong size")
                return
            peer = self.conn._peer(self)
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
                self.conn._on_goaway(self, last, int.from_bytes(p[4:8], "big"), ts)
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
            self.conn._on_headers(self, block, fields, ts, rnd)


class Http2Exchanges:
    """Pairs the requests and responses of one HTTP/2 cleartext connection (same interface as
    :class:`.http1.Http1Exchanges`)."""

    def __init__(self, *, requests_read: bool) -> None:
        self.requests_read = requests_read
        self._client = _Side(self, client=True)
        self._server = _Side(self, client=False)
        self._streams: dict[int, _Stream] = {}  # open client streams, oldest first
        self._last_client_stream = 0
        self._new_requests: list[HttpMessage] = []
        self._upgrade_request: HttpMessage | None = None
        self.completed: list[HttpExchange] = []
        self.unanswered_dropped = 0
        self.goaway: GoAway | None = None  # the last GOAWAY seen, either way

    @classmethod
    def from_upgrade(cls, h1: Http1Exchanges) -> Http2Exchanges | None:
        """Continue an HTTP/1.1 connection that switched to h2c (RFC 7540 3.2).

        ``h1`` (made with ``h2c_handoff=True``) must have seen both sides switch (``h1.upgraded`` and
        ``h1.h2c_request``); otherwise None and ``h1`` is left alone. The upgrade request becomes stream 1
        (its HTTP/2 response completes it); exchanges and new requests ``h1`` had not handed out yet move
        over, and the bytes that followed the switch on each side are parsed at once, in time order. From
        then on feed this object instead of ``h1``.
        """
        up = h1.take_h2c_upgrade()
        if up is None:
            return None
        h2 = cls(requests_read=h1.requests_read)
        h2.completed = h1.take_completed()
        h2._new_requests = h1.take_new_requests()
        h2.unanswered_dropped = h1.unanswered_dropped
        req = up.request
        h2._streams[1] = _Stream(req)
        h2._last_client_stream = 1
        h2._upgrade_request = req
        length = req.headers.get("content-length", "")
        if length.isdigit():  # httptools hands over at the end of the headers: a body comes first
            h2._client.pre_body = int(length)
        # the client's settings (HTTP2-Settings header) were not kept: allow what the server may use
        h2._server.allow(table_size=_MAX_TABLE_SIZE, frame_size=_MAX_FRAME_SIZE)
        chunks = [(c, True) for c in up.request_side] + [(c, False) for c in up.response_side]
        chunks.sort(key=lambda item: (item[0].ts_ns, not item[1]))  # stable: the client first on ties
        for chunk, client in chunks:
            h2._feed(h2._client if client else h2._server, chunk)
        return h2

    # ------------------------------------------------------------------ the Http1Exchanges interface

    @property
    def error(self) -> str | None:
        """Why parsing (of either direction) stopped, if it did."""
        return self._client.failed or self._server.failed

    @property
    def upgraded(self) -> bool:
        """Always False: HTTP/2 does not switch protocols (kept for parity with Http1Exchanges)."""
        return False

    def on_read(self, ts_ns: int, data: bytes, total_len: int, tid: int = 0, round_: int = 0, *,
                frames_only: bool = False) -> None:
        """Bytes Envoy read from this connection (``total_len`` >= len(data): the rest was not captured).
        ``frames_only``: ``data`` is the condensed framing of the ``total_len`` bytes (module docstring)."""
        side = self._client if self.requests_read else self._server
        self._feed(side, IoChunk(ts_ns, data, total_len, tid, round_), frames_only)

    def on_write(self, ts_ns: int, data: bytes, total_len: int, tid: int = 0, round_: int = 0, *,
                 frames_only: bool = False) -> None:
        """Bytes Envoy wrote to this connection (``frames_only`` as in ``on_read``)."""
        side = self._server if self.requests_read else self._client
        self._feed(side, IoChunk(ts_ns, data, total_len, tid, round_), frames_only)

    def take_new_requests(self) -> list[HttpMessage]:
        """Requests whose header block completed since the last call (bodies may still be arriving)."""
        out = self._new_requests
        if out:
            self._new_requests = []
        return out

    def in_flight(self) -> HttpMessage | None:
        """The oldest request still waiting for (the end of) its response."""
        st = next(iter(self._streams.values()), None)
        return st.request if st is not None else None

    def take_completed(self) -> list[HttpExchange]:
        """Exchanges completed since the last call, in completion order."""
        out, self.completed = self.completed, []
        return out

    def finish(self, ts_ns: int) -> list[HttpExchange]:
        """The connection ended: open streams become exchanges without (complete) responses. A direction
        that failed lends its error to them."""
        reason = self.error
        for sid in list(self._streams):
            st = self._streams[sid]
            if st.response is not None:
                error = reason or "response incomplete when the connection ended"
            elif st.request.end_ns is None:
                error = reason or "request incomplete when the connection ended"
            else:
                error = reason
            self._close(sid, ts_ns, error)
        return self.take_completed()

    # ------------------------------------------------------------------ fed by the sides

    def _feed(self, side: _Side, chunk: IoChunk, frames_only: bool = False) -> None:
        if side.failed is not None:
            return
        gap = chunk.total_len - len(chunk.data)
        try:
            if gap > MAX_SYSCALL_BYTES:
                side.fail(f"implausible syscall size {chunk.total_len}")
                return
            if frames_only:
                side.feed_frames(chunk.ts_ns, chunk.data, chunk.total_len, chunk.tid, chunk.round)
                return
            side.feed(chunk.ts_ns, chunk.data, chunk.tid, chunk.round)
            if gap > 0:
                side.gap(chunk.ts_ns, gap, chunk.tid, chunk.round)
        except Exception as exc:  # a bug must not stop the daemon: this direction stops instead
            side.fail(f"internal error: {type(exc).__name__}")

    def _peer(self, side: _Side) -> _Side:
        return self._server if side is self._client else self._client

    def _upgrade_body(self, n: int, ts: int) -> None:
        req = self._upgrade_request
        if req is not None:
            req.body_bytes += n
            req.end_ns = ts

    def _on_headers(self, side: _Side, block: _Block, fields: Iterable[tuple[bytes, bytes]], ts: int,
                    rnd: int) -> None:
        sid = block.stream_id
        st = self._streams.get(sid)
        if side.client:
            if st is None:
                if sid % 2 == 0 or sid <= self._last_client_stream:
                    return  # not a new client stream (trailers of one already ended, or bogus)
                self._last_client_stream = sid
                req = _message(fields, block.start, ts, rnd)
                self._streams[sid] = st = _Stream(req)
                self._new_requests.append(req)
                if len(self._streams) > MAX_STREAMS:
                    self._drop_oldest()
            if block.end_stream:  # the request's headers, or its trailers
                st.request.end_ns = ts
            return
        if st is None:
            return  # a response to nothing we track (pushed, dropped, or after a reset)
        if st.response is None:
            resp = _message(fields, block.start, ts, rnd)
            if resp.status is not None and 100 <= resp.status < 200:
                return  # informational (100 Continue, 103 Early Hints): the final response follows
            st.response = resp
        if block.end_stream:
            self._complete(sid, ts)

    def _on_data(self, side: _Side, sid: int, n: int, end_stream: bool, ts: int) -> None:
        st = self._streams.get(sid)
        if st is None:
            return
        msg = st.request if side.client else st.response
        if msg is None:
            return  # DATA before the response's HEADERS: not HTTP
        msg.body_bytes += n
        if end_stream:
            if side.client:
                msg.end_ns = ts
            else:
                self._complete(sid, ts)

    def _on_reset(self, sid: int, code: int, ts: int) -> None:
        if sid in self._streams:
            self._close(sid, ts, f"stream reset: {_error_name(code)}")

    def _on_goaway(self, side: _Side, last: int, code: int, ts: int) -> None:
        name = _error_name(code)
        self.goaway = GoAway(ts, not side.client, last, name)
        if not side.client:  # client streams above ``last`` were not (and will not be) processed
            for sid in [s for s in self._streams if s > last]:
                self._close(sid, ts, f"stream not processed: GOAWAY ({name}) after stream {last}")

    def _complete(self, sid: int, ts: int) -> None:
        st = self._streams.pop(sid)
        resp = st.response
        assert resp is not None
        resp.end_ns = ts
        st.request.response = resp
        self.completed.append(HttpExchange(st.request, resp))

    def _close(self, sid: int, ts: int, error: str | None) -> None:
        """End a stream early: the response so far (if any) or else the request carries ``error``."""
        st = self._streams.pop(sid)
        req, resp = st.request, st.response
        if req.end_ns is None:
            req.end_ns = ts
        if resp is not None:
            resp.end_ns = ts
            resp.error = resp.error or error
            req.response = resp
        elif error is not None:
            req.error = req.error or error
        self.completed.append(HttpExchange(req, resp))

    def _drop_oldest(self) -> None:
        sid = next(iter(self._streams))
        st = self._streams.pop(sid)
        self.completed.append(HttpExchange(st.request, None))  # as HTTP/1 does: no response, no error
        self.unanswered_dropped += 1


def _message(fields: Iterable[tuple[bytes, bytes]], start: tuple[int, int, int], ts: int,
             rnd: int) -> HttpMessage:
    """A request or response from a decoded header block: pseudo-headers and KEPT_HEADERS values only."""
    msg = HttpMessage(start_ns=start[0], tid=start[1], round=start[2], version="2", headers_done_ns=ts,
                      headers_round=rnd)
    for name, value in fields:
        if name[:1] == b":":
            if name == b":method":
                msg.method = value.decode("latin-1")[:MAX_HEADER_VALUE]
            elif name == b":path":
                msg.path = request_path(value.decode("latin-1"))
            elif name == b":status" and len(value) == 3 and value.isdigit():
                msg.status = int(value)
        else:
            key = name.decode("latin-1").lower()
            if key in KEPT_HEADERS:
                msg.headers[key] = value.decode("latin-1")[:MAX_HEADER_VALUE]
    return msg

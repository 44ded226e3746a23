"""HTTP/2 cleartext (h2c) requests and responses from the bytes one connection read and wrote.

The HTTP/2 twin of :mod:`.http1`: one :class:`Http2Exchanges` per connection and point of view
(``requests_read=True`` downstream: Envoy reads the client's preface and frames; ``False`` upstream: Envoy
writes them), the same calls, and the same records (:class:`HttpMessage`, :class:`HttpExchange`, version
``"2"``), so the rest of the pipeline does not care which protocol carried a request. Each client stream
(odd id) is one request; the server's HEADERS on that stream are its response (1xx skipped); the exchange
completes at the response's END_STREAM or a RST_STREAM. Streams are multiplexed, so exchanges come out in
completion order.

Each direction's bytes are read by a :class:`.http2_frames.FrameReader` (frames split anywhere, bounded
buffering, HPACK decoding, capture gaps, condensed records: see there); this module pairs what the two
readers hand on into exchanges. A server GOAWAY ends the streams above its last stream id at once, with
an error.

What leaves this module is parsed fields only: method, path (never the query), status, body sizes
(padding excluded), and the values of the headers in :data:`.http.KEPT_HEADERS`. Other header values,
authorization, cookie and set-cookie included, are never stored.

Malformed bytes, or a capture gap in the framing, never raise out of this module: the direction records
``error`` and stops; requests still in flight carry it when ``finish`` ends them.

An h2c upgrade (HTTP/1.1 ``Upgrade: h2c`` answered by ``101``) continues with :meth:`Http2Exchanges.
from_upgrade`, which takes over the upgrade request as stream 1 from an :class:`.http1.Http1Exchanges`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

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
from .http2_frames import MAX_FRAME_SIZE, MAX_TABLE_SIZE, PREFACE, FrameHandlers, FrameReader, HeaderBlock

__all__ = ["MAX_STREAMS", "GoAway", "Http2Exchanges", "is_h2_preface"]

#: Open streams tracked per connection; beyond this the oldest is ended unanswered.
MAX_STREAMS = 256
_ERROR_CODES = (
    "NO_ERROR", "PROTOCOL_ERROR", "INTERNAL_ERROR", "FLOW_CONTROL_ERROR", "SETTINGS_TIMEOUT", "STREAM_CLOSED",
    "FRAME_SIZE_ERROR", "REFUSED_STREAM", "CANCEL", "COMPRESSION_ERROR", "CONNECT_ERROR", "ENHANCE_YOUR_CALM",
    "INADEQUATE_SECURITY", "HTTP_1_1_REQUIRED",
)


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


class Http2Exchanges:
    """Pairs the requests and responses of one HTTP/2 cleartext connection (same interface as
    :class:`.http1.Http1Exchanges`)."""

    def __init__(self, *, requests_read: bool) -> None:
        self.requests_read = requests_read
        handlers = FrameHandlers(self._on_headers, self._on_data, self._on_reset, self._on_goaway,
                                 self._upgrade_body)
        self._client = FrameReader(handlers, client=True)
        self._server = FrameReader(handlers, client=False)
        self._client.peer, self._server.peer = self._server, self._client
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
        h2._server.allow(table_size=MAX_TABLE_SIZE, frame_size=MAX_FRAME_SIZE)
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
        ``frames_only``: ``data`` is the condensed framing of the ``total_len`` bytes (described in
        :mod:`.http2_frames`)."""
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

    def _feed(self, side: FrameReader, chunk: IoChunk, frames_only: bool = False) -> None:
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

    def _upgrade_body(self, n: int, ts: int) -> None:
        req = self._upgrade_request
        if req is not None:
            req.body_bytes += n
            req.end_ns = ts

    def _on_headers(self, side: FrameReader, block: HeaderBlock, fields: Iterable[tuple[bytes, bytes]],
                    ts: int, rnd: int) -> None:
        sid = block.stream_id
        st = self._streams.get(sid)
        if side.client:
            if st is None:
                if sid % 2 == 0 or sid <= self._last_client_stream:
                    return  # not a new client stream (trailers of one already ended, or bogus)
                self._last_client_stream = sid
                req = _message(fields, block.start, ts, rnd, response=False)
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
            resp = _message(fields, block.start, ts, rnd, response=True)
            if resp.status is not None and 100 <= resp.status < 200:
                return  # informational (100 Continue, 103 Early Hints): the final response follows
            st.response = resp
        if block.end_stream:
            self._complete(sid, ts)

    def _on_data(self, side: FrameReader, sid: int, n: int, end_stream: bool, ts: int) -> None:
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

    def _on_goaway(self, side: FrameReader, last: int, code: int, ts: int) -> None:
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
             rnd: int, response: bool) -> HttpMessage:
    """A request or response from a decoded header block: its own pseudo-headers (a request's in a
    response, or ``:status`` in a request, are malformed, RFC 9113 8.3, and left out: their values could be
    anything) and KEPT_HEADERS values only."""
    msg = HttpMessage(start_ns=start[0], tid=start[1], round=start[2], version="2", headers_done_ns=ts,
                      headers_round=rnd)
    for name, value in fields:
        if name[:1] == b":":
            if response:
                if name == b":status" and len(value) == 3 and value.isdigit():
                    msg.status = int(value)
            elif name == b":method":
                msg.method = value.decode("latin-1")[:MAX_HEADER_VALUE]
            elif name == b":path":
                msg.path = request_path(value.decode("latin-1"))
        else:
            key = name.decode("latin-1").lower()
            if key in KEPT_HEADERS:
                msg.headers[key] = value.decode("latin-1")[:MAX_HEADER_VALUE]
    return msg

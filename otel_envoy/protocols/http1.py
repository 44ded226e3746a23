"""HTTP/1.x requests and responses from the bytes one connection read and wrote, parsed with httptools.

One :class:`Http1Exchanges` per connection and point of view: ``requests_read=True`` for a downstream
connection (Envoy reads requests, writes responses), ``False`` for an upstream one (Envoy writes requests,
reads responses). Each syscall's bytes go in with their timestamp; completed request/response pairs come
out as :class:`HttpExchange` records. Pipelined and keep-alive requests pair with responses in order.

What leaves this module is parsed fields only: method, path (never the query), status, version, body
sizes, and the values of the headers in :data:`KEPT_HEADERS` (trace context, ``x-request-id``,
``user-agent``). Other header values, Authorization, Cookie and Set-Cookie included, are never stored.

Capture gaps (a syscall moved more bytes than the kernel copied) are skipped by what the framing allows.
Inside a ``Content-Length`` body they are filled with zero bytes, which keeps the count right; when the body
ends inside the gap and more bytes follow it there, another message started uncaptured: it is kept as a
message with ``capture_gap`` and nothing else known (so pipelined requests and responses still pair in
order), and parsing resumes at the next syscall that starts a message. Inside a chunked body the gap holds
chunk framing that zeros would break, so it is skipped instead: parsing resumes at the next syscall that
starts a chunk (a chunk-size line: Envoy writes whole chunks) or a message (the chunked one then ended in the
gap, at the last syscall before it); the message is marked ``capture_gap`` and its body size is unknown.
Inside headers a gap makes the parser fail, which is recorded on the message.

Malformed bytes never raise out of this module: the message records the error and the direction stops
parsing.

A connection that switches protocols (``101``) stops HTTP/1 parsing. With ``h2c_handoff=True`` an h2c
upgrade (RFC 7540 3.2) is kept ready for :meth:`Http2Exchanges.from_upgrade
<otel_envoy.protocols.http2.Http2Exchanges.from_upgrade>`: the upgrade request stays pending (its response
comes as HTTP/2 on stream 1) and each direction keeps the bytes that followed the switch, bounded. A final
response other than ``101`` to an upgrade request declines the upgrade (``curl --http2`` to a server that
does not do h2c): HTTP/1 goes on, from the bytes the request side kept (h2c) or from its next read.
"""

from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass

import httptools

from .http import (
    KEPT_HEADERS,
    MAX_HEADER_VALUE,
    MAX_SYSCALL_BYTES,
    HttpExchange,
    HttpMessage,
    IoChunk,
    request_path,
)

__all__ = ["MAX_PENDING", "H2cUpgrade", "Http1Exchanges", "lists_h2c"]

#: Requests waiting for their response, per connection; beyond this the oldest is ended unanswered.
MAX_PENDING = 64
_ZEROS = memoryview(bytes(65536))
_MAX_LEFTOVER_CHUNKS = 16  # syscalls kept per direction after an h2c switch, waiting for the hand-off
_MAX_LEFTOVER_BYTES = 256 * 1024  # beyond either bound, further bytes are kept as a capture gap only
#: A chunk-size line (RFC 9112 7.1): hex digits, maybe extensions, CRLF.
_CHUNK_SIZE_LINE = re.compile(rb"[0-9a-fA-F]{1,16}(?:[ \t]*;[^\r\n]*)?\r\n")
#: What a fresh parser is fed, callbacks muted, to be in a chunked body again after a capture gap.
_CHUNKED_HEAD = {True: b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n",
                 False: b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"}


@dataclass(slots=True)
class H2cUpgrade:
    """An accepted h2c upgrade, detached from its :class:`Http1Exchanges` for the HTTP/2 parser."""

    request: HttpMessage  # the HTTP/1.1 request that asked for h2c: HTTP/2 stream 1 carries its response
    switch: HttpMessage  # the 101 Switching Protocols response
    request_side: list[IoChunk]  # what the client sent after the upgrade request (preface, frames)
    response_side: list[IoChunk]  # what the server sent after the 101 (SETTINGS, frames)


def lists_h2c(headers: dict[str, str]) -> bool:
    """The (kept) ``Upgrade`` header names h2c."""
    return any(t.strip().lower() == "h2c" for t in headers.get("upgrade", "").split(","))


class _Direction:
    """One direction's parser state: httptools calls back into this object."""

    __slots__ = (
        "_completed_in_fill",
        "_filling",
        "_header_name",
        "_is_request",
        "_last_ts",
        "_muted",
        "_overrun",
        "_parser",
        "_round",
        "_target",
        "_tid",
        "_ts",
        "chunk_resync",
        "chunked",
        "current",
        "done",
        "failed",
        "headers_done",
        "keep_h2c",
        "keep_h2c_wanted",
        "leftover",
        "leftover_bytes",
        "upgraded",
        "wait_for_start",
    )

    def __init__(self, is_request: bool, keep_h2c: bool = False) -> None:
        self._is_request = is_request
        self._parser = (httptools.HttpRequestParser if is_request else httptools.HttpResponseParser)(self)
        self.current: HttpMessage | None = None
        self.done: list[HttpMessage] = []
        self.headers_done: list[HttpMessage] = []
        self.failed: str | None = None
        self.upgraded = False
        self.keep_h2c = keep_h2c  # after an h2c switch, keep what follows (else it is dropped)
        self.keep_h2c_wanted = keep_h2c
        self.leftover: list[IoChunk] = []
        self.leftover_bytes = 0
        self._header_name = ""
        self._ts = 0
        self._tid = 0
        self._round = 0
        self.wait_for_start = False  # after lost records: skip syscalls until one starts a message
        self.chunked = False  # the message in progress has a chunked body
        self.chunk_resync = False  # a capture gap inside a chunked body: waiting for a chunk or message start
        self._muted = False  # callbacks ignored (a synthetic head fed to a fresh parser)
        self._filling = False  # zeros for a capture gap are being fed
        self._completed_in_fill = False  # a message completed while they were
        self._overrun = False  # and bytes followed it
        self._last_ts = 0  # the last syscall fed
        self._target = ""  # the request target of the message in progress, as it came (query included)

    # -- fed by Http1Exchanges

    def restart(self) -> None:
        """Records were lost: drop the message in progress and parse afresh from the next syscall that
        starts a message (a request line's method token, or ``HTTP/``)."""
        if self.upgraded or self.failed is not None:
            return
        self.current = None
        self._parser = self._new_parser()
        self.wait_for_start = True
        self.chunk_resync = False

    def _new_parser(self) -> httptools.HttpRequestParser | httptools.HttpResponseParser:
        return (httptools.HttpRequestParser if self._is_request else httptools.HttpResponseParser)(self)

    def feed_gap(self, ts_ns: int, n: int, tid: int, round_: int) -> None:
        """The last syscall moved ``n`` more bytes than were captured (see the module's text)."""
        if self.upgraded:  # not HTTP/1 any more: kept (for an h2c hand-off) as a gap
            self.keep_gap(n)
            return
        msg = self.current
        if msg is not None and msg.headers_done_ns is not None and self.chunked:
            msg.capture_gap = True  # chunk framing is in the gap: skip it, resynchronise on what follows
            self.chunk_resync = True
            return
        self._completed_in_fill = self._overrun = False
        while n > 0 and self.failed is None and not self.wait_for_start:
            k = min(n, len(_ZEROS))
            self._filling = True
            try:
                self.feed(ts_ns, _ZEROS[:k], tid, round_)
            finally:
                self._filling = False
            n -= k
            if self._completed_in_fill:  # the body ended in the gap
                if self._overrun or n > 0:  # and another message started there, uncaptured: it keeps its
                    self.done.append(HttpMessage(start_ns=ts_ns, end_ns=ts_ns, tid=tid, round=round_,
                                                 capture_gap=True))  # place, so the pairing stays right
                    self.restart()
                break

    def feed(self, ts_ns: int, data: bytes | memoryview, tid: int, round_: int, *, complete: bool = True
             ) -> None:
        """One syscall's captured bytes (``complete``: all it moved; else a capture gap follows)."""
        if self.failed is not None:
            return
        if self.chunk_resync and not self._resync_chunked(ts_ns, data, complete):
            self._last_ts = ts_ns
            return
        if self.wait_for_start:
            if not _starts_message(bytes(data[:16]), self._is_request):
                return  # the rest of a message whose start was lost
            self.wait_for_start = False
        if not self._filling:
            self._last_ts = ts_ns
        if self.upgraded:
            if self.keep_h2c:
                self.keep(IoChunk(ts_ns, bytes(data), len(data), tid, round_))
            return
        self._ts, self._tid, self._round = ts_ns, tid, round_
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self.upgraded = True
            msg = self.current or (self.done[-1] if self.done else None)
            self.keep_h2c = self.keep_h2c and msg is not None and lists_h2c(msg.headers)
            offset = exc.args[0] if exc.args and isinstance(exc.args[0], int) else len(data)
            rest = bytes(data[offset:])
            self.keep(IoChunk(ts_ns, rest, len(rest), tid, round_))
        except httptools.HttpParserError as exc:
            if self._filling and self._completed_in_fill:  # zeros past the end of a body: not an error
                self._overrun = True
                return
            self._fail(f"malformed HTTP/1 {'request' if self._is_request else 'response'}: {exc}")
        except Exception as exc:  # httptools is C: never let a surprise stop the daemon
            self._fail(f"HTTP/1 parser failure: {type(exc).__name__}: {exc}")

    def _resync_chunked(self, ts_ns: int, data: bytes | memoryview, complete: bool) -> bool:
        """After a capture gap in a chunked body: whether to parse ``data`` (it starts a chunk, or a message,
        in which case the chunked one ended at the last syscall); ``False``: skipped (more chunk data)."""
        head = bytes(data[:32])
        chunk_start = _CHUNK_SIZE_LINE.match(head) is not None
        if not chunk_start and _starts_message(head, self._is_request):
            self._end_chunked_message(self._last_ts)  # it ended in the gap
            return True
        if chunk_start:
            self._parser = self._new_parser()
            self._muted = True
            try:
                self._parser.feed_data(_CHUNKED_HEAD[self._is_request])
            finally:
                self._muted = False
            self.chunk_resync = False
            return True
        if complete and bytes(data[-7:]).endswith(b"\r\n0\r\n\r\n"):
            self._end_chunked_message(ts_ns)  # the end of a chunk's data, then the last chunk
        return False

    def _end_chunked_message(self, end_ns: int) -> None:
        """The chunked message being resynchronised ended at ``end_ns``; parse afresh from here."""
        msg = self.current
        if msg is not None:
            msg.end_ns = end_ns
            self.done.append(msg)
            self.current = None
        self._parser = self._new_parser()
        self.chunk_resync = False

    def resume(self) -> list[IoChunk]:
        """The upgrade was declined: parse HTTP/1 again (a fresh parser: the old one stopped at the
        upgrade). Returns the bytes kept since the upgrade request, to be fed again."""
        kept = self.leftover
        self.upgraded = False
        self.leftover, self.leftover_bytes, self.keep_h2c = [], 0, self.keep_h2c_wanted
        self.current = None
        parser = httptools.HttpRequestParser if self._is_request else httptools.HttpResponseParser
        self._parser = parser(self)
        return kept

    def keep(self, chunk: IoChunk) -> None:
        """After an h2c switch: keep a syscall's bytes for the HTTP/2 parser (past the bounds, its size)."""
        if not self.keep_h2c:
            return
        kept = self.leftover
        if len(kept) < _MAX_LEFTOVER_CHUNKS and self.leftover_bytes + len(chunk.data) <= _MAX_LEFTOVER_BYTES:
            kept.append(chunk)
            self.leftover_bytes += len(chunk.data)
        elif kept:  # uncaptured from here on: the HTTP/2 parser sees a capture gap
            kept[-1] = kept[-1]._replace(total_len=kept[-1].total_len + chunk.total_len)
        else:
            kept.append(chunk._replace(data=b""))

    def keep_gap(self, n: int) -> None:
        """After an h2c switch: the last syscall moved ``n`` more bytes than were captured."""
        if self.keep_h2c and self.leftover:
            self.leftover[-1] = self.leftover[-1]._replace(total_len=self.leftover[-1].total_len + n)

    def fail(self, ts_ns: int, reason: str) -> None:
        """Stop parsing this direction; the message in progress (or a new one) carries ``reason``."""
        if self.failed is None:
            self._ts = ts_ns
            self._fail(reason)

    def _fail(self, reason: str) -> None:
        self.failed = reason
        msg = self.current
        if msg is None:
            msg = HttpMessage(start_ns=self._ts, tid=self._tid, round=self._round)
        elif msg.path is None and self._target:  # failed inside its header block: the path, never the query
            msg.path = request_path(self._target)
        msg.error = reason
        msg.end_ns = self._ts
        self.done.append(msg)
        self.current = None

    # -- httptools callbacks

    def on_message_begin(self) -> None:
        if self._muted:
            return
        self.current = HttpMessage(start_ns=self._ts, tid=self._tid, round=self._round)
        self.chunked = False
        self._target = ""

    def on_url(self, url: bytes) -> None:
        if self.current is not None and not self._muted:  # the raw target (query included) stays here:
            self._target += url.decode("latin-1")  # the message only ever gets its path

    def on_status(self, _status: bytes) -> None:
        pass

    def on_header(self, name: bytes, value: bytes) -> None:
        msg = self.current
        if msg is None or self._muted:
            return
        if name:  # httptools may split a header across calls; a value-only call continues the last one
            self._header_name = name.decode("latin-1").lower()
        key = self._header_name
        if key == "transfer-encoding" and b"chunked" in value.lower():
            self.chunked = True
        if key in KEPT_HEADERS:
            text = value.decode("latin-1")
            prev = msg.headers.get(key)
            if prev is not None and not name:
                text = prev + text
            msg.headers[key] = text[:MAX_HEADER_VALUE]

    def on_headers_complete(self) -> None:
        msg = self.current
        if msg is None or self._muted:
            return
        msg.headers_done_ns = self._ts
        msg.headers_round = self._round
        if self._is_request:  # only requests are taken (take_new_requests); responses must not pile up
            self.headers_done.append(msg)
        p = self._parser
        msg.version = p.get_http_version()
        if self._is_request:
            msg.method = p.get_method().decode("latin-1")
            msg.path = request_path(self._target)
        else:
            msg.status = p.get_status_code()
        msg.upgrade = bool(p.should_upgrade()) if hasattr(p, "should_upgrade") else "upgrade" in msg.headers

    def on_body(self, body: bytes) -> None:
        if self.current is not None:
            self.current.body_bytes += len(body)

    def on_message_complete(self) -> None:
        msg = self.current
        if msg is None:
            return
        msg.end_ns = self._ts
        self.done.append(msg)
        self.current = None
        if self._filling:
            self._completed_in_fill = True


_METHOD_START = re.compile(rb"[A-Z]{1,16} ")


def _starts_message(head: bytes, is_request: bool) -> bool:
    """Whether a syscall's first bytes start an HTTP/1 request (a method token and a space) or response."""
    if is_request:
        return _METHOD_START.match(head) is not None
    return head.startswith(b"HTTP/")


class Http1Exchanges:
    """Pairs the requests and responses of one HTTP/1.x connection.

    ``h2c_handoff=True``: a ``101`` answering ``Upgrade: h2c`` does not complete the upgrade request; it stays
    pending for :meth:`take_h2c_upgrade` (see ``Http2Exchanges.from_upgrade``). Without it, or for other
    protocols (websocket...), the 101 is the request's response.
    """

    def __init__(self, *, requests_read: bool, h2c_handoff: bool = False) -> None:
        self.requests_read = requests_read
        self.h2c_handoff = h2c_handoff
        self._requests = _Direction(is_request=True, keep_h2c=h2c_handoff)
        self._responses = _Direction(is_request=False, keep_h2c=h2c_handoff)
        self._pending: deque[HttpMessage] = deque()
        self.completed: list[HttpExchange] = []
        self.unanswered_dropped = 0
        self.h2c_request: HttpMessage | None = None  # the pending request a 101 switched to h2c
        self.h2c_switch: HttpMessage | None = None  # that 101 response

    @property
    def error(self) -> str | None:
        """Why parsing stopped, if it did."""
        return self._requests.failed or self._responses.failed

    @property
    def upgraded(self) -> bool:
        """The connection switched protocols (101): HTTP/1 parsing has stopped."""
        return self._requests.upgraded and self._responses.upgraded

    def upgrade_leftover(self, *, requests: bool) -> list[IoChunk]:
        """Bytes of the request (or response) side that followed the protocol switch, kept for an h2c
        hand-off (empty unless ``h2c_handoff``); past the bounds only their sizes (a capture gap)."""
        return (self._requests if requests else self._responses).leftover

    def take_h2c_upgrade(self) -> H2cUpgrade | None:
        """Once both sides switched to h2c: detach the pending upgrade request, the 101 and the bytes that
        followed (this object then holds neither); None when there is no such switch (again)."""
        req, switch = self.h2c_request, self.h2c_switch
        if req is None or switch is None or not self.upgraded:
            return None
        self._pending = deque(m for m in self._pending if m is not req)  # (dataclass == compares fields)
        self.h2c_request = self.h2c_switch = None
        out = H2cUpgrade(req, switch, self._requests.leftover, self._responses.leftover)
        for d in (self._requests, self._responses):
            d.leftover, d.leftover_bytes, d.keep_h2c = [], 0, False
        return out

    def on_read(self, ts_ns: int, data: bytes, total_len: int, tid: int = 0, round_: int = 0) -> None:
        """Bytes Envoy read from this connection (``total_len`` >= len(data): the rest was not captured)."""
        self._feed(self._requests if self.requests_read else self._responses, ts_ns, data, total_len,
                   tid, round_)

    def on_write(self, ts_ns: int, data: bytes, total_len: int, tid: int = 0, round_: int = 0) -> None:
        """Bytes Envoy wrote to this connection."""
        self._feed(self._responses if self.requests_read else self._requests, ts_ns, data, total_len,
                   tid, round_)

    def _feed(self, direction: _Direction, ts_ns: int, data: bytes, total_len: int, tid: int,
              round_: int) -> None:
        gap = total_len - len(data)
        if gap > MAX_SYSCALL_BYTES:
            direction.fail(ts_ns, f"implausible syscall size {total_len}")
        else:
            direction.feed(ts_ns, data, tid, round_, complete=gap <= 0)
            if gap > 0 and direction.failed is None:  # bytes the kernel did not copy
                direction.feed_gap(ts_ns, gap, tid, round_)
        if self._requests.done:
            for req in self._requests.done:
                if len(self._pending) >= MAX_PENDING:
                    self.completed.append(HttpExchange(self._pending.popleft(), None))
                    self.unanswered_dropped += 1
                self._pending.append(req)
            self._requests.done.clear()
        if self._responses.done:
            declined = False
            for resp in self._responses.done:
                if resp.status is not None and 100 <= resp.status < 200 and resp.status != 101:
                    continue  # informational (100 Continue): the final response follows
                if resp.status == 101 and self.h2c_handoff and self._pending and lists_h2c(resp.headers):
                    self.h2c_request, self.h2c_switch = self._pending[0], resp  # answered on h2 stream 1
                    continue
                if self._pending:
                    req = self._pending.popleft()
                    req.response = resp
                    self.completed.append(HttpExchange(req, resp))
                    # an upgrade request answered without 101: the upgrade was declined
                    declined = declined or (req.upgrade and resp.status != 101 and self._requests.upgraded
                                            and not self._responses.upgraded and not self._pending)
                # a response without a request (we attached mid-connection) is not a request span
            self._responses.done.clear()
            if declined:
                for chunk in self._requests.resume():
                    self._feed(self._requests, chunk.ts_ns, chunk.data, chunk.total_len, chunk.tid,
                               chunk.round)

    def records_lost(self) -> list[HttpExchange]:
        """Records of the connection were lost (a gap in its sequence): the exchanges in flight end now,
        marked ``records_lost`` (what they lost is unknown), and both directions restart at the next
        message start, so the exchanges after the gap pair right. Returns the ended exchanges."""
        out = self.take_completed()
        for req in self._pending:
            req.records_lost = True
            out.append(HttpExchange(req, None))
        self._pending.clear()
        req = self._requests.current
        if req is not None and req.method is not None:
            req.records_lost = True
            out.append(HttpExchange(req, None))
        for direction in (self._requests, self._responses):
            direction.restart()
        return out

    def take_new_requests(self) -> list[HttpMessage]:
        """Requests whose header block completed since the last call (bodies may still be arriving)."""
        out = self._requests.headers_done
        if out:
            self._requests.headers_done = []
        return out

    def in_flight(self) -> HttpMessage | None:
        """The oldest request still waiting for (the end of) its response."""
        if self._pending:
            return self._pending[0]
        return self._requests.current

    def take_completed(self) -> list[HttpExchange]:
        """Exchanges completed since the last call."""
        out, self.completed = self.completed, []
        return out

    def finish(self, ts_ns: int) -> list[HttpExchange]:
        """The connection ended: requests still waiting become exchanges without (complete) responses."""
        out = self.take_completed()
        partial_response = self._responses.current
        for req in self._pending:
            resp = None
            if partial_response is not None:
                resp, partial_response = partial_response, None
                resp.error = resp.error or "response incomplete when the connection ended"
                resp.end_ns = ts_ns
                req.response = resp
            out.append(HttpExchange(req, resp))
        self._pending.clear()
        req = self._requests.current
        if req is not None and req.method is not None:
            req.error = req.error or "request incomplete when the connection ended"
            req.end_ns = ts_ns
            out.append(HttpExchange(req, None))
        self._requests.current = None
        return out

"""The first bytes of an HTTP/1.x request, as the kernel keeps them for a request it did not trace.

When a request that was not sampled turns out to be worth keeping (a 5xx, a connection closed before its
answer, a slow one), the kernel sends its first bytes (bpf/http_metrics.bpf.h, ``KEPT_HEAD``): the request
line and the first header lines, maybe cut in the middle of one. This parses what is there with httptools
and keeps what a complete parse would keep: the method, the path (no query), the version and the values of
:data:`~otel_envoy.protocols.http.KEPT_HEADERS`, never a header cut short or any other value.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import httptools

from .http import KEPT_HEADERS, MAX_HEADER_VALUE, request_path

__all__ = ["RequestHead", "parse_request_head", "trace_context_headers"]

TRACEPARENT_VALUE = 55  # "00-" + 32 + "-" + 16 + "-" + 2 (bpf/events.h TP_VALUE)


@dataclass(slots=True)
class RequestHead:
    """What the first bytes of a request say."""

    method: str | None = None
    path: str | None = None
    version: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    complete: bool = False  # the whole header block was there
    error: str | None = None  # not a request line httptools accepts


class _Callbacks:
    __slots__ = ("complete", "headers", "url")

    def __init__(self) -> None:
        self.url = b""
        self.headers: dict[str, str] = {}
        self.complete = False

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        key = name.decode("latin-1").lower()
        if key in KEPT_HEADERS:
            self.headers[key] = value.decode("latin-1").strip()[:MAX_HEADER_VALUE]

    def on_headers_complete(self) -> None:
        self.complete = True


def parse_request_head(data: bytes) -> RequestHead:
    """Parse a request's first bytes; never raises."""
    cb = _Callbacks()
    parser = httptools.HttpRequestParser(cb)
    head = RequestHead()
    try:
        parser.feed_data(data)
    except httptools.HttpParserUpgrade:
        pass
    except Exception as exc:  # httptools is C: any surprise is a malformed head, never a crash
        head.error = type(exc).__name__
    line = data.split(b"\r\n", 1)[0]
    parts = line.split(b" ")
    if parts and parts[0].isalpha() and parts[0].isupper():
        head.method = parts[0].decode("ascii")
    if head.error is None:
        try:
            version = parser.get_http_version()
            head.version = version if version and version != "0.0" else None  # "0.0": not read yet
        except Exception:
            head.version = None
    target = cb.url.decode("latin-1") if cb.url else None
    if target is None and len(parts) >= 2 and head.error is None:  # the request line itself was cut
        target = parts[1].decode("latin-1")
    head.path = request_path(target) if target else None
    head.headers = cb.headers
    head.complete = cb.complete
    return head


def trace_context_headers(context: bytes) -> dict[str, str]:
    """The traceparent (and the tracestate line right after it, when whole) from the bytes the kernel kept
    from a request's traceparent value on (``EV_REQUEST_KEPT`` ``context``); empty when there is none."""
    if len(context) < TRACEPARENT_VALUE:
        return {}
    headers = {"traceparent": context[:TRACEPARENT_VALUE].decode("latin-1")}
    rest = context[TRACEPARENT_VALUE:]
    if rest.startswith(b"\r\n") and rest[2:13].lower() == b"tracestate:":
        end = rest.find(b"\r\n", 13)
        if end > 0:  # a line cut by the end of the bytes is not a value
            headers["tracestate"] = rest[13:end].decode("latin-1").strip()[:MAX_HEADER_VALUE]
    return headers

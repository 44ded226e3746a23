"""Protocol-neutral HTTP records: what the HTTP/1.x and HTTP/2 parsers hand to the rest of the pipeline.

:class:`HttpMessage` (one request or response as it crossed the socket) and :class:`HttpExchange` (a
request and its response) are the same whichever protocol carried them, so correlation and span building
never look at the protocol. :class:`IoChunk` is one syscall's captured bytes, as both parsers keep them.
Only the values of the headers in :data:`KEPT_HEADERS` are ever stored, cut at :data:`MAX_HEADER_VALUE`
characters; paths never keep their query (:func:`request_path`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

__all__ = [
    "KEPT_HEADERS", "MAX_HEADER_VALUE", "MAX_SYSCALL_BYTES", "HttpExchange", "HttpMessage", "IoChunk",
    "request_path",
]

#: Header names (lower case) whose values are kept. Everything else is dropped while parsing.
KEPT_HEADERS = frozenset({
    "traceparent", "tracestate", "b3", "x-b3-traceid", "x-b3-spanid", "x-b3-parentspanid", "x-b3-sampled",
    "x-request-id", "user-agent", "content-length", "transfer-encoding", "upgrade",
})
#: Longest header value (and path) kept, in characters; longer ones are cut.
MAX_HEADER_VALUE = 512
#: Linux moves at most this much in one read/write (MAX_RW_COUNT): a larger syscall size is not plausible.
MAX_SYSCALL_BYTES = 0x7FFFF000


@dataclass(slots=True)
class HttpMessage:
    """One request or response as it crossed the socket."""

    start_ns: int  # the syscall that carried its first byte
    end_ns: int | None = None  # the syscall that carried its last byte
    headers_done_ns: int | None = None
    method: str | None = None  # requests
    path: str | None = None  # requests: the target without query or fragment
    status: int | None = None  # responses
    version: str | None = None  # "1.0" / "1.1" / "2"
    headers: dict[str, str] = field(default_factory=dict)  # only KEPT_HEADERS
    body_bytes: int = 0
    upgrade: bool = False
    error: str | None = None
    records_lost: bool = False  # records of its connection were lost while it was in flight (not an error)
    capture_gap: bool = False  # bytes of its chunked body were not captured: its body size is unknown
    summary: bool = False  # known from the kernel's one record (request summaries): no body, no later bytes
    tid: int = 0  # thread that moved the first byte
    round: int = 0  # its event-loop round
    headers_round: int = 0  # the event-loop round in which the header block completed
    response: HttpMessage | None = None  # requests: the response that answered it, once complete


class IoChunk(NamedTuple):
    """One syscall's bytes as they were fed in (``total_len`` > len(data): the rest was not captured)."""

    ts_ns: int
    data: bytes
    total_len: int
    tid: int
    round: int


@dataclass(slots=True)
class HttpExchange:
    """A request and the response that answered it (None when it never came)."""

    request: HttpMessage
    response: HttpMessage | None


def request_path(target: str) -> str:
    """A request target without query or fragment; absolute-form (proxy requests) keeps the path part."""
    cut = min((i for i in (target.find("?"), target.find("#")) if i >= 0), default=len(target))
    path = target[:cut]
    if "://" in path:
        path = "/" + path.split("://", 1)[1].partition("/")[2]
    return path[:MAX_HEADER_VALUE]

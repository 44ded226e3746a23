"""A correlator harness and span checks shared by the correlator's and the connection spans' tests.

Each test tells a connection's story as the kernel reports it (tests/support/events.py builds the events);
:class:`Harness` feeds it to a ConnectionCorrelator and collects the ConnectionRecords it emits.
"""

from __future__ import annotations

import random
import ssl
from collections.abc import Iterable

import pytest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanKind

from otel_envoy.correlate.correlator import ConnectionCorrelator
from otel_envoy.correlate.records import ConnectionRecord
from otel_envoy.events.types import Event
from otel_envoy.spans.clock import MonotonicClock
from otel_envoy.spans.connection import ConnectionSpanBuilder
from tests.support.events import (
    LISTEN_FD,
    LPORT,
    TGID,
    C,
    accept,
    close,
    established,
    listen_sockets,
    read,
    state,
    write,
)
from tests.support.sdk_oracle import readable_connection_spans

__all__ = ["CLOSE_WAIT", "ESTABLISHED", "FIN_WAIT1", "LINGER", "OFFSET", "REQUEST", "RESOURCE", "RESPONSE",
           "SYN_RECV", "TCP_CLOSE", "Harness", "assert_shape", "build", "by_name", "client_hello",
           "plain_story"]

LINGER = 1_000
OFFSET = 1_700_000_000_000_000_000  # wall - monotonic of the fixed test clock
RESOURCE = Resource.create({"service.name": "envoy-test"})
REQUEST = b"GET / HTTP/1.1\r\nHost: lab\r\nUser-Agent: curl\r\nAccept: */*\r\n\r\n"
RESPONSE = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
ESTABLISHED, CLOSE_WAIT, FIN_WAIT1 = C["TCP_ESTABLISHED"], C["TCP_CLOSE_WAIT"], C["TCP_FIN_WAIT1"]
TCP_CLOSE, SYN_RECV = C["TCP_CLOSE"], C["TCP_SYN_RECV"]


class Harness:
    """A correlator with one Envoy (TGID) listening on 0.0.0.0:LPORT (listener "plain_http")."""

    def __init__(self, **kwargs: int) -> None:
        self.out: list[ConnectionRecord] = []
        kwargs.setdefault("linger_ns", LINGER)
        self.c = ConnectionCorrelator(self.out.append, **kwargs)
        self.c.set_listen_sockets(listen_sockets((TGID, LISTEN_FD, "0.0.0.0", LPORT, None)))
        self.c.set_listener_names({("0.0.0.0", LPORT): "plain_http"})

    def feed(self, events: Iterable[Event]) -> Harness:
        for ev in events:
            self.c.handle(ev)
        return self

    def drain(self) -> list[ConnectionRecord]:
        """Let the linger of every closed connection pass (in event time) and return what was emitted."""
        self.c.expire(self.c.latest_ns + LINGER)
        return self.out

    def only(self) -> ConnectionRecord:
        out = self.drain()
        assert len(out) == 1, out
        return out[0]


def plain_story(fd: int = 30, pport: int = 40000, t0: int = 1_000) -> list[Event]:
    """ESTABLISHED -> accept -> read -> write -> CLOSE_WAIT -> EOF -> close, whose record carries the fd's
    epoll ADD (before the read) and its socket option (IPPROTO_TCP, TCP_NODELAY)."""
    return [
        established(t0, pport),
        accept(t0 + 1_000, fd, pport),
        read(t0 + 3_000, fd, REQUEST),
        write(t0 + 4_000, fd, RESPONSE),
        state(t0 + 5_000, pport, ESTABLISHED, CLOSE_WAIT),
        read(t0 + 6_000, fd, b""),
        close(t0 + 7_000, fd, rx=len(REQUEST), tx=len(RESPONSE), epoll_adds=(t0 + 2_000,),
              sockopts=((6, 1, 1),)),
    ]


def client_hello(sni: str = "a.example.com") -> bytes:
    """A real ClientHello (TLS 1.3 capable, ALPN h2/http1.1) from Python's ssl module."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=sni)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


def build(r: ConnectionRecord) -> list[ReadableSpan]:
    builder = ConnectionSpanBuilder(RESOURCE, MonotonicClock(OFFSET), rng=random.Random(7))
    return readable_connection_spans(builder, r)


def by_name(spans: list[ReadableSpan]) -> dict[str, ReadableSpan]:
    out = {s.name: s for s in spans}
    assert len(out) == len(spans), [s.name for s in spans]
    return out


def assert_shape(spans: list[ReadableSpan]) -> ReadableSpan:
    """Root first, every other span a child of it, inside its interval, all in one trace and resource."""
    root = spans[0]
    assert root.name == "envoy.downstream.connection" and root.parent is None
    assert root.kind == SpanKind.SERVER
    assert len({s.context.span_id for s in spans}) == len(spans)
    for s in spans:
        assert s.resource is RESOURCE
        assert s.context.trace_id == root.context.trace_id
        assert s.context.trace_flags.sampled
        assert s.start_time <= s.end_time
        if s is not root:
            assert s.parent is not None and s.parent.span_id == root.context.span_id
            assert s.kind == SpanKind.INTERNAL
            assert root.start_time <= s.start_time <= s.end_time <= root.end_time, s.name
    return root

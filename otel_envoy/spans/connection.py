"""ConnectionRecord -> the spans of one downstream connection's trace.

Trace shape (a contract users and later features rely on):
  envoy.downstream.connection (SERVER, TCP handshake done -> close)
    tcp.accept_queue        (ESTABLISHED -> accept returned to Envoy)
    envoy.listener_filters  (accept -> hand-off to the filter chain)
    tls.handshake           (ClientHello observed -> handshake complete), TLS connections only
"""

from __future__ import annotations

import random
import socket

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, TraceFlags
from opentelemetry.trace.status import Status, StatusCode

from .. import __version__
from ..correlate.addresses import network_type
from ..correlate.model import ConnectionRecord
from .clock import MonotonicClock

__all__ = ["SCOPE", "ConnectionSpanBuilder"]

SCOPE = InstrumentationScope("otel-envoy", __version__)
_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
_OK = Status(StatusCode.UNSET)
_SOCKOPT_NAMES = {
    (socket.IPPROTO_TCP, socket.TCP_NODELAY): "TCP_NODELAY",
    (socket.SOL_SOCKET, socket.SO_KEEPALIVE): "SO_KEEPALIVE",
}


class ConnectionSpanBuilder:
    """Builds finished spans for connection records (one shared Resource; ids from a fast PRNG)."""

    def __init__(
        self, resource: Resource, clock: MonotonicClock, *, rng: random.Random | None = None
    ) -> None:
        self.resource = resource
        self.clock = clock
        self._bits = (rng or random.Random()).getrandbits

    def _span(
        self,
        name: str,
        trace_id: int,
        parent: SpanContext | None,
        start: int,
        end: int,
        attributes: dict,
        kind: SpanKind = SpanKind.INTERNAL,
        events: list[Event] | None = None,
        status: Status = _OK,
    ) -> ReadableSpan:
        ctx = SpanContext(trace_id, self._bits(64) or 1, is_remote=False, trace_flags=_SAMPLED)
        return ReadableSpan(
            name=name,
            context=ctx,
            parent=parent,
            resource=self.resource,
            attributes=attributes,
            events=events or (),
            kind=kind,
            status=status,
            start_time=self.clock.to_wall(start),
            end_time=self.clock.to_wall(max(end, start)),
            instrumentation_scope=SCOPE,
        )

    def build(self, conn: ConnectionRecord) -> list[ReadableSpan]:
        """Return the root span first, then its children (all inside the root's interval)."""
        start = conn.start_ns
        end = conn.close_ns if conn.close_ns is not None else start
        if not conn.still_open and conn.tcp_marks:  # a reset sent by the close itself ends the connection
            end = max(end, max(m.ts_ns for m in conn.tcp_marks))
        synacks = [m.ts_ns for m in conn.tcp_marks if m.name == "tcp.synack_retransmit"]
        if synacks:  # the handshake was already under way when the kernel retransmitted its SYN-ACK
            start = min(start, min(synacks))
        trace_id = self._bits(128) or 1
        attrs: dict[str, object] = {
            "network.transport": "tcp",
            "network.peer.address": conn.peer_address,
            "network.peer.port": conn.peer_port,
            "network.local.port": conn.local_port,
            "process.pid": conn.tgid,
            "thread.id": conn.tid,
            "thread.name": conn.thread_name,
            "envoy.connection.fd": conn.fd,
            "envoy.connection.bytes_received": conn.bytes_received,
            "envoy.connection.bytes_sent": conn.bytes_sent,
        }
        if conn.peer_address:
            attrs["network.type"] = network_type(conn.peer_address)
        if conn.local_address:
            attrs["network.local.address"] = conn.local_address
        if conn.listener_name:
            attrs["envoy.listener.name"] = conn.listener_name
        initiator = conn.close_initiator()
        if initiator and not conn.still_open:
            attrs["envoy.connection.close_initiator"] = initiator
        if conn.still_open:
            attrs["envoy.connection.still_open"] = True
        if conn.partial:
            attrs["otel_envoy.partial"] = sorted(set(conn.partial))
        opts = [_SOCKOPT_NAMES.get((lvl, name), f"{lvl}/{name}") for lvl, name, _ in conn.socket_options]
        if opts:
            attrs["envoy.connection.socket_options"] = opts
        tls = conn.tls if conn.tls is not None and conn.tls.client_hello is not None else None
        if tls is not None and tls.client_hello.server_name:  # type: ignore[union-attr]
            attrs["tls.client.server_name"] = tls.client_hello.server_name  # type: ignore[union-attr]
        events = [
            Event(m.name, {"tcp.state": m.state} if m.state else None, self.clock.to_wall(m.ts_ns))
            for m in conn.tcp_marks
        ]
        status = _OK
        reset = conn.aborted()
        if reset:
            status = Status(StatusCode.ERROR, f"connection reset by {reset}")
        root = self._span(
            "envoy.downstream.connection", trace_id, None, start, end, attrs, SpanKind.SERVER, events, status
        )
        spans = [root]
        parent = root.context

        def clamp(t: int) -> int:
            return min(max(t, start), end) if not conn.still_open else max(t, start)

        if conn.established_ns is not None:
            qattrs: dict[str, object] = {}
            if conn.accept_queue_depth is not None:
                qattrs["tcp.accept_queue.depth"] = conn.accept_queue_depth
            if conn.accept_queue_depth_on_arrival is not None:
                qattrs["tcp.accept_queue.depth_on_arrival"] = conn.accept_queue_depth_on_arrival
            spans.append(
                self._span(
                    "tcp.accept_queue", trace_id, parent, conn.established_ns, clamp(conn.accept_ns), qattrs
                )
            )
        handoff = conn.handoff_ns
        lf_attrs: dict[str, object] = {
            "envoy.listener_filters.peeked_bytes": conn.peeked_bytes,
            "envoy.listener_filters.peeks": conn.peeks,
        }
        if handoff is None:
            lf_attrs["otel_envoy.partial"] = ["handoff_not_seen"]
            handoff = end
        spans.append(
            self._span(
                "envoy.listener_filters", trace_id, parent, clamp(conn.accept_ns), clamp(handoff), lf_attrs
            )
        )
        if tls is not None and tls.started_ns is not None:
            spans.append(self._tls_span(conn, trace_id, parent, clamp, end))
        return spans

    def _tls_span(
        self, conn: ConnectionRecord, trace_id: int, parent: SpanContext, clamp, end: int
    ) -> ReadableSpan:
        tls = conn.tls
        assert tls is not None and tls.started_ns is not None
        attrs = dict(tls.summary())
        status = _OK
        done = tls.completed_ns
        if done is None:
            done = end
            msg = tls.error or (
                "connection closed during the TLS handshake"
                if not conn.still_open
                else "handshake still in progress"
            )
            status = Status(StatusCode.ERROR, msg)
        elif tls.error:  # completed, but something in the records could not be parsed
            attrs["otel_envoy.tls.parse_error"] = tls.error
            status = Status(StatusCode.ERROR, tls.error)
        return self._span(
            "tls.handshake", trace_id, parent, clamp(tls.started_ns), clamp(done), attrs, status=status
        )

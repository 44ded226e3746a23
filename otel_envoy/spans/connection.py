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
from collections.abc import Collection, Mapping, Sequence

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.util.instrumentation import InstrumentationScope

from .. import __version__
from ..correlate.addresses import network_type
from ..correlate.records import ConnectionRecord
from ..envoy.process_resource import merged
from .clock import MonotonicClock
from .model import (
    SPAN_FLAGS_LOCAL,
    SPAN_KIND_INTERNAL,
    SPAN_KIND_SERVER,
    STATUS_CODE_ERROR,
    STATUS_CODE_UNSET,
    SharedAttributes,
    SpanRecord,
)

__all__ = ["SCOPE", "ConnectionSpanBuilder"]

SCOPE = InstrumentationScope("otel-envoy", __version__)
_ZERO_TRACE_ID, _ONE_TRACE_ID = "0" * 32, "0" * 31 + "1"
_ZERO_SPAN_ID, _ONE_SPAN_ID = "0" * 16, "0" * 15 + "1"
_REQUEST_LINK = {"otel_envoy.link": "request"}  # shared, read-only
#: A span's events or links when it has none: one shared empty tuple (encoders only read them), not two new
#: lists per span.
_NO_ITEMS: list = ()  # type: ignore[assignment]
#: Exited processes whose resource stays known (their last spans are built after the exit: connections
#: linger, startup records wait for quiet), oldest forgotten first.
RETIRED_PROCESSES = 256
_SOCKOPT_NAMES = {
    (socket.IPPROTO_TCP, socket.TCP_NODELAY): "TCP_NODELAY",
    (socket.SOL_SOCKET, socket.SO_KEEPALIVE): "SO_KEEPALIVE",
}


#: socket options (level, optname, value) -> their names, one tuple object per combination (the encoders
#: write each once)
_SOCKOPT_TUPLES: dict[tuple[tuple[int, int, int], ...], tuple[str, ...]] = {}


def _socket_option_names(options: Sequence[tuple[int, int, int]]) -> tuple[str, ...]:
    """The names of the socket options a connection's fd was given, as one shared tuple per combination."""
    key = options if type(options) is tuple else tuple(options)
    names = _SOCKOPT_TUPLES.get(key)
    if names is None:
        if len(_SOCKOPT_TUPLES) >= 256:
            _SOCKOPT_TUPLES.clear()
        names = _SOCKOPT_TUPLES[key] = tuple([_SOCKOPT_NAMES.get((lvl, name), f"{lvl}/{name}")
                                              for lvl, name, _ in key])
    return names


#: The child spans' attributes, shared read-only by the spans with the same values (the encoders write each
#: once): by value, emptied when full.
_SHARED_CHILD_ATTRS: dict[tuple, SharedAttributes] = {}
_SHARED_CHILD_ATTRS_MAX = 4096
_NO_ATTRS = SharedAttributes()


def _shared_child_attributes(key: tuple, attrs: dict[str, object]) -> SharedAttributes:
    if len(_SHARED_CHILD_ATTRS) >= _SHARED_CHILD_ATTRS_MAX:
        _SHARED_CHILD_ATTRS.clear()
    shared = _SHARED_CHILD_ATTRS[key] = SharedAttributes(attrs)
    return shared


def _queue_attributes(at_accept: int, on_arrival: int) -> SharedAttributes:
    """tcp.accept_queue's attributes."""
    key = ("q", at_accept, on_arrival)
    return _SHARED_CHILD_ATTRS.get(key) or _shared_child_attributes(
        key, {"tcp.accept_queue.depth": at_accept, "tcp.accept_queue.depth_on_arrival": on_arrival})


def _listener_filter_attributes(peeked_bytes: int, peeks: int, chain: dict[str, object],
                                handoff_missing: bool) -> SharedAttributes:
    """envoy.listener_filters' attributes (``chain``: the filter chain's, a few scalars)."""
    key = ("lf", peeked_bytes, peeks, handoff_missing, *chain.items())
    shared = _SHARED_CHILD_ATTRS.get(key)
    if shared is None:
        attrs: dict[str, object] = {"envoy.listener_filters.peeked_bytes": peeked_bytes,
                                    "envoy.listener_filters.peeks": peeks, **chain}
        if handoff_missing:
            attrs["otel_envoy.partial"] = ["handoff_not_seen"]
        shared = _shared_child_attributes(key, attrs)
    return shared


def _filter_chain_attributes(conn: ConnectionRecord) -> dict[str, object]:
    """envoy.filter_chain.*: the chain the connection was handed to, or why that could not be decided."""
    choice = conn.filter_chain
    if choice is None:
        return {}
    if not choice.inferred:
        return {"envoy.filter_chain.inferred": False, "envoy.filter_chain.not_inferred_reason": choice.reason}
    attrs: dict[str, object] = {"envoy.filter_chain.inferred": True}
    if choice.name is not None:
        attrs["envoy.filter_chain.name"] = choice.name
    else:
        attrs["envoy.filter_chain.no_match"] = True
    if choice.default:
        attrs["envoy.filter_chain.default"] = True
    return attrs


class ConnectionSpanBuilder:
    """Builds the finished spans of connection records (one Resource per process; ids from a fast PRNG).

    :meth:`build_records` is the hot path: plain :class:`SpanRecord` objects, which the export sinks
    encode directly. The spans of a process told of with :meth:`set_process_resource` carry its own
    resource (one dict per process, shared by all its spans); the others the daemon's. ``fixed_keys``:
    resource keys the daemon's operator set, which no process's value replaces.
    """

    def __init__(
        self, resource: Resource, clock: MonotonicClock, *, rng: random.Random | None = None,
        fixed_keys: Collection[str] = (),
    ) -> None:
        self.resource = resource
        self.clock = clock
        self._bits = (rng or random.Random()).getrandbits
        # Shared by every record (read-only): the encoders encode it once per batch, by identity.
        self._resource_attributes = dict(resource.attributes)
        # The trailing SpanRecord fields, the same for every span (shared with the request builder).
        self.span_tail = (
            self._resource_attributes,
            SCOPE.name,
            SCOPE.version or "",
            "",  # trace_state
            SPAN_FLAGS_LOCAL,
            resource.schema_url or "",
        )
        self._fixed_keys = frozenset(fixed_keys)
        #: tgid -> the span tail of that process's resource (read by the round worker's thread too)
        self.tails: dict[int, tuple] = {}
        self._retired: dict[int, None] = {}  # exited processes, oldest first

    def set_process_resource(self, pid: int, attributes: Mapping[str, object] | None) -> None:
        """Process ``pid``'s own resource attributes (envoy/process_resource.py), merged over the daemon's;
        None: it exited (its resource stays for its last spans, until RETIRED_PROCESSES more exited)."""
        if attributes is None:
            if pid in self.tails:
                self._retired[pid] = None
                while len(self._retired) > RETIRED_PROCESSES:
                    oldest = next(iter(self._retired))
                    del self._retired[oldest]
                    self.tails.pop(oldest, None)
            return
        self._retired.pop(pid, None)
        attrs = merged(self._resource_attributes, attributes, self._fixed_keys)
        known = self.tails.get(pid)
        if known is None or known[0] != attrs:  # the same resource keeps its dict (cached by identity)
            self.tails[pid] = (attrs, *self.span_tail[1:])

    def tail_for(self, tgid: int) -> tuple:
        """The trailing SpanRecord fields of process ``tgid``'s spans (its resource first)."""
        return self.tails.get(tgid, self.span_tail)

    def build_records(self, conn: ConnectionRecord) -> list[SpanRecord]:
        """Return the root span first, then its children (all inside the root's interval).

        Times are wall-clock ns; ids are lowercase hex.  All records of a process share one
        resource-attributes dict (read-only), which lets the encoders encode each resource once per batch.
        """
        offset = self.clock.offset_ns
        still_open = conn.still_open
        marks = conn.tcp.marks
        start = conn.start_ns
        end = conn.close_ns if conn.close_ns is not None else start
        if marks:
            if not still_open:  # a reset sent by the close itself ends the connection
                end = max(end, max(m.ts_ns for m in marks))
            synacks = [m.ts_ns for m in marks if m.name == "tcp.synack_retransmit"]
            if synacks:  # the handshake was already under way when the kernel retransmitted its SYN-ACK
                start = min(start, min(synacks))
        # One draw for the trace id and up to four span ids (all-zero ids are invalid: 1 instead).
        ids = f"{self._bits(384):096x}"
        trace_id = conn.trace_id or ids[:32]  # the correlator names them when requests need a parent
        if trace_id == _ZERO_TRACE_ID:
            trace_id = _ONE_TRACE_ID
        root_id = conn.span_id or ids[32:48]
        if root_id == _ZERO_SPAN_ID:
            root_id = _ONE_SPAN_ID
        peer = conn.peer_address
        attrs: dict[str, object] = {
            "network.transport": "tcp",
            "network.peer.address": peer,
            "network.peer.port": conn.peer_port,
            "network.local.port": conn.local_port,
            "process.pid": conn.tgid,
            "thread.id": conn.tid,
            "thread.name": conn.thread_name,
            "envoy.connection.fd": conn.fd,
            "envoy.connection.bytes_received": conn.traffic.bytes_received,
            "envoy.connection.bytes_sent": conn.traffic.bytes_sent,
        }
        if conn.kept:  # the sampler left it out; the kernel kept it at its close, for this
            attrs["otel_envoy.kept"] = conn.kept
        if conn.adopted:  # accepted before the daemon: by which thread is not known
            del attrs["thread.id"], attrs["thread.name"]
            attrs["envoy.connection.adopted"] = True
        if peer:
            attrs["network.type"] = network_type(peer)
        if conn.local_address:
            attrs["network.local.address"] = conn.local_address
        if conn.listener_name:
            attrs["envoy.listener.name"] = conn.listener_name
        chain = _filter_chain_attributes(conn)
        attrs.update(chain)
        if conn.end_reason:
            attrs["envoy.connection.end_reason"] = conn.end_reason
        if still_open:
            attrs["envoy.connection.still_open"] = True
        else:
            initiator = conn.close_initiator()
            if initiator:
                attrs["envoy.connection.close_initiator"] = initiator
        if conn.partial:
            attrs["otel_envoy.partial"] = sorted(set(conn.partial))
        if conn.socket_options:
            attrs["envoy.connection.socket_options"] = _socket_option_names(conn.socket_options)
        if conn.http.count:
            attrs["envoy.connection.requests"] = conn.http.count
        tls = conn.tls.handshake
        hello = tls.client_hello if tls is not None else None
        if hello is not None and hello.server_name:
            attrs["tls.client.server_name"] = hello.server_name
        records = conn.traffic.tls_records
        if records is not None:
            attrs["envoy.tls.records_received"] = records.received
            attrs["envoy.tls.records_sent"] = records.sent
            attrs["envoy.tls.application_data_records_received"] = records.application_data_received
            attrs["envoy.tls.application_data_records_sent"] = records.application_data_sent
            attrs["envoy.tls.max_record_size_received"] = records.max_received
            attrs["envoy.tls.max_record_size_sent"] = records.max_sent
            if records.received_lost or records.sent_lost:
                attrs["envoy.tls.record_framing_lost"] = [
                    side for side, lost in (("received", records.received_lost), ("sent", records.sent_lost))
                    if lost]
        reset = conn.aborted()
        tail = self.tails.get(conn.tgid, self.span_tail)
        spans = [
            SpanRecord(
                trace_id,
                root_id,
                None,
                "envoy.downstream.connection",
                SPAN_KIND_SERVER,
                start + offset,
                max(end, start) + offset,
                attrs,
                [(m.ts_ns + offset, m.name, {"tcp.state": m.state} if m.state else {}) for m in marks]
                if marks else _NO_ITEMS,
                [(t, sid, _REQUEST_LINK) for t, sid in conn.http.links] if conn.http.links else _NO_ITEMS,
                STATUS_CODE_ERROR if reset else STATUS_CODE_UNSET,
                f"connection reset by {reset}" if reset else "",
                *tail,
            )
        ]
        # Children: times clamped into the root's interval (only from below while still open).
        accept = max(conn.accept_ns, start) if still_open else min(max(conn.accept_ns, start), end)
        established = conn.tcp.established_ns
        if established is not None:
            depth = conn.accept_queue
            qattrs = _queue_attributes(depth.at_accept, depth.on_arrival) if depth is not None else _NO_ATTRS
            spans.append(
                SpanRecord(
                    trace_id,
                    ids[48:64],
                    root_id,
                    "tcp.accept_queue",
                    SPAN_KIND_INTERNAL,
                    established + offset,
                    max(accept, established) + offset,
                    qattrs,
                    _NO_ITEMS,
                    _NO_ITEMS,
                    STATUS_CODE_UNSET,
                    "",
                    *tail,
                )
            )
        if conn.adopted:  # accepted, its listener filters run and its handshakes done before the daemon
            return self._ids_checked(spans)
        handoff = conn.listener.handoff_ns
        lf_attrs = _listener_filter_attributes(conn.listener.peeked_bytes, conn.listener.peeks, chain,
                                               handoff is None)
        if handoff is None:
            handoff = end
        handoff = max(handoff, start) if still_open else min(max(handoff, start), end)
        spans.append(
            SpanRecord(
                trace_id,
                ids[64:80],
                root_id,
                "envoy.listener_filters",
                SPAN_KIND_INTERNAL,
                accept + offset,
                max(handoff, accept) + offset,
                lf_attrs,
                _NO_ITEMS,
                _NO_ITEMS,
                STATUS_CODE_UNSET,
                "",
                *tail,
            )
        )
        if hello is not None and tls.started_ns is not None:  # type: ignore[union-attr]
            spans.append(self._tls_span(conn, trace_id, ids[80:96], root_id, start, end, tail))
        return self._ids_checked(spans)

    @staticmethod
    def _ids_checked(spans: list[SpanRecord]) -> list[SpanRecord]:
        """``spans`` with no all-zero child span id (invalid in OTLP)."""
        for span in spans[1:]:
            if span.span_id == _ZERO_SPAN_ID:
                span.span_id = _ONE_SPAN_ID
        return spans

    def _tls_span(
        self, conn: ConnectionRecord, trace_id: str, span_id: str, parent_id: str, start: int, end: int,
        tail: tuple,
    ) -> SpanRecord:
        tls = conn.tls.handshake
        assert tls is not None and tls.started_ns is not None
        attrs = tls.summary()  # a new dict per call
        code, message = STATUS_CODE_UNSET, ""
        done = tls.completed_ns
        if done is None:
            done = end
            message = tls.error or (
                "connection closed during the TLS handshake"
                if not conn.still_open
                else "handshake still in progress"
            )
            code = STATUS_CODE_ERROR
        elif tls.error:  # completed, but something in the records could not be parsed
            attrs = {**attrs, "otel_envoy.tls.parse_error": tls.error}
            code, message = STATUS_CODE_ERROR, tls.error
        t0 = max(tls.started_ns, start)
        t1 = max(done, start)
        if not conn.still_open:
            t0, t1 = min(t0, end), min(t1, end)
        offset = self.clock.offset_ns
        return SpanRecord(
            trace_id,
            span_id,
            parent_id,
            "tls.handshake",
            SPAN_KIND_INTERNAL,
            t0 + offset,
            max(t1, t0) + offset,
            attrs,
            _NO_ITEMS,
            _NO_ITEMS,
            code,
            message,
            *tail,
        )

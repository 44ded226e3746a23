"""A connection the kernel kept at its close (bpf/conn_keep.bpf.h): the sampler left it out, so none of its
records was sent, then something went wrong with it (a failed or slow TLS handshake, a reset, a long wait in
the accept queue). Its one record says what its accept and its close would have said, and holds the bytes of
its ClientHello and of the server's hello flight; these helpers turn it back into those events.

A traced connection of a TLS listener sends the same record, not kept (``KEEP_CONN_SAMPLED``): at its
handshake's end (``KEPT_OPEN``: what its accept and its handshake's transfers would have said; it stays open
and is reported as any traced connection from there), or at its close when its handshake never ended."""

from __future__ import annotations

from ..events.layout import load_layout
from ..events.types import AcceptEvent, CloseEvent, ConnectionKeptEvent

__all__ = ["KEEP_CONN_SAMPLED", "KEPT_CONNECTION_REASONS", "KEPT_OPEN", "accept_of", "close_of",
           "kept_reason"]

_C = load_layout().constants
EV_ACCEPT, EV_CLOSE, ROLE_DOWNSTREAM = _C["EV_ACCEPT"], _C["EV_CLOSE"], _C["ROLE_DOWNSTREAM"]
#: the reason of a traced connection's handshake summary (not kept: sampled)
KEEP_CONN_SAMPLED: int = _C["KEEP_CONN_SAMPLED"]
#: close_flags: a handshake summary at the handshake's end; the connection stays open
KEPT_OPEN: int = _C["KEPT_OPEN"]

#: enum connection_keep_reason -> the kept span's ``otel_envoy.kept``
KEPT_CONNECTION_REASONS = {
    _C["KEEP_CONN_TLS_FAILED"]: "tls_handshake_failed",
    _C["KEEP_CONN_RESET"]: "reset",
    _C["KEEP_CONN_TLS_SLOW"]: "tls_handshake_slow",
    _C["KEEP_CONN_ACCEPT_SLOW"]: "accept_queue_slow",
}


def kept_reason(reason: int) -> str:
    """Why the kernel kept a connection (enum connection_keep_reason), as its span says it; "" for a
    traced one (``KEEP_CONN_SAMPLED``)."""
    if reason == KEEP_CONN_SAMPLED:
        return ""
    return KEPT_CONNECTION_REASONS.get(reason, f"reason_{reason}")


_NO_ADDRESS = bytes(16)


def accept_of(ev: ConnectionKeptEvent) -> AcceptEvent:
    """The accept record it did not send (its thread: the one that closed it, the worker that owns it). Its
    handshake's completion is not on it: the kept record comes at the close, out of the accepts' order that
    the accept-queue depths are counted in; :meth:`DownstreamConnections.on_connection_kept` sets it."""
    return AcceptEvent(ev.open_ts_ns, EV_ACCEPT, ev.tgid, ev.tid, 0, ev.fd, ev.listen_fd, ev.family,
                       ev.peer_port, 0, ev.peer_addr, ev.comm, 0, _NO_ADDRESS)


def close_of(ev: ConnectionKeptEvent) -> CloseEvent:
    """The close record it did not send."""
    return CloseEvent(
        ev.ts_ns, EV_CLOSE, ev.tgid, ev.tid, 0, ev.fd, ROLE_DOWNSTREAM, ev.open_ts_ns, ev.bytes_rx,
        ev.bytes_tx, ev.reads, ev.writes, ev.tls_records_rx, ev.tls_records_tx, ev.tls_app_records_rx,
        ev.tls_app_records_tx, ev.tls_max_record_rx, ev.tls_max_record_tx, ev.tls_flags, 0, 0,
        ev.epoll_first_add_ns, ev.epoll_second_add_ns, ev.epoll_adds, ev.sockopt_count, ev.sockopts, 0, 0)

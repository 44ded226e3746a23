"""What the correlator knows about Envoy's upstream connections. Times are kernel monotonic ns.

An upstream connection is one Envoy opened (connect). Its requests are attributed to the downstream
request that caused them (:mod:`.attribution`); what that found is kept in :class:`UpstreamCause`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

from ..protocols.http1 import Http1Exchanges
from ..protocols.http2 import Http2Exchanges
from .downstream_model import ConnectionRecord, RequestRecord, TcpTimeline, Traffic

__all__ = ["TcpConnect", "UnpairedRequest", "UpstreamCause", "UpstreamHttp", "UpstreamRecord"]


@dataclass(slots=True)
class TcpConnect:
    """Envoy's connect() and the active open it started."""

    ns: int  # connect() returned
    ret: int  # 0 or -errno (-EINPROGRESS for a non-blocking connect)
    span_id: str  # of the tcp.connect span
    sock: int = 0  # kernel socket address (ties TCP events to it); 0: SYN_SENT not seen
    syn_sent_ns: int | None = None
    failed_ns: int | None = None  # SYN_SENT -> CLOSE, or connect() refused: the connect failed


class UnpairedRequest(NamedTuple):
    """Where the span of an upstream request goes when no downstream request was found for it."""

    trace_id: str
    span_id: str
    parent_span_id: str | None  # the TLS downstream connection whose read caused it; None: a trace of its own
    attribution: str  # how that connection was found ("" without one)


@dataclass(slots=True)
class UpstreamHttp:
    """HTTP that Envoy spoke on the connection (when its first write was a request)."""

    parser: Http1Exchanges | Http2Exchanges | None = None
    not_http: bool = False  # TLS, a server-first protocol, or HTTP parsing off
    requests: int = 0  # requests Envoy wrote


@dataclass(slots=True)
class UpstreamCause:
    """Why Envoy opened the connection, and where its requests were attributed."""

    request: RequestRecord | None = None  # the downstream request that made Envoy connect
    conn: ConnectionRecord | None = None  # else: the TLS downstream connection read in that round
    request_used: bool = False  # the first request was attributed (to ``request`` or elsewhere)
    conn_used: bool = False  # the first request went to ``conn`` (or elsewhere)
    # requests no downstream request was found for: id(request msg) -> where their spans go
    unpaired: dict[int, UnpairedRequest] = field(default_factory=dict)
    tls_conns: dict[int, ConnectionRecord] = field(default_factory=dict)  # id(request msg) -> TLS downstream


@dataclass(slots=True)
class UpstreamRecord:
    """One connection a target opened (connect) to an upstream."""

    tgid: int
    fd: int
    tid: int
    thread_name: str
    peer_address: str
    peer_port: int
    trace_id: str
    span_id: str
    connect: TcpConnect
    local_address: str | None = None
    local_port: int = 0
    close_ns: int | None = None
    still_open: bool = False
    tcp: TcpTimeline = field(default_factory=TcpTimeline)
    traffic: Traffic = field(default_factory=Traffic)
    http: UpstreamHttp = field(default_factory=UpstreamHttp)
    cause: UpstreamCause = field(default_factory=UpstreamCause)

    @property
    def end_ns(self) -> int:
        """Close, or the connect when nothing later was seen."""
        return self.close_ns if self.close_ns is not None else self.connect.ns

    def close_initiator(self) -> str | None:
        """'peer' (the upstream) or 'envoy': who ended the connection first (FIN, EOF, or reset)."""
        return self.tcp.close_initiator(closed=self.close_ns is not None)

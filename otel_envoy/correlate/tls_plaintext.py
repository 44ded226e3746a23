"""TLS plaintext from the uprobe tier: exact requests on TLS downstream connections.

With symbols (bpf/uprobes.bpf.h), what SSL_read returned and SSL_write took on a connection arrives as EV_DATA
records flagged DATA_FLAG_TLS_PLAINTEXT, beside the connection's own (ciphertext) syscall records. They go to
an HTTP parser of their own, chosen from the first plaintext read as on a plaintext connection, so the
connection's requests become request spans with their method, path and status, marked
``otel_envoy.request_source`` = ``uprobe``; the ciphertext records keep feeding the TLS handshake tracker
and the record counts as before. The syscall records' sequence (``msg_seq``) is not theirs: a plaintext
record never counts as a lost one.
"""

from __future__ import annotations

from collections import Counter

from ..events.layout import load_layout
from ..events.types import DataEvent
from .downstream import DownstreamConnections
from .downstream_requests import DownstreamRequests
from .http_feed import downstream_parser

__all__ = ["DATA_FLAG_TLS_PLAINTEXT", "SOURCE_UPROBE", "TlsPlaintext"]

_C = load_layout().constants
DATA_FLAG_TLS_PLAINTEXT = _C["DATA_FLAG_TLS_PLAINTEXT"]
DIR_READ, ROLE_DOWNSTREAM = _C["DIR_READ"], _C["ROLE_DOWNSTREAM"]
SOURCE_UPROBE = "uprobe"  # ConnectionHttp.source, and the spans' otel_envoy.request_source


class TlsPlaintext:
    """Routes plaintext records to their downstream connection's HTTP parser."""

    def __init__(self, downstream: DownstreamConnections, requests: DownstreamRequests, stats: Counter[str],
                 *, http: bool = True) -> None:
        self.downstream = downstream
        self.requests = requests
        self.stats = stats
        self.http = http

    def on_data(self, ev: DataEvent) -> None:
        """One plaintext record (SSL_read's result, or what SSL_write took)."""
        if ev.role != ROLE_DOWNSTREAM:  # Envoy's TLS to upstreams: not parsed yet
            self.stats["tls_plaintext_upstream_ignored"] += 1
            return
        conn = self.downstream.open.get((ev.tgid, ev.fd))
        if conn is None:
            self.stats["tls_plaintext_without_connection"] += 1
            return
        if not self.http or ev.ret <= 0:
            return
        http = conn.http
        if http.source != SOURCE_UPROBE:
            if http.parser is not None:  # parsed from the syscalls' bytes already: not a TLS connection
                self.stats["tls_plaintext_on_plaintext_connection"] += 1
                return
            if ev.direction != DIR_READ:  # a response before any request was seen: wait for the next one
                return
            http.parser = downstream_parser(ev.data)
            http.source = SOURCE_UPROBE
        self.stats["tls_plaintext_records"] += 1
        self.requests.on_data(conn, ev)

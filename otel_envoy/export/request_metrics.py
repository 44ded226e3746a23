"""``http.server.request.duration`` and ``envoy.downstream.connection.duration`` from the kernel's exact
request and connection metrics.

The kernel counts every plaintext HTTP/1.x downstream request, sampled or not (bpf/http_metrics.bpf.h),
in one series per process, listening socket, method and status code, with a count, a sum and a log2
histogram of microseconds. Each collection reads the table once and turns every series into a point of the
OpenTelemetry semantic conventions' server request duration histogram (unit ``s``), with attributes:

* ``http.request.method`` (``_OTHER`` for other tokens) and ``http.response.status_code`` (left out for a
  request whose connection closed before an answer; those carry ``error.type=connection_closed``);
* ``network.protocol.name=http``, ``server.address`` / ``server.port`` of the listening socket, and
  ``envoy.listener.name`` when Envoy's admin API named it, ``process.pid``.

Every downstream connection that closed, traced or not, is counted the same way by listening socket and
how it ended (bpf/http_metrics.bpf.h, ``conn_metrics``): :class:`ConnectionMetrics` exports their
durations (accept to close) as ``envoy.downstream.connection.duration`` with ``server.address``,
``server.port``, ``envoy.listener.name``, ``process.pid`` and ``envoy.connection.close_reason``, from what
Envoy's reads and writes on it returned before it closed the fd: ``reset`` when one failed with
ECONNRESET, EPIPE or ETIMEDOUT (also ``error.type=connection_reset``), else ``peer_closed`` when a read
returned EOF (the peer's FIN), else ``envoy_closed`` (e.g. after answering ``Connection: close``).

Every accepted downstream connection whose handshake completion the kernel saw is counted by listening
socket with its accept-queue wait (ESTABLISHED to Envoy's accept; ``accept_metrics``):
:class:`AcceptQueueMetrics` exports ``envoy.downstream.accept_queue.duration``, the metric of the
``tcp.accept_queue`` spans, with the listener's attributes.

Every downstream TLS handshake, traced or not, is counted by listening socket, the version and resumption
its ServerHello chose, and how it ended (bpf/tls_metrics.bpf.h, ``tls_metrics``): :class:`TlsHandshakeMetrics`
exports ``envoy.downstream.tls.handshake.duration`` (the ClientHello's arrival to the end of the server's
side of the handshake) with the listener's attributes, ``tls.protocol.name=tls``, ``tls.protocol.version``
(``1.3``, ``1.2``, ...; left out when the connection closed before the ServerHello), ``tls.resumed``, and
``error.type=closed_during_handshake`` for a handshake the connection's close cut short.

A series whose listening socket is not known (yet) is reported with ``server.port`` left out rather than
dropped: counts stay exact. Buckets are the kernel's log2 slots (:mod:`.kernel_histograms`); the sum is
exact.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Protocol

from opentelemetry.sdk.metrics.export import AggregationTemporality, Histogram, Metric

from ..envoy.listen_socket import ListenSocket
from ..events.layout import load_layout
from ..probes.loader import RequestSeries, RequestTotals, TlsSeries
from ..protocols.tls.names import tls_version_name
from .kernel_histograms import HistogramPoints, log2_bounds_s, slot_bucket_counts

__all__ = ["ACCEPT_QUEUE_DURATION", "CONNECTION_DURATION", "HTTP_SERVER_REQUEST_DURATION", "REQUEST_BOUNDS_S",
           "TLS_HANDSHAKE_DURATION", "AcceptQueueMetrics", "ConnectionMetrics", "KernelHistogram",
           "KernelMetric", "RequestMetrics", "TlsHandshakeMetrics", "connection_attributes",
           "listener_attributes", "request_attributes", "tls_attributes"]

HTTP_SERVER_REQUEST_DURATION = "http.server.request.duration"
CONNECTION_DURATION = "envoy.downstream.connection.duration"
ACCEPT_QUEUE_DURATION = "envoy.downstream.accept_queue.duration"
TLS_HANDSHAKE_DURATION = "envoy.downstream.tls.handshake.duration"
#: The kernel's slots (HTTP_HIST_SLOTS in bpf/events.h): the last one also takes longer durations.
REQUEST_SLOTS = load_layout().constants["HTTP_HIST_SLOTS"] - 1
REQUEST_BOUNDS_S: tuple[float, ...] = log2_bounds_s(REQUEST_SLOTS)

class KernelMetric(Protocol):
    """A metric built from a kernel table at each collection (:class:`RequestMetrics`,
    :class:`ConnectionMetrics`)."""

    def metric(self, temporality: AggregationTemporality) -> Metric | None:
        """This collection's metric, or ``None``."""
        ...


ListenerSource = Callable[[], Mapping[tuple[int, int], ListenSocket]]


def listener_attributes(pid: int, listen: ListenSocket | None) -> dict[str, Any]:
    """The attributes naming a listening socket of process ``pid``."""
    attrs: dict[str, Any] = {"process.pid": pid}
    if listen is not None:
        attrs["server.address"] = listen.address
        attrs["server.port"] = listen.port
        if listen.listener_name:
            attrs["envoy.listener.name"] = listen.listener_name
    return attrs


def request_attributes(series: RequestSeries, listen: ListenSocket | None) -> dict[str, Any]:
    """The attributes of one kernel request series."""
    attrs: dict[str, Any] = {"http.request.method": series.method, "network.protocol.name": "http",
                             **listener_attributes(series.pid, listen)}
    if series.status:
        attrs["http.response.status_code"] = series.status
    else:
        attrs["error.type"] = "connection_closed"
    return attrs


def connection_attributes(pid: int, listen: ListenSocket | None, close_reason: str) -> dict[str, Any]:
    """The attributes of one kernel connection series: its listener and how it ended
    (``envoy.connection.close_reason``: ``peer_closed``, ``reset`` or ``envoy_closed``,
    ``ConnectionProbes.connection_metrics``); a reset also sets ``error.type``."""
    attrs = listener_attributes(pid, listen)
    attrs["envoy.connection.close_reason"] = close_reason
    if close_reason == "reset":
        attrs["error.type"] = "connection_reset"
    return attrs


def tls_attributes(series: TlsSeries, listen: ListenSocket | None) -> dict[str, Any]:
    """The attributes of one kernel TLS handshake series."""
    attrs: dict[str, Any] = {**listener_attributes(series.pid, listen), "tls.protocol.name": "tls",
                             "tls.resumed": series.resumed}
    if series.version:
        attrs["tls.protocol.version"] = tls_version_name(series.version)
    if series.outcome != "done":
        attrs["error.type"] = "closed_during_handshake"
    return attrs


class KernelHistogram:
    """A histogram built at each collection from one kernel table: a point per series, its attributes from
    the series' key and its listening socket (:meth:`attributes`), series with equal attributes merged."""

    NAME: ClassVar[str]
    DESCRIPTION: ClassVar[str]

    def __init__(self, source: Callable[[], Mapping[Any, RequestTotals]], listeners: ListenerSource) -> None:
        """``source`` reads the kernel's series (a ``ConnectionProbes`` method); ``listeners`` maps (pid,
        listening fd) to the socket (the correlator's, replaced whole on each rescan)."""
        self._source = source
        self._listeners = listeners
        self._points = HistogramPoints(time.time_ns())

    def attributes(self, key: Any, listeners: Mapping[tuple[int, int], ListenSocket]) -> dict[str, Any]:
        """The attributes of the series ``key``."""
        raise NotImplementedError

    def metric(self, temporality: AggregationTemporality) -> Metric | None:
        """This collection's histogram, or ``None`` when there is no point to send."""
        listeners = self._listeners()
        series = [(self.attributes(key, listeners), totals) for key, totals in self._source().items()]
        return _histogram(self._points, series, temporality, self.NAME, self.DESCRIPTION)


class RequestMetrics(KernelHistogram):
    """``http.server.request.duration`` (``ConnectionProbes.http_request_metrics``)."""

    NAME = HTTP_SERVER_REQUEST_DURATION
    DESCRIPTION = ("Duration of HTTP server requests (plaintext HTTP/1.x, every request, counted in the "
                   "kernel): first read of the request to the first bytes of its response.")

    def attributes(self, key: RequestSeries, listeners: Mapping[tuple[int, int], ListenSocket]
                   ) -> dict[str, Any]:
        """See :func:`request_attributes`."""
        return request_attributes(key, listeners.get((key.pid, key.listen_fd)))


class ConnectionMetrics(KernelHistogram):
    """``envoy.downstream.connection.duration`` (``ConnectionProbes.connection_metrics``)."""

    NAME = CONNECTION_DURATION
    DESCRIPTION = ("Duration of downstream connections (every one, traced or not, counted in the kernel): "
                   "accept to close.")

    def attributes(self, key: tuple[int, int, str], listeners: Mapping[tuple[int, int], ListenSocket]
                   ) -> dict[str, Any]:
        """See :func:`connection_attributes`."""
        pid, fd, reason = key
        return connection_attributes(pid, listeners.get((pid, fd)), reason)


class AcceptQueueMetrics(KernelHistogram):
    """``envoy.downstream.accept_queue.duration`` (``ConnectionProbes.accept_queue_metrics``)."""

    NAME = ACCEPT_QUEUE_DURATION
    DESCRIPTION = ("Time downstream connections waited in the listener's accept queue (every one whose "
                   "handshake completion was seen, counted in the kernel): ESTABLISHED to Envoy's accept.")

    def attributes(self, key: tuple[int, int], listeners: Mapping[tuple[int, int], ListenSocket]
                   ) -> dict[str, Any]:
        """See :func:`listener_attributes`."""
        return listener_attributes(key[0], listeners.get(key))


class TlsHandshakeMetrics(KernelHistogram):
    """``envoy.downstream.tls.handshake.duration`` (``ConnectionProbes.tls_handshake_metrics``)."""

    NAME = TLS_HANDSHAKE_DURATION
    DESCRIPTION = ("Duration of downstream TLS handshakes (every one, traced or not, counted in the kernel): "
                   "the ClientHello's arrival to the end of the server's side.")

    def attributes(self, key: TlsSeries, listeners: Mapping[tuple[int, int], ListenSocket]) -> dict[str, Any]:
        """See :func:`tls_attributes`."""
        return tls_attributes(key, listeners.get((key.pid, key.listen_fd)))


def _histogram(points: HistogramPoints, series: list[tuple[dict[str, Any], RequestTotals]],
               temporality: AggregationTemporality, name: str, description: str) -> Metric | None:
    """One histogram metric of kernel series; series with equal attributes (two sockets of one listener,
    SO_REUSEPORT workers) are merged."""
    now = time.time_ns()
    merged: dict[tuple, tuple[dict[str, Any], list[int], int]] = {}
    for attrs, totals in series:
        ident = tuple(sorted(attrs.items()))
        counts = slot_bucket_counts(totals.slots, REQUEST_SLOTS)
        if ident in merged:
            _attrs, prev, total = merged[ident]
            merged[ident] = (attrs, [a + b for a, b in zip(prev, counts, strict=True)], total + totals.sum_ns)
        else:
            merged[ident] = (attrs, counts, totals.sum_ns)
    out = []
    for ident, (attrs, counts, sum_ns) in sorted(merged.items(), key=lambda kv: repr(kv[0])):
        point = points.point(ident, attrs, counts, sum_ns / 1e9, REQUEST_BOUNDS_S, now, temporality)
        if point is not None:
            out.append(point)
    if not out:
        return None
    return Metric(name=name, unit="s", description=description,
                  data=Histogram(data_points=out, aggregation_temporality=temporality))

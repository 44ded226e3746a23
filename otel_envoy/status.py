"""The daemon's HTTP endpoint (``--listen``, localhost by default): ``/healthz``, ``/metrics`` (Prometheus
text) and ``/targets``.

It reads the running daemon through :class:`StatusSources` (plain callables, each safe to call from the
event loop's thread while the ring thread works), so it knows nothing of how the daemon is built:

* ``/healthz``: 200 ``{"status": "ok", ...}`` while the probes are attached, the ring thread is alive and
  has made a pass within :data:`RING_STALL_S`; else 503 with the reasons. A ring that stops draining (its
  thread blocked: a recording on a full disk or pipe, a stuck export would not do it: the queues between
  are bounded and never block) turns it unhealthy. The exporters' state is reported, not judged: an OTLP
  endpoint that is down is the collector's problem, not a reason to restart the daemon.
* ``/metrics``: the daemon's own counters (records submitted by the kernel and read, drops by stage, spans
  built and exported, the export queue, its CPU) and the request and connection metrics the kernel counts.
* ``/targets``: what is traced and why, and what the kernel's tables hold of each process.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

__all__ = ["RING_STALL_S", "StatusError", "StatusServer", "StatusSources", "parse_listen"]

log = logging.getLogger("otel_envoy.status")

#: The ring thread makes a pass at least every ~0.1 s (its poll's timeout); this long without one is a stall.
RING_STALL_S = 5.0
DEFAULT_HOST = "127.0.0.1"


class StatusError(ValueError):
    """A bad ``--listen`` value, or the address cannot be bound (message is one line)."""


def parse_listen(value: str) -> tuple[str, int]:
    """``[HOST:]PORT`` (HOST an IP address, ``[v6]`` bracketed; localhost when left out) -> (host, port)."""
    host, sep, port_text = value.rpartition(":")
    if not sep:
        host, port_text = DEFAULT_HOST, value
    host = host.strip("[]") or DEFAULT_HOST
    if host == "localhost":
        host = DEFAULT_HOST
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise StatusError(f"--listen {value}: {host!r} is not an IP address") from None
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise StatusError(f"--listen {value}: the port must be 1-65535")
    return host, int(port_text)


@dataclass(slots=True)
class StatusSources:
    """How the endpoint reads the daemon. Counts are cumulative since the daemon started."""

    probes_attached: Callable[[], bool]
    ring_alive: Callable[[], bool]
    ring_last_pass: Callable[[], float]  # time.monotonic() of the ring thread's last pass
    records_submitted: Callable[[], int]  # by the kernel
    records_received: Callable[[], int]  # by user space
    drops: Callable[[], Mapping[str, int]]  # by stage ("kernel.ringbuf_full", "export.queue_full", ...)
    counts: Callable[[], Mapping[str, int]]  # events, connections, requests, spans, ...
    export: Callable[[], Mapping[str, Any]]  # SpanPipeline.stats()
    targets: Callable[[], dict[str, Any]]  # what is traced and why (blocking: run in a thread)
    requests: Callable[[], Mapping[Any, Any]]  # RequestSeries -> RequestTotals (the kernel's)
    accepts: Callable[[], Mapping[tuple[int, int, str, int], int]]  # (pid, tid, thread, listen fd) -> n
    listener_of: Callable[[int, int], tuple[int | None, str | None]]  # (pid, listen fd) -> (port, name)

    def counters(self) -> dict[str, list[tuple[float, dict[str, str]]]]:
        """The daemon's own counters as the OTLP metrics take them (export/metrics.py DAEMON_COUNTERS)."""
        return {
            "otel_envoy.records": [(self.records_submitted(), {"otel_envoy.stage": "submitted"}),
                                   (self.records_received(), {"otel_envoy.stage": "received"})],
            "otel_envoy.drops": [(n, {"otel_envoy.drop.stage": stage})
                                 for stage, n in sorted(self.drops().items())],
            "otel_envoy.spans.exported": [(n, {"otel_envoy.sink": sink})
                                          for sink, n in sorted(self.export().get("exported", {}).items())],
            "otel_envoy.cpu.time": [(time.process_time(), {})],
        }

    def health(self, now: float | None = None) -> tuple[bool, dict[str, Any]]:
        """(healthy, what /healthz says)."""
        now = time.monotonic() if now is None else now
        age = now - self.ring_last_pass()
        submitted, received = self.records_submitted(), self.records_received()
        reasons = []
        if not self.probes_attached():
            reasons.append("probes not attached")
        if not self.ring_alive():
            reasons.append("ring thread not running")
        elif age > RING_STALL_S:
            reasons.append(f"ring not drained for {age:.1f} s")
        export = self.export()
        body = {
            "status": "unhealthy" if reasons else "ok",
            "reasons": reasons,
            "ring": {"last_pass_age_s": round(age, 3), "records_submitted": submitted,
                     "records_received": received, "backlog": max(submitted - received, 0)},
            "exporter": {"queue_depth": export.get("queue_depth", 0), "exported": export.get("exported", {}),
                         "drops": export.get("drops", {})},
        }
        return not reasons, body


class _Collector:
    """The daemon's counters and the kernel's request metrics as Prometheus metric families."""

    def __init__(self, sources: StatusSources) -> None:
        self.sources = sources

    def collect(self) -> Iterable[Any]:
        s = self.sources
        yield CounterMetricFamily("otel_envoy_records_submitted", "records the kernel put in the ring",
                                  value=s.records_submitted())
        yield CounterMetricFamily("otel_envoy_records_received", "records the daemon read from the ring",
                                  value=s.records_received())
        drops = CounterMetricFamily("otel_envoy_drops", "what was lost, by stage", labels=["stage"])
        for stage, n in sorted(s.drops().items()):
            drops.add_metric([stage], n)
        yield drops
        counts = CounterMetricFamily("otel_envoy_pipeline", "events decoded, records and spans built",
                                     labels=["what"])
        for what, n in sorted(s.counts().items()):
            counts.add_metric([what], n)
        yield counts
        export = s.export()
        exported = CounterMetricFamily("otel_envoy_spans_exported", "spans sent, by sink", labels=["sink"])
        for sink, n in sorted(export.get("exported", {}).items()):
            exported.add_metric([sink], n)
        yield exported
        yield GaugeMetricFamily("otel_envoy_export_queue_depth", "span batches waiting for the exporters",
                                value=export.get("queue_depth", 0))
        yield CounterMetricFamily("otel_envoy_cpu_seconds", "CPU the daemon used (all its threads)",
                                  value=time.process_time())
        yield from self._requests()
        accepted = CounterMetricFamily("otel_envoy_connections_accepted",
                                       "connections each worker accepted, per listener",
                                       labels=["pid", "tid", "thread", "port", "listener"])
        by_labels: Counter[tuple[str, ...]] = Counter()
        for (pid, tid, thread, fd), n in s.accepts().items():
            port, name = s.listener_of(pid, fd)
            by_labels[(str(pid), str(tid), thread, str(port or ""), name or "")] += n
        for labels, n in sorted(by_labels.items()):
            accepted.add_metric(list(labels), n)
        yield accepted

    def _requests(self) -> Iterable[Any]:
        hist = HistogramMetricFamily("otel_envoy_http_server_request_duration_seconds",
                                     "plaintext HTTP/1.x requests, counted in the kernel",
                                     labels=["pid", "port", "listener", "method", "status"])
        merged: dict[tuple[str, ...], tuple[int, int, Counter[int]]] = {}  # a listener's sockets as one
        for series, totals in self.sources.requests().items():
            port, name = self.sources.listener_of(series.pid, series.listen_fd)
            labels = (str(series.pid), str(port or ""), name or "", series.method, str(series.status))
            count, sum_ns, slots = merged.get(labels, (0, 0, Counter()))
            slots.update(totals.slots)
            merged[labels] = (count + totals.count, sum_ns + totals.sum_ns, slots)
        for labels, (count, sum_ns, slots) in sorted(merged.items()):
            buckets, running = [], 0
            for slot in sorted(slots):  # slot s: [2^s, 2^(s+1)) microseconds
                running += slots[slot]
                buckets.append((repr(2.0 ** (slot + 1) / 1e6), running))
            buckets.append(("+Inf", count))
            hist.add_metric(list(labels), buckets, sum_ns / 1e9)
        yield hist


class StatusServer:
    """The aiohttp server of the endpoint, on the daemon's event loop."""

    def __init__(self, sources: StatusSources) -> None:
        self.sources = sources
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(sources))  # type: ignore[arg-type]
        self._runner: web.AppRunner | None = None
        self.address: tuple[str, int] | None = None

    async def start(self, host: str, port: int) -> None:
        """Serve on host:port; raises :class:`StatusError` when it cannot be bound."""
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/targets", self._targets)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, host, port, reuse_address=False)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise StatusError(f"--listen {host}:{port}: {exc.strerror or exc}") from None
        self._runner = runner
        self.address = (host, port)
        log.info("status endpoint on http://%s:%d (/healthz, /metrics, /targets)",
                 f"[{host}]" if ":" in host else host, port)

    async def stop(self) -> None:
        """Stop serving."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _healthz(self, _request: web.Request) -> web.Response:
        healthy, body = self.sources.health()
        return web.json_response(body, status=200 if healthy else 503)

    async def _metrics(self, _request: web.Request) -> web.Response:
        text = await asyncio.to_thread(generate_latest, self.registry)
        return web.Response(body=text, content_type="text/plain", charset="utf-8",
                            headers={"X-Content-Format": "prometheus-text-0.0.4"})

    async def _targets(self, _request: web.Request) -> web.Response:
        body = await asyncio.to_thread(self.sources.targets)
        return web.Response(text=json.dumps(body, default=str), content_type="application/json")

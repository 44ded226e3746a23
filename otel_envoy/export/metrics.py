"""Per-worker metrics through the OpenTelemetry metrics SDK, on the same OTLP endpoint as the spans.

Everything here is read from tables the kernel already keeps (no work on the event path): a
``PeriodicExportingMetricReader`` thread wakes every ``--metrics-interval`` seconds, its observable
instruments' callbacks take one snapshot of the tables, and the SDK's OTLP metric exporter (gRPC or
HTTP/protobuf, like the spans) sends it.

Metrics (all cumulative since the probes were loaded; attributes ``thread.id``, ``thread.name``,
``process.pid``):

* ``envoy.worker.offcpu.time`` (``s``, counter): time off CPU, by ``offcpu.reason`` (preempted, lock,
  io, idle, other);
* ``envoy.worker.runqueue.delay`` (``s``, counter): of that, the time spent runnable but waiting for a
  CPU (from the wake-up, or the preemption, until back on CPU), by ``offcpu.reason``;
* ``envoy.worker.offcpu.waits`` (``{wait}``, counter): number of off-CPU waits, by ``offcpu.reason``;
* ``envoy.worker.connections.accepted`` (``{connection}``, counter): connections the thread accepted, by
  listening socket (``server.address``, ``server.port``, ``envoy.listener.name``): how a listener's
  connections spread over its workers;
* ``envoy.worker.wakeups`` (``{wakeup}``, counter): wake-ups from an idle ``epoll_wait`` sleep of at least the
  off-CPU threshold, by ``offcpu.waker.kind`` (the seeds' categories from the waker's kernel stack: ``tcp``
  downstream/upstream data, ``unix_socket`` an xDS push, ``eventfd`` a post from another Envoy thread,
  ``udp`` DNS, ``timer``, ...): what wakes a worker that had nothing to do;
* ``envoy.worker.wakeup.idle_time`` (``s``, counter): the idle time those wake-ups ended, by the same kind;
* ``envoy.event_loop.round.duration`` (``s``, histogram): event-loop round durations (``epoll_wait``
  returned -> the next ``epoll_wait`` call);
* ``envoy.event_loop.rounds`` (``{round}``, counter): the same rounds counted (the histogram's count as
  a plain counter: rounds per second is each worker's wake-up rate).

Sources: ``offcpu_totals`` is ``ConnectionProbes.offcpu_totals()`` (kernel-aggregated per thread and
reason), ``round_histograms`` is ``ConnectionProbes.round_histograms()`` (a log2 histogram per thread),
``idle_wakes`` is ``spans.round_spans.idle_wakes_by_kind`` over ``ConnectionProbes.idle_wakes()``
(kernel-aggregated per thread, waker process and waker stack; the stacks classified off the event path),
and ``accepts`` returns accepts by (process, thread, thread name, listening fd): the kernel's
``accepts_by_thread`` table (every connection, traced or not) in sampling builds, else
``ConnectionCorrelator.accepts_by_thread`` (updated on the ring-buffer thread; copied here in one step);
``listen_sockets`` names each listening fd's address, port and listener. Thread names and processes come
from ``/proc/<tid>``; a thread that is gone is reported once more (its totals are final then) and then no
longer.

The round histogram is a real OTLP explicit-bucket histogram. The SDK has no observable histogram
instrument, and replaying every round into a synchronous ``Histogram`` would cost one ``record()`` per
round; instead the exporter handed to the SDK's reader (:class:`KernelHistogramExporter`, a plain
``MetricExporter`` wrapping the OTLP one) adds one ``Histogram`` metric, built from the snapshot the
callbacks of the same collection took, to each batch before the OTLP exporter encodes it. The kernel's
slot ``s`` counts rounds of ``floor(log2(us))`` == ``s`` microseconds, i.e. durations in
``[2^s, 2^(s+1))`` us (slot 0: ``[0, 2)`` us); bucket ``s`` of the point has upper bound ``2^(s+1)`` us
(:data:`ROUND_BOUNDS_S`, 32 bounds from 2 us to 2^32 us, in seconds, plus the overflow bucket), so
bucket counts are the kernel's counts exactly (OTLP buckets include their upper bound, the kernel's
their lower one: only a duration of exactly 2^k us could fall on the other side). The kernel keeps no
sum, minimum or maximum, so the points leave those optional fields unset rather than invent them.
Temporality follows the OTLP exporter's preference for histograms
(``OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE``: cumulative by default; delta is computed here).
The histogram rides in the batches the SDK exports, and the SDK exports nothing for a collection
without data points: ``envoy.event_loop.rounds``, observed from the same table, guarantees a batch
whenever there are rounds to report.

Callbacks never raise: a failing source yields no observations and is logged once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import Histogram as SdkHistogram
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    Histogram,
    Metric,
    MetricExporter,
    MetricExportResult,
    MetricsData,
    PeriodicExportingMetricReader,
    ResourceMetrics,
    ScopeMetrics,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.util.instrumentation import InstrumentationScope

from .. import __version__
from ..correlate.round_tracker import OFFCPU_REASONS
from ..envoy.threads import thread_identity
from .kernel_histograms import HistogramPoints, log2_bounds_s, slot_bucket_counts
from .metrics_settings import DEFAULT_INTERVAL_S, MetricPreferences, make_metric_exporter, metric_preferences
from .otlp import OtlpSettings
from .request_metrics import KernelMetric, ListenerSource, listener_attributes

__all__ = [
    "DAEMON_COUNTERS",
    "METER_NAME",
    "ROUND_BOUNDS_S",
    "ROUND_DURATION",
    "DaemonCounters",
    "KernelHistogramExporter",
    "WorkerMetrics",
    "round_bucket_counts",
]

log = logging.getLogger("otel_envoy.metrics")

METER_NAME = "otel_envoy"
ROUND_DURATION = "envoy.event_loop.round.duration"
#: Kernel slots with their own bucket; later slots (rounds over 2^32 us, 71 minutes) share the last one.
ROUND_SLOTS = 32
#: Upper bounds of the round-duration buckets, in seconds: 2^(s+1) microseconds for slot s.
ROUND_BOUNDS_S: tuple[float, ...] = log2_bounds_s(ROUND_SLOTS)


OffcpuSource = Callable[[], Mapping[tuple[int, int], tuple[int, int, int]]]
RoundSource = Callable[[], Mapping[int, Mapping[int, int]]]
AcceptSource = Callable[[], Mapping[tuple[int, int, str, int], int]]  # (tgid, tid, name, listening fd)
WakeSource = Callable[[], Mapping[tuple[int, str], tuple[int, int]]]  # (tid, waker kind) -> (ns, wake-ups)
Identity = Callable[[int], tuple[int, str]]
#: The daemon's own counters: instrument name -> [(value, attributes)] (status.py: the same on /metrics).
DaemonCounters = Callable[[], Mapping[str, list[tuple[float, dict[str, str]]]]]
DAEMON_COUNTERS: dict[str, tuple[str, str]] = {
    "otel_envoy.records": ("{record}", "Ring-buffer records the kernel submitted and the daemon read "
                                       "(otel_envoy.stage: submitted, received)."),
    "otel_envoy.drops": ("{item}", "What was lost, by stage (otel_envoy.drop.stage)."),
    "otel_envoy.spans.exported": ("{span}", "Spans sent, by sink (otel_envoy.sink)."),
    "otel_envoy.cpu.time": ("s", "CPU time the daemon used, all its threads."),
}



# ------------------------------------------------------------------------------------------ histogram


def round_bucket_counts(slots: Mapping[int, int]) -> list[int]:
    """The kernel's log2 slots as the bucket counts of :data:`ROUND_BOUNDS_S` (33 counts)."""
    return slot_bucket_counts(slots, ROUND_SLOTS)


class KernelHistogramExporter(MetricExporter):
    """Wraps the OTLP metric exporter: adds the kernel's histograms (rounds, requests) to every batch.

    ``histograms`` returns the metrics for the collection being exported (maybe none); it runs on the
    reader's thread, right after the callbacks of that collection.  ``preferences`` are those the wrapped
    exporter was given (see :func:`otel_envoy.export.metrics_settings.make_metric_exporter`): the reader
    asks this exporter, and the histogram follows their histogram temporality.
    """

    def __init__(self, inner: MetricExporter, histograms: Callable[[AggregationTemporality], list[Metric]],
                 scope: InstrumentationScope, preferences: MetricPreferences) -> None:
        """Wrap ``inner``."""
        super().__init__(preferred_temporality=preferences.temporality,
                         preferred_aggregation=preferences.aggregation)
        self.inner = inner
        self.temporality = preferences.temporality.get(SdkHistogram, AggregationTemporality.CUMULATIVE)
        self._histograms = histograms
        self._scope = scope
        self._failed = False

    def export(self, metrics_data: MetricsData, timeout_millis: float = 10_000,
               **kwargs: Any) -> MetricExportResult:
        """Add the histograms to the batch and hand it to the wrapped exporter."""
        try:
            metrics = self._histograms(self.temporality)
        except Exception:  # never lose the batch because of the histograms
            if not self._failed:
                self._failed = True
                log.warning("metrics: the kernel histograms failed; they are left out", exc_info=True)
            metrics = []
        for metric in metrics:
            metrics_data = _with_metric(metrics_data, metric, self._scope)
        return self.inner.export(metrics_data, timeout_millis=timeout_millis, **kwargs)

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        """Flush the wrapped exporter."""
        return self.inner.force_flush(timeout_millis=timeout_millis)

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        """Shut the wrapped exporter down."""
        self.inner.shutdown(timeout_millis=timeout_millis, **kwargs)


def _with_metric(data: MetricsData, metric: Metric, scope: InstrumentationScope) -> MetricsData:
    """A copy of ``data`` with ``metric`` added to the scope ``scope`` of its first resource."""
    if not data.resource_metrics:
        return data
    first, *rest = data.resource_metrics
    scopes = list(first.scope_metrics)
    for i, sm in enumerate(scopes):
        if sm.scope.name == scope.name:
            scopes[i] = ScopeMetrics(scope=sm.scope, metrics=[*sm.metrics, metric], schema_url=sm.schema_url)
            break
    else:
        scopes.append(ScopeMetrics(scope=scope, metrics=[metric], schema_url=scope.schema_url or ""))
    return MetricsData(resource_metrics=[
        ResourceMetrics(resource=first.resource, scope_metrics=scopes, schema_url=first.schema_url), *rest])


# ------------------------------------------------------------------------------------------ metrics


class _Snapshot:
    """One collection's view of the kernel tables, thread identities resolved."""

    __slots__ = ("offcpu", "rounds", "wakes")

    def __init__(self) -> None:
        self.wakes: list[tuple[dict[str, Any], str, int, int]] = []  # (thread attributes, kind, ns, count)
        # (thread attributes, reason name, ns, runnable ns, waits)
        self.offcpu: list[tuple[dict[str, Any], str, int, int, int]] = []
        self.rounds: dict[int, tuple[dict[str, Any], Mapping[int, int]]] = {}  # tid -> (attrs, slots)


class WorkerMetrics:
    """Per-thread metrics of the traced Envoy processes, exported periodically through the SDK.

    ``exporter`` is the real exporter (see :func:`make_metric_exporter` / :meth:`from_settings`) and
    ``preferences`` the temporality and aggregation it was made with (by default those of the
    environment, :func:`metric_preferences`); nothing runs until :meth:`start`. ``shutdown`` does a last
    collection and export. Any source may be ``None`` (its metrics are then empty); ``identity`` maps a
    tid to ``(tgid, name)``, ``(0, "")`` when the thread is gone.
    """

    def __init__(
        self,
        exporter: MetricExporter,
        resource: Resource,
        *,
        offcpu_totals: OffcpuSource | None = None,
        round_histograms: RoundSource | None = None,
        accepts: AcceptSource | None = None,
        listen_sockets: ListenerSource | None = None,
        idle_wakes: WakeSource | None = None,
        kernel_metrics: Sequence[KernelMetric] = (),
        daemon_counters: DaemonCounters | None = None,
        interval_s: float = DEFAULT_INTERVAL_S,
        export_timeout_s: float = 10.0,
        identity: Identity = thread_identity,
        preferences: MetricPreferences | None = None,
    ) -> None:
        """Set up; nothing runs before :meth:`start`."""
        if not interval_s > 0:
            raise ValueError("the metrics interval must be positive")
        self.scope = InstrumentationScope(METER_NAME, __version__)
        self.exporter = KernelHistogramExporter(exporter, self._kernel_histograms, self.scope,
                                                preferences or metric_preferences())
        self.resource = resource
        self.interval_s = float(interval_s)
        self.export_timeout_s = float(export_timeout_s)
        self._offcpu_source = offcpu_totals
        self._round_source = round_histograms
        self._accept_source = accepts
        self._listen_sockets = listen_sockets
        self._wake_source = idle_wakes
        self._identity = identity
        self._lock = threading.Lock()
        self._provider: MeterProvider | None = None
        self._reader: PeriodicExportingMetricReader | None = None
        self._start_ns = time.time_ns()
        self._snapshot: _Snapshot | None = None
        self._served: set[str] = set()  # instruments that used the current snapshot
        self._known: dict[int, tuple[int, str]] = {}  # tid -> (tgid, name) seen alive
        self._gone: set[int] = set()  # reported once after they were found gone
        self._retired: set[int] = set()  # gone threads no longer reported
        self._logged: set[str] = set()
        self._round_points = HistogramPoints(self._start_ns)  # per tid
        self._kernel_metrics = tuple(kernel_metrics)
        self._daemon_counters = daemon_counters

    @classmethod
    def from_settings(cls, settings: OtlpSettings, resource: Resource, **kwargs: Any) -> WorkerMetrics:
        """Metrics to the collector of the span settings (see
        :func:`otel_envoy.export.metrics_settings.metrics_endpoint`)."""
        preferences = metric_preferences()
        return cls(make_metric_exporter(settings, preferences=preferences), resource, preferences=preferences,
                   **kwargs)

    # -- lifecycle ------------------------------------------------------------------------------------

    def start(self) -> None:
        """Create the meter provider and instruments; the reader's thread starts exporting."""
        if self._provider is not None:
            return
        self._reader = PeriodicExportingMetricReader(
            self.exporter, export_interval_millis=self.interval_s * 1000.0,
            export_timeout_millis=self.export_timeout_s * 1000.0)
        self._provider = MeterProvider(resource=self.resource, metric_readers=[self._reader],
                                       shutdown_on_exit=False)
        meter = self._provider.get_meter(self.scope.name, self.scope.version)
        meter.create_observable_counter(
            "envoy.worker.offcpu.time", [self._offcpu_time], unit="s",
            description="Time the thread was off CPU, by reason (kernel-aggregated).")
        meter.create_observable_counter(
            "envoy.worker.runqueue.delay", [self._runqueue_delay], unit="s",
            description="Time the thread was runnable but waiting for a CPU, within its off-CPU waits.")
        meter.create_observable_counter(
            "envoy.worker.offcpu.waits", [self._offcpu_waits], unit="{wait}",
            description="Number of off-CPU waits of the thread, by reason.")
        meter.create_observable_counter(
            "envoy.event_loop.rounds", [self._rounds], unit="{round}",
            description="Event-loop rounds of the thread (the count of envoy.event_loop.round.duration).")
        meter.create_observable_counter(
            "envoy.worker.connections.accepted", [self._accepted], unit="{connection}",
            description="Downstream connections the thread accepted.")
        meter.create_observable_counter(
            "envoy.worker.wakeups", [self._wakeups], unit="{wakeup}",
            description="Wake-ups of the thread from an idle epoll_wait sleep of at least the off-CPU "
                        "threshold, by the waker's kind.")
        meter.create_observable_counter(
            "envoy.worker.wakeup.idle_time", [self._wakeup_idle_time], unit="s",
            description="Idle time (in epoll_wait) ended by those wake-ups, by the waker's kind.")
        for name, (unit, description) in DAEMON_COUNTERS.items():  # the daemon's own (also on /metrics)
            meter.create_observable_counter(name, [self._daemon_counter(name)], unit=unit,
                                            description=description)

    def force_flush(self, timeout_s: float = 10.0) -> bool:
        """Collect and export now (tests)."""
        if self._provider is None:
            return False
        return self._provider.force_flush(timeout_millis=timeout_s * 1000.0)

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """Last collection and export, then stop the reader thread and the exporter.  Idempotent.

        Call it before the probes' tables are closed.
        """
        provider, self._provider = self._provider, None
        if provider is not None:
            provider.shutdown(timeout_millis=timeout_s * 1000.0)

    # -- callbacks ------------------------------------------------------------------------------------

    def _offcpu_time(self, _options: CallbackOptions) -> Iterable[Observation]:
        snap = self._take("offcpu.time")
        return [Observation(ns / 1e9, {**attrs, "offcpu.reason": reason})
                for attrs, reason, ns, _r, _w in snap.offcpu]

    def _runqueue_delay(self, _options: CallbackOptions) -> Iterable[Observation]:
        snap = self._take("runqueue.delay")
        return [Observation(runnable / 1e9, {**attrs, "offcpu.reason": reason})
                for attrs, reason, _ns, runnable, _w in snap.offcpu]

    def _offcpu_waits(self, _options: CallbackOptions) -> Iterable[Observation]:
        snap = self._take("offcpu.waits")
        return [Observation(waits, {**attrs, "offcpu.reason": reason})
                for attrs, reason, _ns, _r, waits in snap.offcpu]

    def _rounds(self, _options: CallbackOptions) -> Iterable[Observation]:
        snap = self._take("rounds")
        return [Observation(sum(n for n in slots.values() if n > 0), attrs)
                for attrs, slots in snap.rounds.values()]

    def _wakeups(self, _options: CallbackOptions) -> Iterable[Observation]:
        snap = self._take("wakeups")
        return [Observation(count, {**attrs, "offcpu.waker.kind": kind})
                for attrs, kind, _ns, count in snap.wakes]

    def _wakeup_idle_time(self, _options: CallbackOptions) -> Iterable[Observation]:
        snap = self._take("wakeup.idle_time")
        return [Observation(ns / 1e9, {**attrs, "offcpu.waker.kind": kind})
                for attrs, kind, ns, _c in snap.wakes]

    def _accepted(self, _options: CallbackOptions) -> Iterable[Observation]:
        if self._accept_source is None:
            return []
        try:
            counts = _copy(self._accept_source())
            sockets = self._listen_sockets() if self._listen_sockets is not None else {}
            return [Observation(int(n), {"thread.id": tid, "thread.name": name,
                                         **listener_attributes(tgid, sockets.get((tgid, fd)))})
                    for (tgid, tid, name, fd), n in sorted(counts.items()) if n > 0]
        except Exception as exc:
            self._log_once("accepts", exc)
            return []

    def _daemon_counter(self, name: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def observe(_options: CallbackOptions) -> Iterable[Observation]:
            if self._daemon_counters is None:
                return []
            try:
                return [Observation(v, attrs) for v, attrs in self._daemon_counters().get(name, [])]
            except Exception as exc:
                self._log_once(name, exc)
                return []
        return observe

    # -- snapshot -------------------------------------------------------------------------------------

    def _take(self, instrument: str) -> _Snapshot:
        """The current collection's snapshot: a new one when this instrument already used the last."""
        with self._lock:
            if self._snapshot is None or instrument in self._served:
                self._snapshot = self._read()
                self._served.clear()
            self._served.add(instrument)
            return self._snapshot

    def _read(self) -> _Snapshot:
        snap = _Snapshot()
        offcpu: Mapping[tuple[int, int], tuple[int, int, int]] = {}
        rounds: Mapping[int, Mapping[int, int]] = {}
        wakes: Mapping[tuple[int, str], tuple[int, int]] = {}
        if self._offcpu_source is not None:
            try:
                offcpu = self._offcpu_source()
            except Exception as exc:
                self._log_once("offcpu_totals", exc)
        if self._round_source is not None:
            try:
                rounds = self._round_source()
            except Exception as exc:
                self._log_once("round_histograms", exc)
        if self._wake_source is not None:
            try:
                wakes = self._wake_source()
            except Exception as exc:
                self._log_once("idle_wakes", exc)
        try:
            tids = {tid for tid, _reason in offcpu} | set(rounds) | {tid for tid, _kind in wakes}
            threads = self._threads(tids)
        except Exception as exc:
            self._log_once("threads", exc)
            return snap
        for (tid, code), (ns, runnable, waits) in sorted(offcpu.items()):
            attrs = threads.get(tid)
            if attrs is not None:
                snap.offcpu.append((attrs, OFFCPU_REASONS.get(code) or str(code), ns, runnable, waits))
        for tid, slots in sorted(rounds.items()):
            attrs = threads.get(tid)
            if attrs is not None:
                snap.rounds[tid] = (attrs, slots)
        for (tid, kind), (ns, count) in sorted(wakes.items()):
            attrs = threads.get(tid)
            if attrs is not None:
                snap.wakes.append((attrs, kind, ns, count))
        return snap

    def _threads(self, tids: set[int]) -> dict[int, dict[str, Any]]:
        """Attributes of the threads to report: alive ones, and gone ones once (named while alive)."""
        out: dict[int, dict[str, Any]] = {}
        for tid in tids:
            if tid in self._retired:
                continue
            tgid, name = self._identity(tid)
            if name:
                self._known[tid] = (tgid, name)
                self._gone.discard(tid)
            elif tid not in self._known or tid in self._gone:  # never named, or its last report was sent
                self._known.pop(tid, None)
                self._gone.discard(tid)
                if len(self._retired) > 65536:
                    self._retired.clear()
                self._retired.add(tid)
                continue
            else:
                self._gone.add(tid)
                tgid, name = self._known[tid]
            out[tid] = {"thread.id": tid, "thread.name": name, "process.pid": tgid}
        return out

    def _kernel_histograms(self, temporality: AggregationTemporality) -> list[Metric]:
        """The kernel histograms of this collection (called by the exporter)."""
        out = [m for m in (self._round_metric(temporality),) if m is not None]
        for source in self._kernel_metrics:
            try:
                metric = source.metric(temporality)
            except Exception as exc:
                self._log_once(type(source).__name__, exc)
                metric = None
            if metric is not None:
                out.append(metric)
        return out

    def _round_metric(self, temporality: AggregationTemporality) -> Metric | None:
        """The round-duration histogram of the latest snapshot."""
        with self._lock:
            snap = self._snapshot
            if snap is None:
                return None
            now = time.time_ns()
            points = []
            for tid, (attrs, slots) in snap.rounds.items():
                point = self._round_points.point(tid, attrs, round_bucket_counts(slots), None, ROUND_BOUNDS_S,
                                                 now, temporality)
                if point is not None:
                    points.append(point)
            self._round_points.forget({t for t in self._round_points.series()
                                       if t not in snap.rounds and t in self._retired})
            if not points:
                return None
            return Metric(name=ROUND_DURATION, description="Duration of event-loop rounds (epoll_wait "
                          "return to the next epoll_wait), from the kernel's log2 histogram.",
                          unit="s", data=Histogram(data_points=points, aggregation_temporality=temporality))

    def _log_once(self, what: str, exc: BaseException) -> None:
        if what not in self._logged:
            self._logged.add(what)
            log.warning("metrics: reading %s failed (%s: %s); its metrics are left out", what,
                        type(exc).__name__, exc)


def _copy(counts: Mapping[Any, int]) -> dict[Any, int]:
    """A copy of a mapping another thread may be adding keys to."""
    for _ in range(5):
        try:
            return dict(counts)
        except RuntimeError:  # changed size during iteration (not with a plain dict / Counter in CPython)
            continue
    return {}

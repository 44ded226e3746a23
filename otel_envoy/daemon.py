"""`otel-envoy run` / `record`: the live daemon.

Threads and who owns what:
  * the ring-buffer thread polls the kernel and runs the whole event path (decode, correlate, build spans);
    it is the only thread touching the correlator;
  * the export thread (inside SpanPipeline) encodes and sends batches, so slow OTLP never stalls tracing;
  * with an OTLP endpoint, the metrics reader thread (export/metrics.py) reads the kernel's per-thread
    tables and the correlator's accept counts every --metrics-interval and exports them;
  * the asyncio loop (this module's ``run_daemon``) handles signals, --duration, periodic /proc rescans of
    listening sockets and admin-API listener names, and hands that context to the ring-buffer thread
    through a queue.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import logging
import os
import queue
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from opentelemetry.sdk.resources import Resource

from . import run_summary as summarize
from .accounting import ledger
from .budget_loop import keep_to_budget
from .envoy.admin import AdminError, fetch_listener_config, fetch_listener_names
from .envoy.adoption import adopt_open_connections
from .envoy.filter_chains import load_types
from .envoy.listen_socket import ListenSocket
from .envoy.process import ListenerFinder, resolve_targets, watch_exits
from .envoy.process_resource import operator_keys
from .envoy.targets import TracedProcesses
from .event_pipeline import EventPipeline, tune_allocator, tune_garbage_collector, tune_thread_switching
from .events.layout import load_layout
from .events.recording import RecordingWriter
from .events.recording_context import (
    AdoptedContext,
    FilterChainsContext,
    ListenerNamesContext,
    ListenSocketsContext,
    OwnConnectionContext,
    ProcessResourceContext,
    SamplerContext,
)
from .export.metrics import WorkerMetrics
from .export.metrics_settings import DEFAULT_INTERVAL_S
from .export.otlp import OtlpSettings, check_reachable
from .export.request_metrics import AcceptQueueMetrics, ConnectionMetrics, RequestMetrics, TlsHandshakeMetrics
from .export.sink_worker import DEFAULT_BUFFER_BYTES
from .export.sinks import JsonLinesFileSink, OtlpSink, SpanSink
from .export.span_queue import SpanPipeline
from .features import has_kernel_btf, require_tracing
from .probes.loader import ConnectionProbes, ProbeConfig
from .probes.uprobe_symbols import uprobe_sites
from .sampling import (
    DEFAULT_CPU_BUDGET,
    DEFAULT_RATIO,
    DEFAULT_SAMPLER,
    CpuBudget,
    KeepThresholds,
    SamplerSettings,
    peer_hash,
)
from .spans.clock import MonotonicClock
from .spans.round_spans import idle_wakes_by_kind
from .stacks import Symbolizer, SymbolsFileError
from .stacks.source import IDLE_S, SymbolizedStacks
from .status import StatusServer, StatusSources
from .thread_names import name_this_thread

__all__ = ["DaemonOptions", "UsageError", "make_resource", "report_new_drops", "run_daemon"]

log = logging.getLogger("otel_envoy.daemon")

RESCAN_INTERVAL_S = 5.0
#: After a process exited, its metric series stay in the kernel's tables this long past one metrics interval.
SERIES_GRACE_S = 2.0
EV_EXEC, EV_EXIT, EV_LISTEN = (load_layout().constants[k] for k in ("EV_EXEC", "EV_EXIT", "EV_LISTEN"))
#: After the programs stop producing, how long to wait for any run still inside one to finish its record.
STOP_SETTLE_S = 0.05
# Fewer records than RING_BATCH_MIN in one pass: wait RING_BATCH_WAIT_S before the next. Between passes the
# CPU runs other work (the load itself, often) and Python's code and data leave the caches, so a pass costs
# more per record the fewer records it has. Measured on RSA full handshakes at ~1 300-1 800 connections/s
# (h2load, the daemon's CPU not saturated): 64 records / 2 ms -> 512 / 10 ms -> 4 096 / 50 ms took the
# daemon from 179 to 144 to 135 us per connection (medians of 3 alternating runs); at saturation (wrk,
# ~3 100 new TLS connections/s) passes are bigger than that anyway and nothing changed. 50 ms of records
# is ~1 MB of the 16 MB ring at the highest rates traced here; spans wait for linger_ns (50 ms) anyway.
RING_BATCH_MIN = 4096
RING_BATCH_WAIT_S = 0.050
#: The kernel submits records without waking the reader (bpf/state.bpf.h, RB_SUBMIT_FLAGS): an empty ring is
#: looked at again after this long (a wait on its fd that nothing interrupts). 50 ms of records is ~1 MB of
#: the 16 MB ring at the highest rates traced here.
RING_TIMER_MS = 50


class UsageError(RuntimeError):
    """A condition that ends the daemon with a one-line message and exit code 2 or 1."""


@dataclass(slots=True)
class DaemonOptions:
    """Everything `run`/`record` accept."""

    pids: list[int] = field(default_factory=list)
    comm: str | None = None  # with exe: follow processes that start later (neither, nor pids: every Envoy)
    exe: str | None = None
    envoy_admin: str | None = None
    otlp: OtlpSettings | None = None
    output: str | None = None
    record: str | None = None
    duration: float | None = None
    require_envoy: bool = True
    max_conns: int = 65536
    requests: bool = True  # capture and parse plaintext HTTP: request and upstream request spans
    request_summary: bool = True  # a sampled plaintext HTTP/1.x request is one kernel record (not parsed)
    tls_handshake_summary: bool = True  # a traced TLS connection's handshake is one kernel record
    ready_file: str | None = None  # written once probes are attached (tests and scripts wait on it)
    summary_json: str | None = None  # written at exit: counts, drops, export stats (bench, tests)
    offcpu: bool = True  # scheduler probes: event-loop rounds' off-CPU waits
    offcpu_min_ns: int = 1_000_000  # off-CPU waits at least this long become spans
    round_min_ns: int = 10_000_000  # event-loop rounds at least this long become spans (and all with a wait)
    symbols: list[str] = field(default_factory=list)  # --symbols files (unstripped copies / debug files)
    metrics_interval: float | None = DEFAULT_INTERVAL_S  # seconds between metric exports; None: no metrics
    sampler: SamplerSettings = field(
        default_factory=lambda: SamplerSettings(DEFAULT_SAMPLER, DEFAULT_RATIO, parent_based=True))
    cpu_budget: float = DEFAULT_CPU_BUDGET  # share of one CPU; past it fewer requests are traced (0: none)
    keep: KeepThresholds = field(default_factory=KeepThresholds)  # how slow what is not sampled is kept
    export_buffer_bytes: int = DEFAULT_BUFFER_BYTES  # per sink: encoded spans kept while it cannot take them
    listen: tuple[str, int] | None = None  # the status endpoint's address (status.py); None: none


def following(opts: DaemonOptions) -> str | None:
    """The name of the processes traced from their start: --comm, --exe's file name (the kernel's comm of a
    process is its executable's name, 15 bytes), or, without --pid either, every Envoy ("envoy")."""
    if opts.comm:
        return opts.comm
    if opts.exe:
        return Path(opts.exe).name[:15]
    return None if opts.pids else "envoy"


def make_resource() -> Resource:
    """The one Resource shared by all spans; OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES override."""
    attrs: dict[str, str] = {"telemetry.distro.name": "otel-envoy"}
    env_attrs = os.environ.get("OTEL_RESOURCE_ATTRIBUTES", "")
    if not os.environ.get("OTEL_SERVICE_NAME") and "service.name=" not in env_attrs:
        attrs["service.name"] = "envoy"
    return Resource.create(attrs)


class _RingThread(threading.Thread):
    """Polls the ring buffer and runs the event path until stopped."""

    def __init__(self, probes: ConnectionProbes, pipeline: EventPipeline) -> None:
        super().__init__(name="otel-envoy-ring", daemon=True)
        self.probes = probes
        self.pipeline = pipeline
        self.context: queue.SimpleQueue[dict] = queue.SimpleQueue()
        self.stop_requested = threading.Event()
        self.error: BaseException | None = None
        self.last_pass = time.monotonic()  # the status endpoint's sign of a ring being drained

    def run(self) -> None:
        name_this_thread("oe-ring")
        try:
            while not self.stop_requested.is_set():
                self.last_pass = time.monotonic()
                while not self.context.empty():
                    self.pipeline.on_context(self.context.get_nowait())
                delivered = self.probes.poll(RING_TIMER_MS)
                self.pipeline.tick(time.monotonic_ns())
                if 0 < delivered < RING_BATCH_MIN:
                    # A pass per few records costs more per record: a pause lets them gather (see
                    # RING_BATCH_MIN).
                    self.stop_requested.wait(RING_BATCH_WAIT_S)
            self.probes.consume()  # what arrived before the stop
            while not self.context.empty():
                self.pipeline.on_context(self.context.get_nowait())
        except BaseException as exc:  # surfaced by run_daemon
            self.error = exc


def _build_sinks(opts: DaemonOptions) -> list[SpanSink]:
    sinks: list[SpanSink] = []
    if opts.output:
        sinks.append(JsonLinesFileSink(opts.output))
    if opts.otlp is not None:
        sinks.append(OtlpSink.from_settings(opts.otlp))
    return sinks


async def _listener_config(admin_url: str, own_connection: Callable[[str, int], None] | None = None
                           ) -> list[dict] | None:
    """What selects each listener's filter chains (envoy/filter_chains.py), or None (logged) when Envoy's
    configuration dump cannot be read."""
    try:
        listeners = await fetch_listener_config(admin_url, own_connection=own_connection)
    except AdminError as exc:
        log.warning("filter chains are not inferred: %s", exc)
        return None
    await asyncio.to_thread(load_types)  # once (0.5 s): here, not on the ring-buffer thread

    return listeners


async def run_daemon(opts: DaemonOptions) -> int:
    """Run until SIGINT/SIGTERM or --duration; returns the exit code. Raises UsageError for bad input."""
    require_tracing()
    if opts.offcpu and not has_kernel_btf():
        log.warning("no kernel BTF (/sys/kernel/btf/vmlinux): tracing without off-CPU waits and rounds, "
                    "as with --no-offcpu")
        opts = dataclasses.replace(opts, offcpu=False)
    follow = following(opts)
    targets = resolve_targets(opts.pids, follow, require_envoy=opts.require_envoy, follow=True, exe=opts.exe)
    if opts.otlp is not None:
        problem = check_reachable(opts.otlp)
        if problem:
            raise UsageError(problem)
    names: dict[tuple[str, int], str] = {}
    chains: list[dict] | None = None  # what selects the listeners' filter chains, as last sent
    if opts.envoy_admin:
        try:
            names = await fetch_listener_names(opts.envoy_admin)
        except AdminError as exc:
            raise UsageError(str(exc)) from exc
        chains = await _listener_config(opts.envoy_admin)

    clock = MonotonicClock.now()
    spans_out = SpanPipeline(_build_sinks(opts), buffer_bytes=opts.export_buffer_bytes)
    recorder = RecordingWriter(opts.record) if opts.record else None
    loop = asyncio.get_running_loop()
    notices: asyncio.Queue[tuple[int, int]] = asyncio.Queue()  # (EV_LISTEN/EV_EXEC/EV_EXIT, pid)
    try:
        symbolizer = Symbolizer(symbols=opts.symbols)
    except SymbolsFileError as exc:
        raise UsageError(str(exc)) from exc
    requests = opts.requests
    budget = CpuBudget(opts.cpu_budget, opts.sampler.ratio, int(opts.keep.rate)) \
        if requests and opts.cpu_budget > 0 else None
    # the kernel decides which requests are traced and counts them all (http.server.request.duration)
    sampling = requests
    probes = ConnectionProbes(ProbeConfig(
        max_conns=opts.max_conns, http_capture=requests, offcpu=opts.offcpu,
        offcpu_min_ns=opts.offcpu_min_ns, round_min_ns=opts.round_min_ns, sampling=sampling,
        uprobes=uprobe_sites((t.pid for t in targets), opts.symbols) if requests else ()))
    if sampling:
        probes.set_sample_threshold(opts.sampler.kernel_threshold())
        probes.set_parent_based(opts.sampler.parent_based)
        probes.set_request_summary(opts.request_summary)
        probes.set_tls_handshake_summary(opts.tls_handshake_summary)
        opts.keep.apply(probes)
    stacks = SymbolizedStacks(probes.stack_addresses, symbolizer)
    traced = TracedProcesses(targets, follow_comm=follow, require_envoy=opts.require_envoy,
                             forget=probes.remove_target, match_exe=opts.exe,
                             why={t.pid: "--pid" if t.pid in opts.pids else "running at start, "
                                  + (f"--exe {opts.exe}" if opts.exe else f"comm {follow!r}")
                                  for t in targets})
    pipeline = EventPipeline(
        spans_out, make_resource(), clock, recorder=recorder,
        on_notice=lambda ev: loop.call_soon_threadsafe(notices.put_nowait, (ev.kind, ev.tgid)),
        http=requests, stacks=stacks, threaded_rounds=True, operator_keys=operator_keys(),
    )
    symbolizer.unmatched_symbols_files(t.pid for t in targets)  # warns about each
    ring = _RingThread(probes, pipeline)
    sampler = SamplerContext(opts.sampler.name, opts.sampler.ratio, opts.request_summary)
    if sampling:  # before any record: it decides what becomes of upstream requests no traced one caused
        ring.context.put(sampler.to_json())
    for pid, attributes in traced.resources.items():  # each process's spans carry its own resource
        ring.context.put(ProcessResourceContext(pid, attributes).to_json())
    metrics: WorkerMetrics | None = None  # per-worker metrics (export/metrics.py), with an OTLP endpoint
    status: StatusServer | None = None  # --listen
    adopted: Counter[str] = Counter()  # connections open before the daemon (envoy/adoption.py)
    try:
        probes.add_targets(t.pid for t in targets)
        if follow:  # processes that start under this name are traced from their first instruction
            probes.follow_comm(follow)
        listeners = ListenerFinder()  # caches which fds hold the listeners, between rescans
        known_ports, listen_sockets = _rescan(traced, listeners, probes, ring, set())
        if names:
            ring.context.put(ListenerNamesContext(names).to_json())
        if chains is not None:
            ring.context.put(FilterChainsContext(chains).to_json())
        threshold = opts.sampler.kernel_threshold() if sampling else 1 << 32  # as the kernel samples
        adopted_at, open_conns, adopted = adopt_open_connections(  # accepted before the daemon started
            list(traced.by_pid), listen_sockets, probes.adopt_connection, probes.forget_connection,
            room=opts.max_conns // 2,
            sampled=lambda s: peer_hash(s.peer_raw, s.family, s.peer_port) < threshold)
        if open_conns:
            ring.context.put(AdoptedContext.of(adopted_at, open_conns).to_json())
            log.info("adopted %d open connections (%s)", len(open_conns), dict(adopted))
        probes.open_ring_buffer(pipeline.on_record)
        if opts.offcpu:  # waits and wake-ups carry kernel stacks: symbols before the load, not during it
            symbolizer.load_kernel_symbols()
        tune_garbage_collector()
        tune_allocator()
        tune_thread_switching()
        if sampling:
            pipeline.correlator.downstream.on_tls_listener = functools.partial(_sample_tls_listener, probes)
        ring.start()
        sources = _status_sources(probes, pipeline, ring, traced)
        metrics = _start_worker_metrics(opts, probes, pipeline, stacks, sources)
        if opts.listen is not None:  # raises StatusError (exit 2) when the address cannot be bound
            status = StatusServer(sources)
            await status.start(*opts.listen)
        log.info("tracing %s on ports %s", traced.describe(), sorted(known_ports))
        if opts.ready_file:
            with open(opts.ready_file, "w") as f:
                f.write(f"{os.getpid()}\n")
        tasks = [asyncio.ensure_future(keep_to_budget(budget, probes, lambda ratio: ring.context.put(
            dataclasses.replace(sampler, ratio=ratio).to_json())))] if budget is not None else []
        if opts.offcpu:
            tasks.append(asyncio.ensure_future(_sweep_stacks(probes, stacks)))
        try:
            await _wait(opts, loop, notices, traced, listeners, probes, ring, known_ports, chains)
        finally:
            for task in tasks:
                task.cancel()
    finally:
        if status is not None:
            await status.stop()
        probes.stop_producing()  # then the last drain reads every record the kernel submitted
        await asyncio.sleep(STOP_SETTLE_S)
        ring.stop_requested.set()
        if ring.is_alive():
            await asyncio.to_thread(ring.join, 5.0)
        pipeline.finish(time.monotonic_ns())
        if metrics is not None:  # last export, while the probes' tables are still open
            await asyncio.to_thread(metrics.shutdown, 10.0)
        kernel_drops = {f"kernel.{k}": v for k, v in probes.drop_counts().items() if v}
        sampled = probes.sample_counts()
        connections_sampled = summarize.sampler_decisions(probes)
        tables = summarize.kernel_tables(probes, pipeline.correlator)  # exact: requests, connections, TLS
        offcpu = summarize.offcpu_by_reason(probes.offcpu_totals()) if opts.offcpu else {}
        wakes = summarize.wakes_by_kind(idle_wakes_by_kind(probes.idle_wakes(), stacks.kernel)) \
            if opts.offcpu else {}
        records_submitted = probes.records_submitted()
        left_in_kernel = {str(pid): probes.entries_of(pid, tids) for pid, tids in traced.gone.items()}
        probes.close()
        await asyncio.to_thread(spans_out.shutdown, 10.0)
        if recorder is not None:
            recorder.close()
    if ring.error is not None:
        raise ring.error
    drops = {**kernel_drops, **pipeline.drops()}
    if stacks.collisions:  # stacks the kernel could not record: their slot in its table was taken
        drops["stacks.table_collision"] = stacks.collisions
    stats = spans_out.stats()
    counts = pipeline.counts
    rounds = pipeline.round_worker
    accounts = ledger(
        records_submitted=records_submitted, records_received=pipeline.received, decoded=counts["events"],
        decode_errors=pipeline.decoder.errors, correlator_stats=pipeline.correlator.stats, counts=counts,
        rounds_offered=rounds.offered if rounds is not None else None,
        rounds_dropped=rounds.dropped if rounds is not None else 0, export=stats)
    broken = sorted(name for name, stage in accounts.items() if not stage["holds"])
    if broken:
        log.warning("the accounts do not balance at %s (--summary-json has the figures)", ", ".join(broken))
    if opts.summary_json:
        with open(opts.summary_json, "w") as f:
            json.dump({"counts": dict(counts), "drops": drops, "export": stats, "accounting": accounts,
                       "correlator": dict(pipeline.correlator.stats), "offcpu": offcpu,
                       "idle_wakeups": wakes, **tables,
                       "processes": {"traced": sorted(traced.by_pid), "started": traced.started_count,
                                     "exited": traced.exited_count, "left_in_kernel": left_in_kernel},
                       "adopted_connections": dict(adopted),
                       "sampler": {"name": opts.sampler.name, "ratio": opts.sampler.ratio,
                                   "requests": sampled, **connections_sampled,
                                   "cpu_budget": budget.summary() if budget is not None else None}},
                      f, default=str)
    print(
        f"otel-envoy: {pipeline.counts['connections']} connections, {pipeline.counts['spans']} spans, "
        f"{pipeline.counts['events']} events, exported {stats.get('exported', {})}, "
        f"drops {drops or 'none'}"
        + (f", requests sampled {sampled['sampled']}, not {sampled['not_sampled']}"
           if sampled and any(sampled.values()) else ""),
        file=sys.stderr,
    )
    return 0


def _status_sources(probes: ConnectionProbes, pipeline: EventPipeline, ring: _RingThread,
                    traced: TracedProcesses) -> StatusSources:
    """The status endpoint's view of the running daemon."""
    correlator = pipeline.correlator

    def listener_of(pid: int, fd: int) -> tuple[int | None, str | None]:
        listen = correlator.downstream.listen_sockets.get((pid, fd))
        return (listen.port, listen.listener_name) if listen else (None, None)

    def targets() -> dict[str, Any]:
        return traced.view(probes.entries_of)

    return StatusSources(
        probes_attached=lambda: True, ring_alive=ring.is_alive, ring_last_pass=lambda: ring.last_pass,
        records_submitted=probes.records_submitted,
        records_received=lambda: pipeline.received,
        drops=lambda: {**{f"kernel.{k}": v for k, v in probes.drop_counts().items() if v},
                       **pipeline.drops()},
        counts=lambda: dict(pipeline.counts), export=pipeline.spans_out.stats, targets=targets,
        requests=probes.http_request_metrics if probes.config.sampling else dict,
        accepts=lambda: summarize.accepts_by_worker(probes, correlator), listener_of=listener_of)


def _start_worker_metrics(opts: DaemonOptions, probes: ConnectionProbes, pipeline: EventPipeline,
                          stacks: SymbolizedStacks, sources: StatusSources) -> WorkerMetrics | None:
    """Metrics from the kernel's tables and the correlator, to the spans' OTLP endpoint (if any)."""
    if opts.otlp is None or not opts.metrics_interval:
        return None
    correlator = pipeline.correlator

    def listen_sockets() -> dict[tuple[int, int], ListenSocket]:
        return correlator.downstream.listen_sockets  # replaced whole on each rescan

    metrics = WorkerMetrics.from_settings(
        opts.otlp, make_resource(), offcpu_totals=probes.offcpu_totals,
        round_histograms=probes.round_histograms, listen_sockets=listen_sockets,
        accepts=lambda: summarize.accepts_by_worker(probes, correlator),
        idle_wakes=lambda: idle_wakes_by_kind(probes.idle_wakes(), stacks.kernel),
        daemon_counters=sources.counters,
        kernel_metrics=[RequestMetrics(probes.http_request_metrics, listen_sockets),
                        ConnectionMetrics(probes.connection_metrics, listen_sockets),
                        AcceptQueueMetrics(probes.accept_queue_metrics, listen_sockets),
                        TlsHandshakeMetrics(probes.tls_handshake_metrics, listen_sockets)]
        if probes.config.sampling else (),
        interval_s=opts.metrics_interval)
    metrics.start()
    log.info("exporting per-worker metrics every %g s", opts.metrics_interval)
    return metrics


# ---------------------------------------------------------------------------------------------------------


def _rescan(traced: TracedProcesses, listeners: ListenerFinder, probes: ConnectionProbes,
            ring: _RingThread, known_ports: set[int]) -> tuple[set[int], dict[tuple[int, int], ListenSocket]]:
    """Read the traced processes' listening sockets again, tell the kernel their ports when they changed
    (``known_ports``: the ports it has) and the correlator the sockets; returns the ports and the sockets
    by (pid, fd)."""
    traced.refresh_threads()
    sockets = {}
    for t in traced.processes:
        sockets.update(listeners.sockets(t.pid))
    ports = {s.port for s in sockets.values()}
    if ports != known_ports:
        probes.set_listen_ports(ports)
    ring.context.put(ListenSocketsContext(sockets).to_json())
    return ports, sockets


def report_new_drops(probes: ConnectionProbes, before: dict[str, int]) -> dict[str, int]:
    """Warn (one line per rescan interval at most) when the kernel side dropped records since the last
    look: above the rate the daemon can follow, request spans go missing and this says so while it runs,
    not only in the summary at exit."""
    now = probes.drop_counts()
    new = {k: v - before.get(k, 0) for k, v in now.items() if v > before.get(k, 0)}
    if new:
        log.warning("kernel dropped records in the last %.0f s (%s): the daemon is behind; spans of the "
                    "connections and requests concerned are incomplete", RESCAN_INTERVAL_S,
                    ", ".join(f"{k}={v}" for k, v in sorted(new.items())))
    return now


#: How often the kernel's stack table is swept of the stacks no record names any more (stacks/source.py).
STACK_SWEEP_S = 30.0


async def _sweep_stacks(probes: ConnectionProbes, stacks: SymbolizedStacks) -> None:
    """Every :data:`STACK_SWEEP_S`: the kernel's stack table loses the stacks no record named for a minute
    (those its idle wake-up totals name stay: they are read at the end)."""
    def sweep() -> int:
        keep = {waker_stack for _tid, _tgid, waker_stack in probes.idle_wakes()}
        return stacks.sweep(probes.stack_ids(), keep, probes.delete_stack)

    while True:
        await asyncio.sleep(STACK_SWEEP_S)
        try:
            swept = await asyncio.to_thread(sweep)
        except Exception as exc:  # a failed sweep leaves the table as it was: tracing goes on
            log.warning("sweeping the kernel's stack table failed: %s", exc)
            continue
        if swept:
            log.info("let go of %d stacks no record named for %.0f s", swept, IDLE_S)


def _sample_tls_listener(probes: ConnectionProbes, key: tuple[int, int], port: int) -> None:
    """A listening socket a TLS connection came through is handed to the kernel at once (on the ring
    thread, as the connection is correlated): from then on it samples that listener's connections whole,
    as it cannot see their requests. Until then each of its connections is traced whole: at 4 000
    connections a second, a hand-over four times a second let ~1 000 through per daemon start."""
    try:
        probes.sample_connections_of({key: port})
    except Exception as e:
        log.warning("could not sample the connections of the TLS listener on port %d: %s", port, e)
        return
    log.info("sampling whole connections of the TLS listener on port %d", port)


async def _poll_admin(admin_url: str, ring: _RingThread, chains: list[dict] | None) -> list[dict] | None:
    """Envoy's listener names and, when it changed, what selects its filter chains, to the ring thread;
    returns the filter-chain configuration now in force. The daemon's own admin connections are told to
    the correlator first (no span is made of them)."""

    def own(address: str, port: int) -> None:
        ring.context.put(OwnConnectionContext(address, port).to_json())

    try:
        names = await fetch_listener_names(admin_url, own_connection=own)
    except AdminError as exc:
        log.warning("%s", exc)
        return chains
    ring.context.put(ListenerNamesContext(names).to_json())
    latest = await _listener_config(admin_url, own_connection=own)
    if latest is not None and latest != chains:
        log.info("listener configuration changed: filter chains of %d listeners", len(latest))
        ring.context.put(FilterChainsContext(latest).to_json())
        return latest
    return chains


async def _wait(opts: DaemonOptions, loop: asyncio.AbstractEventLoop, notices: asyncio.Queue[tuple[int, int]],
                traced: TracedProcesses, listeners: ListenerFinder, probes: ConnectionProbes,
                ring: _RingThread, known_ports: set[int], chains: list[dict] | None) -> None:
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    def all_exited() -> None:
        log.warning("every traced process has exited (%s): stopping", traced.describe())
        stop.set()

    # With --pid alone the run ends with its processes; else processes come and go (EV_EXEC, EV_EXIT).
    unwatch = watch_exits(loop, list(traced.by_pid), all_exited) if not traced.follow_comm else (lambda: None)
    deadline = loop.time() + opts.duration if opts.duration else None
    next_rescan = loop.time() + RESCAN_INTERVAL_S
    dropped: dict[str, int] = {}
    try:
        while not stop.is_set() and ring.is_alive():
            now = loop.time()
            if deadline is not None and now >= deadline:
                break
            timeout = min(next_rescan, deadline or next_rescan) - now
            waiter = asyncio.ensure_future(notices.get())
            stopper = asyncio.ensure_future(stop.wait())
            await asyncio.wait({waiter, stopper}, timeout=max(timeout, 0.01),
                               return_when=asyncio.FIRST_COMPLETED)
            stopper.cancel()
            noticed = [waiter.result()] if waiter.done() and not waiter.cancelled() else []
            waiter.cancel()
            while not notices.empty():
                noticed.append(notices.get_nowait())
            for kind, pid in noticed:
                if kind == EV_EXEC:
                    if traced.started(pid) is not None:
                        ring.context.put(ProcessResourceContext(pid, traced.resources[pid]).to_json())
                    listeners.refresh(pid)
                elif kind == EV_LISTEN:  # maybe a socket handed over by another process (hot restart)
                    listeners.refresh(pid)
                elif kind == EV_EXIT:
                    tids = traced.exited(pid)
                    if tids is not None:  # its metric series go once their last values were exported
                        ring.context.put(ProcessResourceContext(pid, None).to_json())
                        listeners.forget(pid)
                        loop.call_later(SERIES_GRACE_S + (opts.metrics_interval or 0), probes.remove_series,
                                        pid, tids)
            if noticed or loop.time() >= next_rescan:
                await asyncio.sleep(0.05)  # listen() returns before /proc shows the socket as LISTEN
                known_ports, _ = _rescan(traced, listeners, probes, ring, known_ports)
                dropped = report_new_drops(probes, dropped)
                if opts.envoy_admin:
                    chains = await _poll_admin(opts.envoy_admin, ring, chains)
                next_rescan = loop.time() + RESCAN_INTERVAL_S
    finally:
        unwatch()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)

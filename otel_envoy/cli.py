"""Command line: run, record, replay, show, doctor. Bad input: one line on stderr, non-zero exit."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import time

from . import __version__
from .export.sink_worker import DEFAULT_BUFFER_BYTES

__all__ = ["main"]

DEFAULT_OUTPUT = "./otel-envoy-traces.jsonl"
DEFAULT_EXPORT_BUFFER_MB = DEFAULT_BUFFER_BYTES / (1 << 20)
EXIT_USAGE, EXIT_FAILURE = 2, 1


def _fail(message: str, code: int = EXIT_FAILURE) -> int:
    print(f"otel-envoy: {message}", file=sys.stderr)
    return code


def _add_target_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pid", type=int, action="append", default=[], metavar="PID",
                   help="Envoy process to trace (repeatable)")
    p.add_argument("--comm", help="trace every process with this command name: those running and those "
                   "that start later, each from its first instruction (e.g. envoy). Without --pid, --comm or "
                   "--exe: every Envoy on the node (comm envoy)")
    p.add_argument("--listen", metavar="[HOST:]PORT", help="serve /healthz, /metrics (Prometheus) and "
                   "/targets over HTTP (HOST: an IP address, 127.0.0.1 when left out)")
    p.add_argument("--exe", metavar="PATH", help="trace every process running this executable, those running "
                   "and those that start later")
    p.add_argument("--envoy-admin", metavar="URL", help="Envoy admin API, e.g. http://127.0.0.1:9901")
    p.add_argument("--duration", type=float, metavar="SECONDS", help="stop after this long")
    p.add_argument("--ready-file", help=argparse.SUPPRESS)
    p.add_argument("--summary-json", metavar="FILE", help="write counts and drops as JSON at exit")
    p.add_argument("--any-process", action="store_true",
                   help="allow targets that do not look like Envoy (testing)")
    p.add_argument("--no-requests", dest="requests", action="store_false",
                   help="connection spans only: do not capture and parse plaintext HTTP requests")
    p.add_argument("--request-detail", choices=("summary", "full"), default="summary",
                   help="a sampled plaintext HTTP/1.x request: one kernel record (request line, first "
                        "headers, traceparent, status, times: the default), or its reads and writes parsed "
                        "(response headers, body sizes, pipelining, h2c upgrades; more CPU per request)")
    p.add_argument("--tls-handshake-detail", choices=("summary", "full"), default="summary",
                   help="a traced TLS connection's handshake: one kernel record at its end, with the "
                        "ClientHello and the server's hello flight (the default), or a record per handshake "
                        "transfer (more CPU per connection; the same spans)")
    p.add_argument("--no-offcpu", dest="offcpu", action="store_false",
                   help="no scheduler probes: no off-CPU waits inside event-loop rounds")
    p.add_argument("--offcpu-threshold", type=float, default=1.0, metavar="MS",
                   help="off-CPU waits at least this long become offcpu.wait spans (default 1 ms)")
    p.add_argument("--round-threshold", type=float, default=10.0, metavar="MS",
                   help="event-loop rounds at least this long become spans; rounds holding an off-CPU wait "
                        "always do (default 10 ms)")
    p.add_argument("--symbols", action="append", default=[], metavar="FILE",
                   help="unstripped copy or debug file of a traced binary, matched by build-id (repeatable)")
    p.add_argument("--sampler", metavar="NAME",
                   help="which requests are traced: parentbased_traceidratio (default), "
                        "parentbased_always_on, parentbased_always_off, always_on, always_off, traceidratio "
                        "(else OTEL_TRACES_SAMPLER)")
    p.add_argument("--sampler-arg", metavar="RATIO",
                   help="the *traceidratio samplers' ratio, 0 to 1 (else OTEL_TRACES_SAMPLER_ARG; default "
                        "0.01 with parentbased_traceidratio, 1 with traceidratio)")
    p.add_argument("--keep-slow-ms", type=float, default=None, metavar="MS",
                   help="a request that was not sampled is traced all the same when its answer takes this "
                        "long (default 1000; 0: never); 5xx and requests closed before an answer always are")
    p.add_argument("--keep-slow-handshake-ms", type=float, default=None, metavar="MS",
                   help="a TLS connection that was not sampled is traced all the same when its handshake "
                        "took this long (default 1000; 0: never); failed handshakes and resets always are")
    p.add_argument("--keep-slow-accept-ms", type=float, default=None, metavar="MS",
                   help="a TLS connection that was not sampled is traced all the same when it waited this "
                        "long in the accept queue (default 100; 0: never)")
    p.add_argument("--keep-rate", type=float, default=None, metavar="N",
                   help="requests and connections kept all the same: at most N a second (default 0: no "
                        "ceiling; the CPU budget lowers the rate once the ratio is at its floor); the others "
                        "are counted")
    p.add_argument("--cpu-budget", type=float, default=None, metavar="SHARE",
                   help="share of one CPU the daemon may use; past it fewer plaintext requests are traced "
                        "(default 0.1; 0: no budget)")


def _add_export_args(p: argparse.ArgumentParser, default_output: bool) -> None:
    p.add_argument("--otlp-endpoint", metavar="URL",
                   help="OTLP endpoint (else OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT)")
    p.add_argument("--otlp-protocol", choices=["grpc", "http/protobuf"],
                   help="OTLP protocol (else OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL, default http/protobuf)")
    p.add_argument("--output", metavar="FILE",
                   help="OTLP/JSON lines file" + (f" (default {DEFAULT_OUTPUT} when no OTLP endpoint is set)"
                                                  if default_output else ""))


def build_parser() -> argparse.ArgumentParser:
    """The argparse tree of all subcommands."""
    parser = argparse.ArgumentParser(prog="otel-envoy", description=__doc__)
    parser.add_argument("--version", action="version", version=f"otel-envoy {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the daemon does")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="trace Envoy processes and export spans")
    _add_target_args(run)
    _add_export_args(run, default_output=True)
    run.add_argument("--record", metavar="FILE", help="also save the raw event stream (see replay)")
    run.add_argument("--export-buffer-mb", type=float, default=None, metavar="MIB",
                     help="per span destination, how much of what it could not take yet (a collector "
                          "restarting) is kept to send again; past it the oldest is dropped, counted "
                          f"(default {DEFAULT_EXPORT_BUFFER_MB:g})")
    run.add_argument("--metrics-interval", type=float, metavar="SECONDS",
                     help="export per-worker metrics to the OTLP endpoint this often; 0: no metrics "
                          "(default OTEL_METRIC_EXPORT_INTERVAL, else 10 s; OTEL_METRICS_EXPORTER=none: off)")

    rec = sub.add_parser("record", help="save the raw event stream of a live run (no spans)")
    _add_target_args(rec)
    rec.add_argument("--events", metavar="FILE", required=True, help="event stream file to write")

    rep = sub.add_parser("replay", help="turn a recorded event stream into spans (no root needed)")
    rep.add_argument("events", metavar="FILE")
    _add_export_args(rep, default_output=True)

    show = sub.add_parser("show", help="draw the traces of an OTLP/JSON lines file as waterfalls")
    show.add_argument("file", metavar="FILE")
    show.add_argument("--limit", type=int, default=None, help="draw at most this many traces")
    show.add_argument("--trace-id", help="draw only this trace")

    doc = sub.add_parser("doctor", help="report which probes can attach on this host")
    doc.add_argument("--pid", type=int, help="also inspect this process's binary")
    doc.add_argument("--symbols", action="append", default=[], metavar="FILE",
                     help="unstripped copy or debug file of that binary, matched by build-id (repeatable)")
    return parser


def _otlp_and_output(args: argparse.Namespace):
    from .export.otlp import resolve_otlp_settings

    otlp = resolve_otlp_settings(args.otlp_endpoint, args.otlp_protocol)
    output = args.output or (None if otlp is not None else DEFAULT_OUTPUT)
    return otlp, output


def _cmd_run(args: argparse.Namespace, record_only: bool) -> int:
    from .daemon import DaemonOptions, run_daemon
    from .sampling import SamplerError, sampler_settings

    try:
        sampler = sampler_settings(args.sampler, args.sampler_arg)
    except SamplerError as exc:
        return _fail(str(exc), EXIT_USAGE)
    from .sampling import DEFAULT_CPU_BUDGET, KeepThresholds

    thresholds = {}
    for flag, field_name in (("keep_slow_ms", "request_ms"), ("keep_slow_handshake_ms", "handshake_ms"),
                             ("keep_slow_accept_ms", "accept_ms"), ("keep_rate", "rate")):
        value = getattr(args, flag)
        if value is not None and not 0 <= value <= 1e6:  # false for NaN too
            return _fail(f"--{flag.replace('_', '-')} {value} is out of range (0 to 1e6)", EXIT_USAGE)
        if value is not None:
            thresholds[field_name] = value
    cpu_budget = DEFAULT_CPU_BUDGET if args.cpu_budget is None else args.cpu_budget
    if not 0.0 <= cpu_budget <= os.cpu_count():  # false for NaN too
        return _fail(f"--cpu-budget {args.cpu_budget} is out of range (0 to {os.cpu_count()} CPUs)",
                     EXIT_USAGE)
    buffer_mb = getattr(args, "export_buffer_mb", None)
    buffer_mb = DEFAULT_EXPORT_BUFFER_MB if buffer_mb is None else buffer_mb
    if not 0.0 < buffer_mb <= 1 << 20:  # false for NaN too
        return _fail(f"--export-buffer-mb {buffer_mb} is out of range (more than 0, at most 1048576)",
                     EXIT_USAGE)
    if os.geteuid() != 0:
        return _fail("must run as root: loading BPF programs needs CAP_BPF/CAP_PERFMON/CAP_SYS_ADMIN")
    otlp, output = (None, None) if record_only else _otlp_and_output(args)
    from .export.metrics_settings import metrics_interval  # per-worker metrics: --metrics-interval
    from .status import StatusError, parse_listen

    try:
        listen = parse_listen(args.listen) if args.listen else None
    except StatusError as exc:
        return _fail(str(exc), EXIT_USAGE)

    try:
        interval = None if record_only else metrics_interval(args.metrics_interval)
    except ValueError as exc:
        return _fail(str(exc), EXIT_USAGE)
    opts = DaemonOptions(
        pids=args.pid, comm=args.comm, exe=args.exe, envoy_admin=args.envoy_admin, otlp=otlp, output=output,
        record=args.events if record_only else args.record, duration=args.duration,
        require_envoy=not args.any_process, ready_file=args.ready_file, summary_json=args.summary_json,
        requests=args.requests, request_summary=args.request_detail == "summary",
        tls_handshake_summary=args.tls_handshake_detail == "summary", offcpu=args.offcpu,
        symbols=args.symbols,
        offcpu_min_ns=int(args.offcpu_threshold * 1e6), round_min_ns=int(args.round_threshold * 1e6),
        metrics_interval=interval, sampler=sampler, cpu_budget=cpu_budget, keep=KeepThresholds(**thresholds),
        export_buffer_bytes=int(buffer_mb * (1 << 20)),
        listen=listen,
    )
    if args.offcpu_threshold < 0 or args.round_threshold < 0:
        return _fail("--offcpu-threshold and --round-threshold must not be negative", EXIT_USAGE)
    return asyncio.run(run_daemon(opts))


def _cmd_replay(args: argparse.Namespace) -> int:
    from .daemon import make_resource
    from .envoy.process_resource import operator_keys
    from .event_pipeline import DamagedContextError, EventPipeline, tune_allocator, tune_garbage_collector
    from .events.recording import RecordingReader
    from .events.recording_context import recording_clock
    from .export.sinks import JsonLinesFileSink, OtlpSink
    from .export.span_queue import SpanPipeline
    from .spans.clock import MonotonicClock

    otlp, output = _otlp_and_output(args)
    if otlp is not None:
        from .export.otlp import check_reachable

        problem = check_reachable(otlp)
        if problem:
            return _fail(problem)
    items = iter(RecordingReader(args.events))
    first = next(items, None)
    try:
        clock = MonotonicClock(recording_clock(first).offset_ns)
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        return _fail(f"{args.events}: not a usable recording: {exc}")
    sinks = []
    if output:
        sinks.append(JsonLinesFileSink(output))
    if otlp is not None:
        sinks.append(OtlpSink.from_settings(otlp))
    spans_out = SpanPipeline(sinks, block_when_full=True)  # a replay waits for the sinks, drops nothing
    pipeline = EventPipeline(spans_out, make_resource(), clock, operator_keys=operator_keys())
    tune_garbage_collector()  # as in live runs
    tune_allocator()
    try:
        pipeline.replay(items)
    except DamagedContextError as exc:
        spans_out.shutdown(5.0)
        return _fail(f"{args.events}: {exc}")
    spans_out.shutdown(30.0)
    print(f"otel-envoy: replayed {pipeline.counts['events']} events into {pipeline.counts['connections']} "
          f"connections, {pipeline.counts['spans']} spans" + (f" -> {output}" if output else ""),
          file=sys.stderr)
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    from rich.console import Console

    from .export.terminal import render_file

    render_file(args.file, Console(), max_traces=args.limit, trace_id=args.trace_id)
    return 0


def _cmd_doctor(args: argparse.Namespace) -> int:
    from .features import binary_checks, host_checks

    checks = host_checks()
    if args.pid is not None:
        checks += binary_checks(args.pid, args.symbols)
    width = max(len(c.name) for c in checks)
    for c in checks:
        mark = "ok  " if c.ok else ("FAIL" if c.required else "no  ")
        print(f"{mark} {c.name:<{width}}  {c.detail}")
    impossible = [c for c in checks if c.required and not c.ok]
    uprobes = any(c.name == "uprobe-tier" and c.ok for c in checks)
    print("tracing: " + (f"possible (kernel tier{' + uprobe tier' if uprobes else ''})" if not impossible else
                         "IMPOSSIBLE: " + ", ".join(c.name for c in impossible)))
    return EXIT_FAILURE if impossible else 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `otel-envoy` command."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.Formatter.converter = time.gmtime
    from .daemon import UsageError
    from .envoy.process import TargetError
    from .events.recording import RecordingError
    from .features import FeatureError
    from .probes.loader import ProbeError
    from .status import StatusError

    try:
        if args.command == "run":
            return _cmd_run(args, record_only=False)
        if args.command == "record":
            return _cmd_run(args, record_only=True)
        if args.command == "replay":
            return _cmd_replay(args)
        if args.command == "show":
            return _cmd_show(args)
        return _cmd_doctor(args)
    except StatusError as exc:  # --listen: a bad address, or one that cannot be bound
        return _fail(str(exc), EXIT_USAGE)
    except (UsageError, TargetError, FeatureError, ProbeError, RecordingError, ValueError) as exc:
        return _fail(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    except OSError as exc:
        return _fail(f"{exc.filename or ''}{': ' if exc.filename else ''}{exc.strerror or exc}")
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

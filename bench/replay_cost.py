"""Replay cost per connection, by stage: decode -> correlate -> build spans -> OTLP/JSON encoding.

Reads a recording (default /tmp/prof/tls_new.events, a "new TLS connection per request" workload) into
memory once, then times, best and median of --rounds rounds:

  decode     Decoder.decode over every kernel record
  correlate  the correlator over the decoded events (span callbacks only keep the records they get)
  build      the span builders over those records (connection, request and upstream spans)
  json       encode_request_json over the spans in batches of --batch (what the JSON-lines sink does)
  pipeline   the whole EventPipeline.on_record path with span building (no export thread; spans are
             counted and freed, as exported spans are in a live run): the figure that matters, with
             "json" for the export thread

The garbage collector is tuned as the live daemon tunes it. All figures are us of CPU (process time)
per connection of the recording. The export thread of a live run does the JSON part; the ring-buffer
thread the rest.

--output FILE writes the spans of one full, single-threaded run (nothing dropped, batches of --batch)
as OTLP/JSON lines, for comparing outputs before and after a change (ids are random).
--profile prints a cProfile of one full run (pipeline + JSON encoding), sorted by own time.

Usage:  .venv/bin/python bench/replay_cost.py [RECORDING] [--rounds 5] [--output FILE] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import pstats
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from otel_envoy.daemon import make_resource  # noqa: E402
from otel_envoy.event_pipeline import EventPipeline, tune_allocator, tune_garbage_collector  # noqa: E402
from otel_envoy.events.recording import RecordingReader  # noqa: E402
from otel_envoy.export.otlp_json import encode_request_json  # noqa: E402
from otel_envoy.spans.clock import MonotonicClock  # noqa: E402

DEFAULT_RECORDING = Path("/tmp/prof/tls_new.events")


class _ListSpans:
    """Stands in for SpanPipeline: keeps the submitted spans (single-threaded, nothing dropped), or only
    counts them (``keep=False``: as in a live run, where exported spans are freed; keeping 46 000 spans
    alive costs garbage-collector passes a live run does not make)."""

    def __init__(self, keep: bool = True) -> None:
        self.spans: list[Any] = []
        self.keep = keep
        self.count = 0

    def submit(self, spans: list[Any]) -> int:
        self.count += len(spans)
        if self.keep:
            self.spans.extend(spans)
        return len(spans)

    def stats(self) -> dict[str, Any]:
        return {}


def load(path: Path) -> tuple[MonotonicClock, list[tuple[str, object]]]:
    """The clock and every later item of a recording, in memory."""
    items = list(RecordingReader(path))
    kind, first = items[0]
    if kind != "context" or not isinstance(first, dict) or first.get("type") != "clock":
        raise SystemExit(f"{path}: does not start with its clock record")
    return MonotonicClock(int(first["offset_ns"])), items[1:]


def new_pipeline(clock: MonotonicClock, spans: _ListSpans) -> EventPipeline:
    """An EventPipeline that hands its spans to ``spans`` (rounds built inline, as replay does)."""
    return EventPipeline(spans, make_resource(), clock)  # type: ignore[arg-type]


def run_pipeline(clock: MonotonicClock, items: list[tuple[str, object]],
                 keep: bool = True) -> tuple[EventPipeline, list[Any]]:
    """The full path, as `otel-envoy replay` runs it, minus the export thread."""
    out = _ListSpans(keep)
    pipeline = new_pipeline(clock, out)
    pipeline.replay(items)
    return pipeline, out.spans


def run_correlate_only(clock: MonotonicClock, items: list[tuple[str, object]],
                       decoded: list[Any]) -> tuple[float, list[tuple[Callable[..., list], tuple]]]:
    """Correlate pre-decoded events; the span callbacks only keep (builder, args). Returns CPU seconds."""
    out = _ListSpans()
    pipeline = new_pipeline(clock, out)
    calls: list[tuple[Callable[..., list], tuple]] = []

    def keep(what: str, build: Callable[..., list], *args: object, counts: object = None) -> None:
        calls.append((build, args))

    def keep_summary(*args: object) -> list:
        calls.append((pipeline.summary_spans.spans, args))
        return []

    pipeline._submit = keep  # type: ignore[method-assign]
    pipeline._summary_spans = keep_summary  # type: ignore[assignment]
    handle, on_context = pipeline.correlator.handle, pipeline.on_context
    correlator = pipeline.correlator
    events = iter(decoded)
    last = 0
    t0 = time.process_time()
    for kind, payload in items:
        if kind == "kernel":
            event = next(events)
            if event is not None:
                handle(event)
                last = max(last, correlator.latest_ns)
        else:
            on_context(payload)  # type: ignore[arg-type]
    pipeline.finish(last)
    return time.process_time() - t0, calls


def measure(clock: MonotonicClock, items: list[tuple[str, object]], batch: int) -> dict[str, float]:
    """CPU seconds of each stage over the whole recording (one round)."""
    raws = [p for k, p in items if k == "kernel"]
    decoder = new_pipeline(clock, _ListSpans()).decoder
    gc.collect()
    t0 = time.process_time()
    decoded = [decoder.decode(r) for r in raws]  # type: ignore[arg-type]
    t_decode = time.process_time() - t0

    gc.collect()
    t_correlate, calls = run_correlate_only(clock, items, decoded)

    gc.collect()
    t0 = time.process_time()
    spans: list[Any] = []
    for build, args in calls:
        spans.extend(build(*args))
    t_build = time.process_time() - t0

    gc.collect()
    t0 = time.process_time()
    for i in range(0, len(spans), batch):
        encode_request_json(spans[i : i + batch])
    t_json = time.process_time() - t0

    gc.collect()
    t0 = time.process_time()
    pipeline, _ = run_pipeline(clock, items, keep=False)
    t_pipeline = time.process_time() - t0
    del pipeline
    gc.collect()  # the pipeline object graph has cycles: not left for the next round's timing
    return {"decode": t_decode, "correlate": t_correlate, "build": t_build, "json": t_json,
            "pipeline": t_pipeline}


def write_output(clock: MonotonicClock, items: list[tuple[str, object]], path: Path, batch: int) -> int:
    """One full run's spans as OTLP/JSON lines, in batches of ``batch``; returns the span count."""
    _, spans = run_pipeline(clock, items)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(0, len(spans), batch):
            f.write(encode_request_json(spans[i : i + batch]))
            f.write("\n")
    return len(spans)


def profile(clock: MonotonicClock, items: list[tuple[str, object]], batch: int, limit: int) -> None:
    """cProfile of one full run plus its JSON encoding, by own time."""
    prof = cProfile.Profile()
    prof.enable()
    _, spans = run_pipeline(clock, items)
    for i in range(0, len(spans), batch):
        encode_request_json(spans[i : i + batch])
    prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(limit)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recording", type=Path, nargs="?", default=DEFAULT_RECORDING)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=1024, help="spans per OTLP/JSON request")
    parser.add_argument("--output", type=Path, help="write one run's spans here (OTLP/JSON lines)")
    parser.add_argument("--profile", action="store_true", help="print a cProfile of one full run")
    parser.add_argument("--limit", type=int, default=40, help="profile rows")
    args = parser.parse_args(argv)

    clock, items = load(args.recording)
    tune_allocator()
    tune_garbage_collector()  # as the live daemon runs (the recording in memory is frozen with it)
    if args.output:
        n = write_output(clock, items, args.output, args.batch)
        print(f"wrote {n} spans to {args.output}")
        return 0
    if args.profile:
        profile(clock, items, args.batch, args.limit)
        return 0
    pipeline, spans = run_pipeline(clock, items)  # warm-up, and the shape of the recording
    conns = pipeline.counts["connections"] or 1
    print(f"{args.recording}: {pipeline.counts['events']} events, {conns} connections, {len(spans)} spans, "
          f"drops {pipeline.drops()}")
    rounds = [measure(clock, items, args.batch) for _ in range(args.rounds)]
    print(f"{'stage':<12}{'best us/conn':>14}{'median us/conn':>16}")
    for stage in ("decode", "correlate", "build", "json", "pipeline"):
        values = [r[stage] / conns * 1e6 for r in rounds]
        print(f"{stage:<12}{min(values):>14.2f}{statistics.median(values):>16.2f}")
    totals = [sum(r[s] for s in ("decode", "correlate", "build", "json")) / conns * 1e6 for r in rounds]
    print(f"{'sum(4)':<12}{min(totals):>14.2f}{statistics.median(totals):>16.2f}")
    full = [(r["pipeline"] + r["json"]) / conns * 1e6 for r in rounds]
    print(f"{'pipe+json':<12}{min(full):>14.2f}{statistics.median(full):>16.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

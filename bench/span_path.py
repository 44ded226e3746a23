"""Span-path micro-benchmark: building spans and encoding them, per connection, on a real recording.

Replays tests/data/lab.events (kernel events of a real Envoy: plain HTTP, TLS 1.3 and 1.2, a reset, a
burst of plain connections) through the real decoder and correlator once, keeping the ConnectionRecord of
every connection. Then, per connection kind (plain / TLS), it times the three stages that cost daemon CPU
per traced connection after correlation:

  build   ConnectionSpanBuilder.build_records(conn)        (ring-buffer thread)
  json    encode_request_json(spans): the JSON-lines file sink's encoding (export thread)
  proto   encode_request_proto(spans): the OTLP gRPC / HTTP sinks' request body (export thread)

JSON and protobuf are timed twice: one request per connection ("json", "proto"), and in batches like the
export thread makes them ("json/batch", "proto/batch": --batch spans per request, us per connection).
--sdk adds the SDK reference path for comparison: the records as SDK ReadableSpans (the test oracle's
conversion, tests/support/sdk_oracle.py) encoded by the SDK's protobuf encoder.

Each figure is the best of --rounds rounds of about --calls calls (passes over the connections of a kind;
the round least disturbed by other load on the machine); the saved JSON also has the median of the rounds.

Usage:  .venv/bin/python bench/span_path.py [--rounds 9] [--calls 5000] [--batch 1024] [--sdk] [--save]
Prints a table; --save also writes bench/results/span_path-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from otel_envoy.correlate.records import ConnectionRecord  # noqa: E402
from otel_envoy.daemon import make_resource  # noqa: E402
from otel_envoy.event_pipeline import EventPipeline  # noqa: E402
from otel_envoy.events.recording import RecordingReader  # noqa: E402
from otel_envoy.export.otlp_json import encode_request_json  # noqa: E402
from otel_envoy.export.otlp_json_decode import decode_request_json  # noqa: E402
from otel_envoy.export.otlp_proto import encode_request_proto  # noqa: E402
from otel_envoy.export.span_queue import SpanPipeline  # noqa: E402
from otel_envoy.spans.clock import MonotonicClock  # noqa: E402
from otel_envoy.spans.connection import ConnectionSpanBuilder  # noqa: E402
from tests.support.sdk_oracle import readable_connection_spans, records_from_proto  # noqa: E402

RECORDING = ROOT / "tests" / "data" / "lab.events"
RESULTS = Path(__file__).resolve().parent / "results"


class _CollectingPipeline(EventPipeline):
    """An EventPipeline that keeps the correlator's ConnectionRecords instead of building spans."""

    def __init__(self, clock: MonotonicClock) -> None:
        self._sink_pipeline = SpanPipeline([])
        super().__init__(self._sink_pipeline, make_resource(), clock)
        self.connections: list[ConnectionRecord] = []

    def _on_connection(self, conn: ConnectionRecord) -> None:
        self.connections.append(conn)


def collect_connections(path: Path = RECORDING) -> tuple[list[ConnectionRecord], MonotonicClock]:
    """Replay a recording (as `otel-envoy replay` does) and return its connections and clock."""
    items = iter(RecordingReader(path))
    kind, first = next(items)
    if kind != "context" or not isinstance(first, dict) or first.get("type") != "clock":
        raise SystemExit(f"{path}: does not start with its clock record")
    clock = MonotonicClock(int(first["offset_ns"]))
    pipeline = _CollectingPipeline(clock)
    pipeline.replay(items)
    pipeline._sink_pipeline.shutdown(1.0)
    return pipeline.connections, clock


def is_tls(conn: ConnectionRecord) -> bool:
    """A connection whose ClientHello was seen (its trace has a tls.handshake span)."""
    return conn.tls.handshake is not None and conn.tls.handshake.client_hello is not None


def time_per_item(
    fn: Callable[[Any], object], items: Sequence[Any], iterations: int, rounds: int
) -> tuple[float, float]:
    """(best, median) over rounds of the seconds one ``fn(item)`` takes, averaged over ``iterations``."""
    samples = []
    for _ in range(rounds):
        gc.collect()  # (does not enable a disabled collector)
        t0 = time.perf_counter_ns()
        for _ in range(iterations):
            for item in items:
                fn(item)
        samples.append((time.perf_counter_ns() - t0) / (iterations * len(items)) / 1e9)
    return min(samples), statistics.median(samples)


def batches_of(span_lists: list[list[Any]], batch: int) -> tuple[list[list[Any]], float]:
    """The spans of the connections, repeated, cut into batches of ``batch`` spans; and connections/batch."""
    spans_per_conn = sum(map(len, span_lists)) / len(span_lists)
    flat: list[Any] = []
    while len(flat) < batch:
        for spans in span_lists:
            flat.extend(spans)
    flat = flat[:batch]
    return [flat], len(flat) / spans_per_conn


def check_outputs(records: list[Any]) -> None:
    """The encodings decode back to the records (a cheap guard against benchmarking a broken encoder).

    An array attribute may be a tuple (a client's shared cipher-suite names) and decodes as a list: the
    expected records have lists.
    """
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    expected = [dataclasses.replace(r, attributes={k: list(v) if type(v) is tuple else v
                                                   for k, v in r.attributes.items()}) for r in records]
    from_json = decode_request_json(json.loads(encode_request_json(records)))
    from_proto = records_from_proto(ExportTraceServiceRequest.FromString(encode_request_proto(records)))
    if from_json != expected or from_proto != expected:
        raise SystemExit("encoders do not round-trip the records: not benchmarking")


def measure(
    conns: list[ConnectionRecord], clock: MonotonicClock, args: argparse.Namespace
) -> dict[str, dict[str, float]]:
    """us/conn and us/span of every stage for one group of connections."""
    builder = ConnectionSpanBuilder(make_resource(), clock)
    records = [builder.build_records(c) for c in conns]
    check_outputs([r for rs in records for r in rs])
    spans_per_conn = sum(map(len, records)) / len(records)
    rounds = args.rounds
    it = max(1, args.calls // len(conns))  # passes over the connections per round
    stages: dict[str, tuple[float, float]] = {
        "build": time_per_item(builder.build_records, conns, it, rounds),
        "json": time_per_item(encode_request_json, records, it, rounds),
        "proto": time_per_item(encode_request_proto, records, it, rounds),
    }
    batch, per_batch = batches_of(records, args.batch)
    batch_iterations = max(1, it * len(conns) // max(1, int(per_batch)))
    for name, fn in (("json/batch", encode_request_json), ("proto/batch", encode_request_proto)):
        best, median = time_per_item(fn, batch, batch_iterations, rounds)
        stages[name] = (best / per_batch, median / per_batch)
    if args.sdk:
        from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

        def sdk_build(conn: ConnectionRecord) -> list[Any]:
            return readable_connection_spans(builder, conn)

        readable = [sdk_build(c) for c in conns]
        stages["sdk:build"] = time_per_item(sdk_build, conns, it, rounds)
        stages["sdk:proto"] = time_per_item(
            lambda spans: encode_spans(spans).SerializeToString(), readable, max(1, it // 5), rounds
        )
    return {
        name: {
            "us_per_conn": best * 1e6,
            "us_per_span": best * 1e6 / spans_per_conn,
            "median_us_per_conn": median * 1e6,
        }
        for name, (best, median) in stages.items()
    } | {"_shape": {"connections": len(conns), "spans_per_conn": spans_per_conn}}


def print_table(results: dict[str, Any]) -> None:
    """Stage rows, one us/conn and us/span column pair per connection kind, and the totals."""
    kinds = [k for k in ("plain", "tls") if k in results]
    header = f"{'stage':<14}" + "".join(f"{k + ' us/conn':>16}{k + ' us/span':>16}" for k in kinds)
    print(header)
    print("-" * len(header))
    stages = [s for s in results[kinds[0]] if not s.startswith("_")]
    for stage in stages:
        row = f"{stage:<14}"
        for k in kinds:
            r = results[k][stage]
            row += f"{r['us_per_conn']:>16.2f}{r['us_per_span']:>16.2f}"
        print(row)
    print("-" * len(header))
    for label, parts in (("build+json", ("build", "json/batch")), ("build+proto", ("build", "proto/batch"))):
        row = f"{label:<14}"
        for k in kinds:
            total = sum(results[k][p]["us_per_conn"] for p in parts)
            row += f"{total:>16.2f}{total / results[k]['_shape']['spans_per_conn']:>16.2f}"
        print(row)
    shapes = ", ".join(
        f"{k}: {results[k]['_shape']['connections']} connections, "
        f"{results[k]['_shape']['spans_per_conn']:.1f} spans each"
        for k in kinds
    )
    print(f"({shapes}; totals use the batched encodings)")


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns the exit code."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--recording", type=Path, default=RECORDING)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--calls", type=int, default=5000, help="calls per stage and round (about)")
    parser.add_argument("--batch", type=int, default=1024, help="spans per request in the batched runs")
    parser.add_argument("--sdk", action="store_true", help="also time the SDK ReadableSpan reference path")
    parser.add_argument("--no-gc", action="store_true", help="time with the cyclic garbage collector off")
    parser.add_argument("--save", action="store_true", help="write bench/results/span_path-<timestamp>.json")
    args = parser.parse_args(argv)

    conns, clock = collect_connections(args.recording)
    if args.no_gc:
        gc.disable()
    groups = {"plain": [c for c in conns if not is_tls(c)], "tls": [c for c in conns if is_tls(c)]}
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    results: dict[str, Any] = {k: measure(v, clock, args) for k, v in groups.items() if v}
    print_table(results)
    if args.save:
        RESULTS.mkdir(exist_ok=True)
        out = RESULTS / f"span_path-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}.json"
        doc = {
            "started": started,
            "recording": os.path.relpath(args.recording, ROOT),
            "args": {k: v for k, v in vars(args).items() if k != "recording"},
            "machine": {
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "kernel": platform.release(),
                "loadavg_1m": os.getloadavg()[0],
            },
            "results": results,
        }
        out.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"wrote {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Replaying the committed real recording (tests/data/lab.events), as the CLI and in this process.

The recording holds the kernel events of a real Envoy serving, in order: curl plain HTTP, curl TLS 1.3
(SNI a.example.com), openssl s_client TLS 1.2 (SNI b.example.com), a client that resets, and a burst of
20 plain connections; tests/data/lab.events.json has the client ports (see tests/data/make_recording.py).
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from opentelemetry.sdk.resources import Resource

from otel_envoy.event_pipeline import EventPipeline
from otel_envoy.events.recording import MAGIC, RecordingReader
from otel_envoy.events.recording_context import recording_clock
from otel_envoy.export.otlp_json import encode_request_json
from otel_envoy.export.otlp_json_decode import decode_request_json
from otel_envoy.export.sinks import SpanSink
from otel_envoy.export.span_queue import ExportSpan, SpanPipeline
from otel_envoy.spans.clock import MonotonicClock
from otel_envoy.spans.model import SpanRecord
from tests.support.traces import group_traces

__all__ = ["CLIENT", "DATA", "META", "RECORDING", "RECORD_HEAD", "RESET_PAYLOAD", "ROOT", "SERVER",
           "CollectingSink", "assert_one_line_error", "cli", "read_jsonl", "record_boundaries", "records_of",
           "replay_cli", "replay_in_process", "structure"]

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "tests" / "data"
RECORDING = DATA / "lab.events"
META: dict[str, Any] = json.loads((DATA / "lab.events.json").read_text())
RESET_PAYLOAD = b"GET / HTTP/1.1\r\nHost: lab\r\n"  # what clients.reset_client sends before its RST
SERVER, CLIENT = 2, 3  # span kinds as OTLP/JSON numbers them
RECORD_HEAD = struct.Struct("<BI")  # a recording's record header: type, length


def cli(*args: str | Path, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    """Run `python -m otel_envoy.cli ARGS` with no OTLP endpoint in the environment."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    return subprocess.run([sys.executable, "-m", "otel_envoy.cli", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120, check=False)


def read_jsonl(path: Path) -> list[SpanRecord]:
    """The spans of an OTLP/JSON lines file."""
    return [s for line in path.read_text().splitlines() if line.strip()
            for s in decode_request_json(json.loads(line))]


def assert_one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    """Exit 1, exactly one stderr line starting with "otel-envoy: ", no traceback."""
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("otel-envoy: "), proc.stderr
    assert proc.returncode == 1, (proc.returncode, proc.stderr)
    return lines[0]


def replay_cli(tmp_path: Path, name: str = "out.jsonl") -> tuple[list[SpanRecord], str]:
    """`otel-envoy replay` of the committed recording into ``tmp_path / name``: its spans and stderr."""
    out = tmp_path / name
    proc = cli("replay", RECORDING, "--output", out)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    return read_jsonl(out), proc.stderr


class CollectingSink(SpanSink):
    """Keeps every exported span (and checks that each batch encodes as OTLP/JSON)."""

    name = "memory"

    def __init__(self) -> None:
        self.spans: list[ExportSpan] = []
        self.lines: list[str] = []

    def export(self, spans: Sequence[ExportSpan]) -> bool:
        self.lines.append(encode_request_json(spans))
        self.spans.extend(spans)
        return True


def replay_in_process(records: list[tuple[str, object]] | None = None
                      ) -> tuple[EventPipeline, CollectingSink]:
    """What `replay` does, in this process: the clock record first, then kernel and context records."""
    items = records if records is not None else list(RecordingReader(RECORDING))
    clock = recording_clock(items[0])
    sink = CollectingSink()
    spans_out = SpanPipeline([sink])
    pipeline = EventPipeline(spans_out, Resource.create({"service.name": "replay-test"}),
                             MonotonicClock(clock.offset_ns))
    pipeline.replay(items[1:])
    spans_out.shutdown(30.0)
    return pipeline, sink


def records_of(sink: CollectingSink) -> list[SpanRecord]:
    """The sink's spans as decoded from the OTLP/JSON it encoded."""
    return [s for line in sink.lines for s in decode_request_json(json.loads(line))]


def _freeze(value: Any) -> Any:
    if isinstance(value, list | tuple):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    return value


def structure(spans: list[SpanRecord]) -> list[tuple]:
    """Everything about the traces except the random ids: names, nesting, times, attributes, status."""

    def sig(s: SpanRecord) -> tuple:
        return (s.name, s.kind, s.start_ns, s.end_ns, _freeze(s.attributes), _freeze(s.events),
                s.status_code, s.status_message)

    out = []
    for trace in group_traces(spans).values():
        root = trace.root
        by_id = {s.span_id: s for s in trace.spans}
        children = []
        for s in trace.spans:
            if s is root:
                continue
            children.append((by_id[s.parent_span_id].name, sig(s)))  # type: ignore[index]
        out.append((sig(root), tuple(sorted(children))))
    return sorted(out)


def record_boundaries(path: Path) -> list[int]:
    """Byte offsets where each record of a recording starts (parsed here, independently of the reader)."""
    raw = path.read_bytes()
    assert raw.startswith(MAGIC)
    pos, starts = len(MAGIC), []
    while pos < len(raw):
        starts.append(pos)
        _, length = RECORD_HEAD.unpack_from(raw, pos)
        pos += RECORD_HEAD.size + length
    assert pos == len(raw)
    return starts

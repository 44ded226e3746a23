"""`otel-envoy replay` of the committed real recording (tests/data/lab.events), and recording files.

The recording holds the kernel events of a real Envoy serving, in order: curl plain HTTP, curl TLS 1.3
(SNI a.example.com), openssl s_client TLS 1.2 (SNI b.example.com), a client that resets, and a burst of
20 plain connections; tests/data/lab.events.json has the client ports (see tests/data/make_recording.py).
Replays run both as the real CLI (a subprocess) and in-process through EventPipeline.
"""

from __future__ import annotations

import json
import os
import random
import re
import struct
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.resources import Resource

from otel_envoy.events.layout import load_layout
from otel_envoy.events.recording import MAGIC, RecordingError, RecordingReader, RecordingWriter
from otel_envoy.export.otlp_json import encode_request_json
from otel_envoy.export.otlp_json_decode import decode_request_json
from otel_envoy.export.sinks import SpanSink
from otel_envoy.export.span_queue import ExportSpan, SpanPipeline
from otel_envoy.pipeline import EventPipeline
from otel_envoy.spans.clock import MonotonicClock
from otel_envoy.spans.model import STATUS_CODE_ERROR, STATUS_CODE_UNSET, SpanRecord
from tests.support.events import accept, close, encode, established, read
from tests.support.traces import Trace, connection_traces, group_traces

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "tests" / "data"
RECORDING = DATA / "lab.events"
META: dict[str, Any] = json.loads((DATA / "lab.events.json").read_text())
RESET_PAYLOAD = b"GET / HTTP/1.1\r\nHost: lab\r\n"  # what clients.reset_client sends before its RST
SERVER, CLIENT = 2, 3
_HEAD = struct.Struct("<BI")


# ---------------------------------------------------------------------------------------------- helpers


def cli(*args: str | Path, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    """Run `python -m otel_envoy.cli ARGS` with no OTLP endpoint in the environment."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    return subprocess.run([sys.executable, "-m", "otel_envoy.cli", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120, check=False)


def read_jsonl(path: Path) -> list[SpanRecord]:
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
    kind, clock = items[0]
    assert kind == "context" and clock["type"] == "clock"  # type: ignore[index]
    sink = CollectingSink()
    spans_out = SpanPipeline([sink])
    pipeline = EventPipeline(spans_out, Resource.create({"service.name": "replay-test"}),
                             MonotonicClock(int(clock["offset_ns"])))  # type: ignore[index]
    pipeline.replay(items[1:])
    spans_out.shutdown(30.0)
    return pipeline, sink


def records_of(sink: CollectingSink) -> list[SpanRecord]:
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
        _, length = _HEAD.unpack_from(raw, pos)
        pos += _HEAD.size + length
    assert pos == len(raw)
    return starts


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def cli_spans(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[SpanRecord], str]:
    return replay_cli(tmp_path_factory.mktemp("replay"))


@pytest.fixture(scope="module")
def in_process() -> tuple[EventPipeline, CollectingSink]:
    return replay_in_process()


@pytest.fixture(scope="module")
def traces(cli_spans: tuple[list[SpanRecord], str]) -> dict[int, Trace]:
    return connection_traces(cli_spans[0])


# ---------------------------------------------------------------------------------------------- the recording


def test_cli_replay_gives_24_connections(cli_spans: tuple[list[SpanRecord], str],
                                         traces: dict[int, Trace]) -> None:
    spans, stderr = cli_spans
    m = re.search(r"replayed (\d+) events into (\d+) connections, (\d+) spans", stderr)
    assert m, stderr
    assert int(m.group(2)) == 24 and int(m.group(3)) == len(spans)
    assert len(traces) == 24
    # no other traces: the TLS clients' requests (encrypted downstream, seen only on the way upstream) sit
    # in their TLS connection's trace, tied to it by the event-loop round
    others = [t for t in group_traces(spans).values() if t.root.name != "envoy.downstream.connection"]
    assert not others, [t.root.name for t in others]
    for port, trace in traces.items():
        trace.assert_nested()
        root = trace.root
        assert root.kind == SERVER
        assert root.attributes["process.pid"] == META["pid"]
        assert root.attributes["network.peer.address"] == "127.0.0.1"
        assert root.attributes["network.peer.port"] == port
        assert root.attributes["network.local.port"] in (META["http_port"], META["tls_port"])
        assert root.attributes["thread.name"].startswith("wrk:worker_")
        assert "otel_envoy.partial" not in root.attributes, (port, root.attributes)
        assert "envoy.connection.still_open" not in root.attributes
        assert trace.child("tcp.accept_queue").attributes["tcp.accept_queue.depth"] >= 1
        trace.child("envoy.listener_filters")


def test_in_process_replay_gives_24_connections(in_process: tuple[EventPipeline, CollectingSink]) -> None:
    pipeline, sink = in_process
    assert pipeline.counts["connections"] == 24
    assert pipeline.counts["spans"] == len(sink.spans)
    assert pipeline.drops() == {}  # a clean recording decodes and correlates without losses
    assert all(isinstance(s, SpanRecord) for s in sink.spans)  # the builder's records, not SDK spans
    roots = [s for s in sink.spans if s.parent_span_id is None]  # type: ignore[union-attr]
    assert sum(r.name == "envoy.downstream.connection" for r in roots) == 24  # type: ignore[union-attr]
    assert len({s.trace_id for s in sink.spans}) == len(roots)  # type: ignore[union-attr]
    assert all(s.resource_attributes["service.name"] == "replay-test" for s in sink.spans)  # type: ignore[union-attr]


def test_plain_connection(traces: dict[int, Trace]) -> None:
    trace = traces[META["plain"]]
    root = trace.root
    assert sorted(s.name for s in trace.spans) == [
        "GET", "GET", "envoy.downstream.connection", "envoy.listener_filters", "envoy.upstream.connection",
        "tcp.accept_queue", "tcp.connect"]
    trace.assert_nested()
    server = next(s for s in trace.spans if s.name == "GET" and s.kind == SERVER)
    client = next(s for s in trace.spans if s.name == "GET" and s.kind != SERVER)
    upstream = trace.child("envoy.upstream.connection")
    assert server.parent_span_id == root.span_id and client.parent_span_id == server.span_id
    assert upstream.parent_span_id == server.span_id  # this request made Envoy connect
    assert server.attributes["http.request.method"] == "GET" and server.attributes["url.path"] == "/"
    assert server.attributes["http.response.status_code"] == 200
    assert client.attributes["server.port"] == upstream.attributes["network.peer.port"]
    assert server.start_ns <= client.start_ns <= client.end_ns <= server.end_ns
    assert root.attributes["envoy.connection.requests"] == 1
    a = root.attributes
    assert a["network.local.port"] == META["http_port"] and a["network.local.address"] == "127.0.0.1"
    assert a["envoy.connection.bytes_received"] > 50 and a["envoy.connection.bytes_sent"] > 50
    assert a["envoy.connection.close_initiator"] == "peer"
    assert a["envoy.connection.socket_options"] == ["TCP_NODELAY"]
    assert root.status_code == STATUS_CODE_UNSET and root.events == []
    queue, lf = trace.child("tcp.accept_queue"), trace.child("envoy.listener_filters")
    assert queue.start_ns == root.start_ns and queue.end_ns == lf.start_ns
    assert lf.attributes["envoy.listener_filters.peeked_bytes"] == 0


def test_tls13_connection(traces: dict[int, Trace]) -> None:
    trace = traces[META["tls13"]]
    root = trace.root
    assert root.attributes["network.local.port"] == META["tls_port"]
    assert root.attributes["tls.client.server_name"] == "a.example.com"
    hs = trace.child("tls.handshake")
    assert hs.attributes["tls.protocol.version"] == "1.3"
    assert hs.attributes["tls.client.server_name"] == "a.example.com"
    assert hs.attributes["tls.established"] is True
    assert hs.status_code == STATUS_CODE_UNSET
    lf = trace.child("envoy.listener_filters")
    assert lf.attributes["envoy.listener_filters.peeked_bytes"] >= 200  # tls_inspector peeked the hello
    assert lf.start_ns <= hs.start_ns <= lf.end_ns < hs.end_ns
    assert root.status_code == STATUS_CODE_UNSET  # its reset came after the client's FIN
    # record framing counted in the kernel: ClientHello, ChangeCipherSpec, then encrypted records
    a = root.attributes
    assert a["envoy.tls.records_received"] >= 3 and a["envoy.tls.application_data_records_received"] >= 1
    assert a["envoy.tls.records_sent"] >= 3 and a["envoy.tls.application_data_records_sent"] >= 1
    assert 5 * a["envoy.tls.records_sent"] + a["envoy.tls.max_record_size_sent"] <= a[
        "envoy.connection.bytes_sent"]
    assert "envoy.tls.record_framing_lost" not in a
    # the request it carried, seen on its way upstream, sits in this trace under the connection
    up = [s for s in trace.spans if s.kind == CLIENT and s.name == "GET"]
    assert len(up) == 1 and up[0].parent_span_id == root.span_id
    # the request came in the handshake's last round: tied to the latest TLS read on that worker
    assert up[0].attributes["otel_envoy.attribution"].startswith("tls_connection_")


def test_tls_record_header_reads_ride_on_the_next_read() -> None:
    """BoringSSL reads each TLS record's 5-byte header, then its body: the kernel sends one record for both
    (held + data), so a TLS connection's reads cost half the records. No read of a lone header is sent on
    the TLS connections of the real recording, and their handshake bytes are the stream as read."""
    from otel_envoy.events.decode import Decoder
    from otel_envoy.events.types import DataEvent

    c = load_layout().constants
    decoder = Decoder()
    conns: list[list[DataEvent]] = []  # each accepted connection's reads
    current: dict[int, list[DataEvent]] = {}
    for kind, payload in RecordingReader(RECORDING):
        ev = decoder.decode(payload) if kind == "kernel" else None
        if ev is not None and ev.kind == c["EV_ACCEPT"]:
            current[ev.fd] = []
            conns.append(current[ev.fd])
        elif (isinstance(ev, DataEvent) and ev.direction == c["DIR_READ"] and ev.role == c["ROLE_DOWNSTREAM"]
              and not ev.flags & c["DATA_FLAG_PEEK"] and ev.fd in current):
            current[ev.fd].append(ev)
    tls = [evs for evs in conns if evs and evs[0].data[:1] == b"\x16"]
    assert len(tls) == 2  # the TLS 1.3 and the TLS 1.2 connection
    for evs in tls:
        assert all(ev.ret != 5 for ev in evs)
        held = [ev for ev in evs if ev.held]
        assert len(held) >= 3 and all(ev.held == 5 for ev in held)
        hello = evs[0]  # the ClientHello: its header and body, one record
        assert hello.held == 5 and hello.ret == 5 + int.from_bytes(hello.data[3:5], "big")


def test_tls12_connection(traces: dict[int, Trace]) -> None:
    found = [t for t in traces.values() if t.children("tls.handshake")
             and t.child("tls.handshake").attributes.get("tls.protocol.version") == "1.2"]
    assert len(found) == 1
    trace = found[0]
    hs = trace.child("tls.handshake")
    assert hs.attributes["tls.client.server_name"] == "b.example.com"
    assert hs.attributes["tls.next_protocol"] == "http/1.1"
    assert hs.attributes["tls.established"] is True
    assert trace.root.attributes["network.local.port"] == META["tls_port"]
    assert trace.root.attributes["network.peer.port"] not in (META["plain"], META["tls13"], META["reset"])


def test_reset_connection(traces: dict[int, Trace]) -> None:
    root = traces[META["reset"]].root
    assert root.status_code == STATUS_CODE_ERROR
    assert root.status_message == "connection reset by peer"
    assert "tcp.reset_received" in [e[1] for e in root.events]
    assert root.attributes["envoy.connection.close_initiator"] == "peer"
    assert root.attributes["envoy.connection.bytes_received"] == len(RESET_PAYLOAD)
    assert root.attributes["envoy.connection.bytes_sent"] == 0


def test_burst_connections(traces: dict[int, Trace]) -> None:
    burst = META["burst"]
    assert len(burst) == 20 and set(burst) <= set(traces)
    for port in burst:
        trace = traces[port]
        trace.assert_nested()
        root = trace.root
        assert root.attributes["network.local.port"] == META["http_port"]
        assert root.status_code == STATUS_CODE_UNSET
        queue = trace.child("tcp.accept_queue")
        assert queue.start_ns == root.start_ns
        assert queue.attributes["tcp.accept_queue.depth"] >= 1
        assert queue.attributes["tcp.accept_queue.depth_on_arrival"] >= 1
        assert not trace.children("tls.handshake")
    threads = {traces[p].root.attributes["thread.name"] for p in burst}
    assert threads <= {"wrk:worker_0", "wrk:worker_1"}


def test_replaying_twice_gives_the_same_structure(tmp_path: Path, cli_spans: tuple[list[SpanRecord], str],
                                                  in_process: tuple[EventPipeline, CollectingSink]) -> None:
    first = cli_spans[0]
    second, _ = replay_cli(tmp_path, "again.jsonl")
    assert structure(first) == structure(second)
    assert sum(root[0] == "envoy.downstream.connection" for root, _ in structure(first)) == 24
    assert {s.trace_id for s in first}.isdisjoint({s.trace_id for s in second})  # ids are fresh
    # the in-process replay builds the same spans (its resource differs; structure() ignores resources)
    assert structure(records_of(in_process[1])) == structure(first)


def test_replay_to_the_default_output_file(tmp_path: Path) -> None:
    proc = cli("replay", RECORDING, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    default = tmp_path / "otel-envoy-traces.jsonl"
    assert default.exists() and str(default.name) in proc.stderr
    assert len(connection_traces(read_jsonl(default))) == 24


# ---------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("where", ["in_magic", "in_first_header", "in_a_payload", "last_byte"])
def test_truncated_recording_is_a_one_line_error(tmp_path: Path, where: str) -> None:
    raw = RECORDING.read_bytes()
    starts = record_boundaries(RECORDING)
    cut = {
        "in_magic": len(MAGIC) // 2,
        "in_first_header": len(MAGIC) + 2,
        "in_a_payload": starts[len(starts) // 2] + _HEAD.size + 3,
        "last_byte": len(raw) - 1,
    }[where]
    bad = tmp_path / "truncated.events"
    bad.write_bytes(raw[:cut])
    line = assert_one_line_error(cli("replay", bad, "--output", tmp_path / "out.jsonl"))
    assert str(bad) in line
    assert ("bad magic" in line) if where == "in_magic" else ("truncated" in line)


def test_recording_cut_at_a_record_boundary_replays_what_it_has(tmp_path: Path) -> None:
    raw = RECORDING.read_bytes()
    starts = record_boundaries(RECORDING)
    short = tmp_path / "short.events"
    short.write_bytes(raw[: starts[len(starts) // 2]])
    out = tmp_path / "out.jsonl"
    proc = cli("replay", short, "--output", out)
    assert proc.returncode == 0, proc.stderr
    n = len(connection_traces(read_jsonl(out)))
    assert 0 < n < 24


@pytest.mark.parametrize("content", [
    b"this is not a recording\n",
    b"",
    b'{"resourceSpans": []}\n',
    bytes(range(256)) * 4,
    MAGIC[:-1] + b"2\n",  # a future format version
], ids=["text", "empty", "jsonl", "binary", "other_version"])
def test_file_that_is_not_a_recording_is_a_one_line_error(tmp_path: Path, content: bytes) -> None:
    bad = tmp_path / "bad.events"
    bad.write_bytes(content)
    line = assert_one_line_error(cli("replay", bad, "--output", tmp_path / "out.jsonl"))
    assert "not an otel-envoy event recording" in line


def test_missing_recording_and_directory_are_one_line_errors(tmp_path: Path) -> None:
    line = assert_one_line_error(cli("replay", tmp_path / "nope.events", "--output", tmp_path / "o.jsonl"))
    assert "No such file" in line
    line = assert_one_line_error(cli("replay", tmp_path, "--output", tmp_path / "o.jsonl"))
    assert "Is a directory" in line


def test_recording_without_a_clock_record_is_a_one_line_error(tmp_path: Path) -> None:
    bad = tmp_path / "noclock.events"
    w = RecordingWriter(bad)
    w.kernel(encode(accept(1, 30, 40000)))
    w.close()
    line = assert_one_line_error(cli("replay", bad, "--output", tmp_path / "o.jsonl"))
    assert "clock record" in line


def _write_contexts(path: Path, *payloads: bytes) -> None:
    with open(path, "wb") as f:
        f.write(MAGIC)
        for p in payloads:
            f.write(_HEAD.pack(2, len(p)) + p)


@pytest.mark.parametrize("payloads", [
    pytest.param([b"[]"], id="context_not_an_object"),
    pytest.param([b'{"type":"clock"}'], id="clock_without_offset"),
    pytest.param([b'{"type":"clock","offset_ns":1}', b'{"type":"listen_sockets"}'],
                 id="listen_sockets_without_sockets"),
    pytest.param([b'{"type":"clock","offset_ns":1}', b'{"type":"listen_sockets","sockets":[[1,2]]}'],
                 id="listen_socket_row_too_short"),
    pytest.param([b'{"type":"clock","offset_ns":"abc"}'], id="clock_offset_not_a_number"),
    pytest.param([b'{"type":"clock","offset_ns":1}', b"{not json"], id="context_not_json"),
])
def test_damaged_context_records_are_one_line_errors(tmp_path: Path, payloads: list[bytes]) -> None:
    bad = tmp_path / "ctx.events"
    _write_contexts(bad, *payloads)
    assert_one_line_error(cli("replay", bad, "--output", tmp_path / "o.jsonl"))


def test_unwritable_output_is_a_one_line_error(tmp_path: Path) -> None:
    line = assert_one_line_error(cli("replay", RECORDING, "--output", tmp_path / "no" / "such" / "o.jsonl"))
    assert "No such file or directory" in line


# ------------------------------------------------------------------------------------------ recording files


def test_recording_writer_reader_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "rt.events"
    kernel = [encode(established(1_000, 40000)), encode(accept(2_000, 30, 40000)),
              encode(read(3_000, 30, b"GET / HTTP/1.1\r\n\r\n")), encode(close(4_000, 30, rx=18)),
              b"", bytes(range(256)) * 16]
    contexts: list[dict[str, Any]] = [
        {"type": "clock", "offset_ns": 1_795_304_973_826_974_574},
        {"type": "listen_sockets", "sockets": [[10566, 17, "127.0.0.1", 58239], [10566, 18, "::", 443]]},
        {"type": "listener_names", "names": [["0.0.0.0", 8080, "plain_http"], ["::", 443, "tls ✓"]]},
    ]
    w = RecordingWriter(path)
    expected: list[tuple[str, object]] = []
    for i in range(max(len(kernel), len(contexts))):
        if i < len(contexts):
            w.context(contexts[i])
            expected.append(("context", contexts[i]))
        if i < len(kernel):
            w.kernel(kernel[i])
            expected.append(("kernel", kernel[i]))
    w.close()
    assert w.records == len(kernel)  # counts kernel records
    assert path.read_bytes().startswith(MAGIC)
    assert list(RecordingReader(path)) == expected
    assert list(RecordingReader(path)) == expected  # a reader can be iterated again


def test_reader_rejects_damaged_headers(tmp_path: Path) -> None:
    path = tmp_path / "damaged.events"
    with open(path, "wb") as f:
        f.write(MAGIC + _HEAD.pack(7, 3) + b"abc")
    with pytest.raises(RecordingError, match="record 0 is damaged"):
        list(RecordingReader(path))
    with open(path, "wb") as f:
        f.write(MAGIC + _HEAD.pack(1, 1 << 30))
    with pytest.raises(RecordingError, match="damaged"):
        list(RecordingReader(path))


def test_rewriting_the_recording_is_byte_identical(tmp_path: Path) -> None:
    # a copy written record by record with RecordingWriter is byte-identical to the original
    items = list(RecordingReader(RECORDING))
    copy = tmp_path / "copy.events"
    w = RecordingWriter(copy)
    for kind, payload in items:
        if kind == "kernel":
            w.kernel(payload)  # type: ignore[arg-type]
        else:
            w.context(payload)  # type: ignore[arg-type]
    w.close()
    assert copy.read_bytes() == RECORDING.read_bytes()
    assert sum(1 for k, _ in items if k == "kernel") == w.records > 250


def test_live_recording_through_event_pipeline_records_what_it_saw(tmp_path: Path) -> None:
    # EventPipeline(recorder=...) is what `run --record` uses: the clock first, then records in order
    path = tmp_path / "rec.events"
    writer = RecordingWriter(path)
    spans_out = SpanPipeline([CollectingSink()])
    pipeline = EventPipeline(spans_out, Resource.create({}), MonotonicClock(42), recorder=writer)
    ctx = {"type": "listen_sockets", "sockets": [[1000, 10, "0.0.0.0", 8080]]}
    pipeline.on_context(ctx)
    raws = [encode(established(1_000, 40000)), encode(accept(2_000, 30, 40000)), b"\x01\x02"]
    for raw in raws:
        pipeline.on_record(raw)
    spans_out.shutdown(5.0)
    writer.close()
    assert list(RecordingReader(path)) == [("context", {"type": "clock", "offset_ns": 42}), ("context", ctx),
                                           *[("kernel", r) for r in raws]]


# ---------------------------------------------------------------------------------------- malformed records


def _expected_error(raw: bytes) -> str | None:
    """What the decoder must count for ``raw``, derived from events.h independently of the decoder."""
    layout = load_layout()
    kinds = {layout.constants[k]: s for k, s in [
        ("EV_ACCEPT", "accept_event"), ("EV_CONNECT", "connect_event"), ("EV_CLOSE", "close_event"),
        ("EV_DATA", "data_event"), ("EV_EPOLL_CTL", "epoll_ctl_event"), ("EV_SETSOCKOPT", "setsockopt_event"),
        ("EV_SOCK_STATE", "sock_state_event"), ("EV_TCP", "tcp_event"), ("EV_LISTEN", "listen_event")]}
    if len(raw) < 12:
        return "short_record"
    kind = int.from_bytes(raw[8:12], "little")
    if kind not in kinds:
        return "unknown_kind"
    sl = layout.structs[kinds[kind]]
    last = [f for f in sl.fields if f.name != "data" and not f.name.startswith("_")][-1]
    if len(raw) < last.offset + last.size:
        return "short_record"
    return None


@pytest.mark.parametrize("seed", range(8))
def test_malformed_records_are_counted_never_raised(seed: int) -> None:
    rng = random.Random(seed)
    items = list(RecordingReader(RECORDING))
    mutated: list[tuple[str, object]] = [items[0]]
    expected_errors: dict[str, int] = {}
    changed = 0
    for kind, payload in items[1:]:
        if kind == "kernel":
            raw: bytes = payload  # type: ignore[assignment]
            r = rng.random()
            if r < 0.2:  # truncated anywhere
                raw = raw[: rng.randrange(len(raw))]
            elif r < 0.3:  # random bytes of random length
                raw = rng.randbytes(rng.randrange(64))
            elif r < 0.6:  # a few random bytes changed, the kind kept
                buf = bytearray(raw)
                for _ in range(rng.randrange(1, 8)):
                    i = rng.randrange(len(buf))
                    if not 8 <= i < 12:
                        buf[i] = rng.randrange(256)
                raw = bytes(buf)
            if raw != payload:
                changed += 1
            err = _expected_error(raw)
            if err:
                expected_errors[err] = expected_errors.get(err, 0) + 1
            payload = raw
        mutated.append((kind, payload))
    assert changed > 50 and expected_errors.get("short_record", 0) > 0

    pipeline, sink = replay_in_process(mutated)  # must not raise

    assert dict(pipeline.decoder.errors) == expected_errors
    drops = pipeline.drops()
    for err, n in expected_errors.items():
        assert drops[f"decode.{err}"] == n
    assert pipeline.counts["span_build_errors"] == 0
    assert pipeline.counts["events"] + sum(expected_errors.values()) == kernel_count(items)
    assert pipeline.counts["spans"] == len(sink.spans)
    for line in sink.lines:  # whatever came out is valid OTLP/JSON
        decode_request_json(json.loads(line))


def kernel_count(items: list[tuple[str, object]]) -> int:
    return sum(1 for k, _ in items if k == "kernel")


def test_every_truncation_of_every_record_kind_is_survived() -> None:
    items = list(RecordingReader(RECORDING))
    seen_kinds: dict[int, bytes] = {}
    for kind, payload in items:
        if kind == "kernel":
            seen_kinds.setdefault(int.from_bytes(payload[8:12], "little"), payload)  # type: ignore[index]
    assert len(seen_kinds) >= 6  # accept, close, data, epoll, setsockopt, sock state, tcp, connect
    records: list[tuple[str, object]] = [items[0], items[1]]
    n = 0
    for raw in seen_kinds.values():
        for cut in range(len(raw) + 1):
            records.append(("kernel", raw[:cut]))
            n += 1
    pipeline, _ = replay_in_process(records)
    expected = sum(1 for _, r in records[2:] if _expected_error(r))  # type: ignore[arg-type]
    assert sum(pipeline.decoder.errors.values()) == expected > 0
    assert pipeline.counts["events"] == n - expected

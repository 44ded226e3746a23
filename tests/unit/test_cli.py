"""`otel-envoy replay` (the real CLI, in a subprocess) of the committed real recording, and of bad input.

tests/support/replay.py describes the recording; test_replay_golden.py holds its exact spans.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from otel_envoy.event_pipeline import EventPipeline
from otel_envoy.events.recording import MAGIC, RecordingWriter
from otel_envoy.spans.model import STATUS_CODE_ERROR, STATUS_CODE_UNSET, SpanRecord
from tests.support.events import accept, encode
from tests.support.replay import (
    CLIENT,
    META,
    RECORD_HEAD,
    RECORDING,
    RESET_PAYLOAD,
    SERVER,
    CollectingSink,
    assert_one_line_error,
    cli,
    read_jsonl,
    record_boundaries,
    records_of,
    replay_cli,
    replay_in_process,
    structure,
)
from tests.support.traces import Trace, connection_traces, group_traces

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
        "in_a_payload": starts[len(starts) // 2] + RECORD_HEAD.size + 3,
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
            f.write(RECORD_HEAD.pack(2, len(p)) + p)


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

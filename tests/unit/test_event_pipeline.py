"""EventPipeline: the committed recording replayed in this process, a recording made through it, and
malformed kernel and context records."""

from __future__ import annotations

import gc
import json
import random
from pathlib import Path

import pytest
from opentelemetry.sdk.resources import Resource

from otel_envoy.event_pipeline import DamagedContextError, EventPipeline, tune_garbage_collector
from otel_envoy.events.layout import load_layout
from otel_envoy.events.recording import RecordingError, RecordingReader, RecordingWriter
from otel_envoy.export.otlp_json_decode import decode_request_json
from otel_envoy.export.span_queue import SpanPipeline
from otel_envoy.spans.clock import MonotonicClock
from otel_envoy.spans.model import SpanRecord
from tests.support.events import accept, close, encode, established
from tests.support.replay import RECORDING, CollectingSink, replay_in_process


@pytest.fixture(scope="module")
def in_process() -> tuple[EventPipeline, CollectingSink]:
    return replay_in_process()


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


def test_context_records_reach_the_correlator_and_unknown_types_are_skipped() -> None:
    pipeline = EventPipeline(SpanPipeline([CollectingSink()]), Resource.create({}), MonotonicClock(0))
    pipeline.on_context({"type": "listen_sockets", "sockets": [[1000, 10, "0.0.0.0", 8080]]})
    pipeline.on_context({"type": "listener_names", "names": [["0.0.0.0", 8080, "plain_http"]]})
    pipeline.on_context({"type": "from_a_later_version", "anything": [1, 2]})
    pipeline.on_context({"type": "clock", "offset_ns": 7})  # recorded only: the clock is fixed at start
    assert [(k, s.address, s.port) for k, s in pipeline.correlator.downstream.listen_sockets.items()] == [
        ((1000, 10), "0.0.0.0", 8080)]
    assert pipeline.correlator.downstream.listener_names == {("0.0.0.0", 8080): "plain_http"}
    pipeline.spans_out.shutdown(5.0)


@pytest.mark.parametrize(("context", "error"), [
    ({"type": "listen_sockets"}, "KeyError: 'sockets'"),
    ({"type": "listen_sockets", "sockets": [[1, 2]]}, "ValueError: not enough values to unpack"),
    ({"type": "listener_names", "names": [["::", "x", "n"]]}, "ValueError: invalid literal"),
    ([1], "AttributeError: 'list' object has no attribute 'get'"),
])
def test_replay_names_the_damaged_context_record(context: object, error: str) -> None:
    pipeline = EventPipeline(SpanPipeline([CollectingSink()]), Resource.create({}), MonotonicClock(0))
    items: list[tuple[str, object]] = [("kernel", encode(established(1_000, 40000))), ("context", context)]
    with pytest.raises(DamagedContextError, match=r"^context record 2 is damaged \(") as info:
        pipeline.replay(items)
    assert error in str(info.value) and "\n" not in str(info.value)
    assert isinstance(info.value, RecordingError)  # the CLI's one-line errors for bad recordings
    pipeline.spans_out.shutdown(5.0)


def test_tune_garbage_collector_collects_rarely() -> None:
    before = gc.get_threshold()
    try:
        tune_garbage_collector()
        assert gc.get_threshold() == (50_000, 50, 1000)
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


# ---------------------------------------------------------------------------------------- malformed records


def _expected_error(raw: bytes) -> str | None:
    """What the decoder must count for ``raw``, derived from events.h independently of the decoder."""
    layout = load_layout()
    kinds = {layout.constants[k]: s for k, s in [
        ("EV_ACCEPT", "accept_event"), ("EV_CONNECT", "connect_event"), ("EV_CLOSE", "close_event"),
        ("EV_DATA", "data_event"),
        ("EV_SOCK_STATE", "sock_state_event"), ("EV_TCP", "tcp_event"), ("EV_LISTEN", "listen_event"),
        ("EV_OFFCPU", "offcpu_event"), ("EV_ROUND", "round_event"), ("EV_REQUEST_KEPT", "request_kept_event"),
        ("EV_EXEC", "process_event"), ("EV_EXIT", "process_event"),
        ("EV_SOCKET_SETUP", "socket_setup_event"), ("EV_CONNECTION_KEPT", "connection_kept_event")]}
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
    assert pipeline.counts["correlation_errors"] == 0  # corrupted fields are data, not a reason to raise
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
    assert len(seen_kinds) >= 6  # accept, close, data, sock state, tcp, connect, request summaries
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


def test_a_correlator_that_raises_loses_one_record_not_the_run(caplog: pytest.LogCaptureFixture) -> None:
    """A bug in correlation (here: the accept of one connection raising) leaves that record out, counted by
    event type and logged once with its traceback; the records after it are correlated as usual."""
    sink = CollectingSink()
    pipeline = EventPipeline(SpanPipeline([sink]), Resource.create({}), MonotonicClock(0))
    handle = pipeline._handle
    broken = {"left": 2}

    def handle_breaking_two_accepts(event: object) -> None:
        if type(event).__name__ == "AcceptEvent" and broken["left"]:
            broken["left"] -= 1
            raise KeyError("a bug")
        handle(event)

    pipeline._handle = handle_breaking_two_accepts  # type: ignore[method-assign]
    with caplog.at_level("ERROR", logger="otel_envoy.event_pipeline"):
        for port, fd, t0 in ((40000, 30, 1_000_000), (40001, 31, 2_000_000), (40002, 32, 3_000_000)):
            for ev in (established(t0, port), accept(t0 + 1_000, fd, port), close(t0 + 4_000, fd)):
                pipeline.on_record(encode(ev))
    pipeline.finish(60_000_000_000)
    pipeline.spans_out.shutdown(5.0)
    assert pipeline.counts["correlation_errors"] == pipeline.counts["correlation_errors.AcceptEvent"] == 2
    assert pipeline.drops()["correlation_errors"] == 2
    roots = [s for s in sink.spans if s.name == "envoy.downstream.connection"]
    assert [r.attributes["network.peer.port"] for r in roots] == [40002]
    logged = [r for r in caplog.records if "could not correlate an event AcceptEvent" in r.getMessage()]
    assert len(logged) == 1 and logged[0].exc_info is not None  # once per interval, with the traceback


def test_the_daemon_s_own_connection_makes_no_span_and_is_counted() -> None:
    """An own_connection context record (the daemon's admin call, told before it connects) leaves that
    connection and its requests out; another connection from the same address is traced."""
    from tests.support.events import LISTEN_FD, LOCAL, LPORT, PEER, TGID, close, read, write

    sink = CollectingSink()
    pipeline = EventPipeline(SpanPipeline([sink]), Resource.create({}), MonotonicClock(0))
    pipeline.on_context({"type": "listen_sockets", "sockets": [[TGID, LISTEN_FD, LOCAL, LPORT]]})
    pipeline.on_context({"type": "own_connection", "address": PEER, "port": 40000})
    for port, fd, t0 in ((40000, 30, 1_000_000), (40001, 31, 9_000_000)):
        for ev in (established(t0, port), accept(t0 + 1_000, fd, port),
                   read(t0 + 2_000, fd, b"GET /listeners HTTP/1.1\r\nHost: a\r\n\r\n"),
                   write(t0 + 3_000, fd, b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"),
                   close(t0 + 4_000, fd)):
            pipeline.on_record(encode(ev))
    pipeline.finish(60_000_000_000)
    pipeline.spans_out.shutdown(5.0)
    assert pipeline.counts["own_connections_left_out"] == 1
    assert pipeline.counts["own_requests_left_out"] == 1
    roots = [s for s in sink.spans if s.name == "envoy.downstream.connection"]
    assert [r.attributes["network.peer.port"] for r in roots] == [40001]
    requests = [s for s in sink.spans if s.name.startswith("GET")]
    assert len(requests) == 1 and requests[0].trace_id == roots[0].trace_id
    assert pipeline.correlator.downstream.own_peers == {}  # forgotten once the connection ended


def test_each_process_s_spans_carry_the_resource_its_context_record_gave_live_and_replayed(
        tmp_path: Path) -> None:
    """process_resource context records (the daemon's, when a process became traced and when it exited):
    each process's spans carry its own resource, one dict per process, and a replay of the recording gives
    the same, without the processes' /proc."""
    from otel_envoy.export.otlp_json import encode_request_json
    from tests.support.events import LISTEN_FD, LOCAL, LPORT, TGID, close, read, write

    other = TGID + 1
    resources = {TGID: {"container.id": "ab" * 32, "service.name": "front", "process.pid": TGID},
                 other: {"container.id": "cd" * 32, "k8s.pod.name": "p-1", "process.pid": other}}
    contexts = [{"type": "listen_sockets", "sockets": [[TGID, LISTEN_FD, LOCAL, LPORT],
                                                        [other, LISTEN_FD, LOCAL, LPORT + 1]]},
                *({"type": "process_resource", "pid": pid, "attributes": attrs}
                  for pid, attrs in resources.items())]
    raws = []
    for tgid, lport, port, t0 in ((TGID, LPORT, 40000, 1_000_000), (other, LPORT + 1, 40001, 2_000_000),
                                  (TGID, LPORT, 40002, 3_000_000), (TGID + 2, LPORT, 40003, 4_000_000)):
        raws += [encode(ev) for ev in (
            established(t0, port, lport=lport), accept(t0 + 1_000, 30, port, tgid=tgid),
            read(t0 + 2_000, 30, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", tgid=tgid),
            write(t0 + 3_000, 30, b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n", tgid=tgid),
            close(t0 + 4_000, 30, tgid=tgid))]
    path = tmp_path / "rec.events"
    writer = RecordingWriter(path)
    live = CollectingSink()
    pipeline = EventPipeline(SpanPipeline([live]), Resource.create({"service.name": "envoy"}),
                             MonotonicClock(0), recorder=writer)
    for ctx in contexts:
        pipeline.on_context(ctx)
    for raw in raws:
        pipeline.on_record(raw)
    pipeline.on_context({"type": "process_resource", "pid": other, "attributes": None})  # it exited
    pipeline.finish(60_000_000_000)
    pipeline.spans_out.shutdown(5.0)
    writer.close()

    replayed = CollectingSink()
    again = EventPipeline(SpanPipeline([replayed]), Resource.create({"service.name": "envoy"}),
                          MonotonicClock(0))
    items = iter(RecordingReader(path))
    next(items)  # the clock
    again.replay(items)
    again.spans_out.shutdown(5.0)
    for sink in (live, replayed):
        spans: list[SpanRecord] = sink.spans  # type: ignore[assignment]
        assert {s.name for s in spans} == {"envoy.downstream.connection", "tcp.accept_queue",
                                           "envoy.listener_filters", "GET"}
        for tgid in (TGID, other):
            own = [s for s in spans if s.resource_attributes.get("process.pid") == tgid]
            assert len({id(s.resource_attributes) for s in own}) == 1  # one dict per process
            assert own[0].resource_attributes == {**Resource.create({"service.name": "envoy"}).attributes,
                                                  **resources[tgid]}
            roots = [s for s in own if s.name == "envoy.downstream.connection"]
            assert {r.attributes["process.pid"] for r in roots} == {tgid}
            assert len(roots) == (2 if tgid == TGID else 1)
            assert sum(s.name == "GET" for s in own) == len(roots)  # request spans too
        unknown = [s for s in spans if "process.pid" not in s.resource_attributes]  # a process not told of
        assert unknown and all(s.resource_attributes["service.name"] == "envoy" for s in unknown)
        assert {s.attributes.get("process.pid") for s in unknown} <= {TGID + 2, None}
        request = json.loads(encode_request_json(spans))  # one resourceSpans per process
        assert len(request["resourceSpans"]) == 3


def test_ticks_hand_the_spans_over_and_leave_the_round_worker_running() -> None:
    """A tick (after every ring pass) hands the event path's pending spans to the export queue; the round
    worker's thread keeps running until finish()."""
    sink = CollectingSink()
    pipeline = EventPipeline(SpanPipeline([sink]), Resource.create({}), MonotonicClock(0),
                             threaded_rounds=True)
    pipeline.on_context({"type": "listen_sockets", "sockets": [[1000, 10, "0.0.0.0", 8080]]})
    for ev in (established(1_000, 40000), accept(2_000, 30, 40000), close(3_000, 30)):
        pipeline.on_record(encode(ev))
    assert pipeline.round_worker is not None
    for now in (10_000_000_000, 20_000_000_000):  # past the linger time: the connection's spans are built
        pipeline.tick(now)
        assert pipeline.round_worker._thread is not None and pipeline.round_worker._thread.is_alive()
    assert pipeline.spans_out.flush(5.0)
    assert any(s.name == "envoy.downstream.connection" for s in sink.spans)  # handed over by the tick
    pipeline.finish(30_000_000_000)
    assert not pipeline.round_worker._thread.is_alive()
    pipeline.spans_out.shutdown(5.0)

"""The context records of a recording: each type's JSON form, both ways, and damaged records."""

from __future__ import annotations

import json

import pytest

from otel_envoy.envoy.listen_socket import ListenSocket
from otel_envoy.events.recording import RecordingReader
from otel_envoy.events.recording_context import (
    ClockContext,
    ListenerNamesContext,
    ListenSocketsContext,
    ProcessResourceContext,
    SamplerContext,
    recording_clock,
)
from tests.support.replay import RECORDING


def test_clock_json() -> None:
    clock = ClockContext(1_795_304_973_826_974_574)
    assert clock.to_json() == {"type": "clock", "offset_ns": 1_795_304_973_826_974_574}
    assert ClockContext.from_json(clock.to_json()) == clock
    assert ClockContext.from_json({"type": "clock", "offset_ns": "42"}) == ClockContext(42)


def test_listen_sockets_json_rows_are_sorted_by_pid_and_fd() -> None:
    sockets = {(10566, 18): ListenSocket("::", 443), (10566, 17): ListenSocket("127.0.0.1", 58239),
               (9, 40): ListenSocket("0.0.0.0", 8080)}
    obj = ListenSocketsContext(sockets).to_json()
    assert json.dumps(obj, separators=(",", ":")) == (
        '{"type":"listen_sockets","sockets":[[9,40,"0.0.0.0",8080],[10566,17,"127.0.0.1",58239],'
        '[10566,18,"::",443]]}')
    assert ListenSocketsContext.from_json(obj).sockets == sockets
    assert ListenSocketsContext({}).to_json() == {"type": "listen_sockets", "sockets": []}


def test_listener_names_json_rows_are_sorted() -> None:
    names = {("::", 443): "tls ✓", ("0.0.0.0", 8080): "plain_http"}
    obj = ListenerNamesContext(names).to_json()
    assert obj == {"type": "listener_names", "names": [["0.0.0.0", 8080, "plain_http"], ["::", 443, "tls ✓"]]}
    assert ListenerNamesContext.from_json(obj).names == names


@pytest.mark.parametrize(("cls", "obj", "error"), [
    (ClockContext, {"type": "clock"}, KeyError),
    (ClockContext, {"type": "clock", "offset_ns": "abc"}, ValueError),
    (ListenSocketsContext, {"type": "listen_sockets"}, KeyError),
    (ListenSocketsContext, {"type": "listen_sockets", "sockets": [[1, 2]]}, ValueError),
    (ListenSocketsContext, {"type": "listen_sockets", "sockets": 5}, TypeError),
    (ListenerNamesContext, {"type": "listener_names", "names": [["::", "x", "n"]]}, ValueError),
])
def test_damaged_records_raise(cls: type, obj: dict, error: type[Exception]) -> None:
    with pytest.raises(error):
        cls.from_json(obj)


def test_recording_clock_is_the_first_record_only() -> None:
    assert recording_clock(("context", {"type": "clock", "offset_ns": 5})) == ClockContext(5)
    for first in (None, ("kernel", b"\x01"), ("context", {"type": "listen_sockets", "sockets": []})):
        with pytest.raises(ValueError, match="does not start with its clock record"):
            recording_clock(first)
    with pytest.raises(AttributeError):
        recording_clock(("context", []))


def test_the_committed_recordings_context_records_parse_back_to_themselves() -> None:
    parsers = {c.TYPE: c.from_json for c in (ClockContext, ListenSocketsContext, ListenerNamesContext,
                                             SamplerContext, ProcessResourceContext)}
    contexts = [p for kind, p in RecordingReader(RECORDING) if kind == "context"]
    assert contexts[0]["type"] == "clock"  # type: ignore[index]
    assert {c["type"] for c in contexts} >= {"clock", "listen_sockets"}  # type: ignore[index]
    for obj in contexts:
        assert parsers[obj["type"]](obj).to_json() == obj  # type: ignore[index]


def test_the_sampler_record_round_trips_and_refuses_a_bad_ratio() -> None:
    from otel_envoy.events.recording_context import SamplerContext

    rec = SamplerContext("traceidratio", 0.25, summary=True)
    assert SamplerContext.from_json(rec.to_json()) == rec
    assert rec.to_json() == {"type": "sampler", "name": "traceidratio", "ratio": 0.25, "summary": True}
    # recordings made before request summaries: their requests were parsed
    assert SamplerContext.from_json({"type": "sampler", "name": "x", "ratio": 1}).summary is False
    with pytest.raises(ValueError, match="out of range"):
        SamplerContext.from_json({"type": "sampler", "name": "x", "ratio": 3})


def test_the_process_resource_record_round_trips_and_refuses_other_values() -> None:
    from otel_envoy.events.recording_context import ProcessResourceContext

    rec = ProcessResourceContext(4242, {"container.id": "ab" * 32, "process.pid": 4242})
    assert rec.to_json() == {"type": "process_resource", "pid": 4242,
                             "attributes": {"container.id": "ab" * 32, "process.pid": 4242}}
    assert ProcessResourceContext.from_json(json.loads(json.dumps(rec.to_json()))) == rec
    gone = ProcessResourceContext(4242, None)
    assert ProcessResourceContext.from_json(gone.to_json()) == gone
    for attributes in ([1], {"a": [1]}, {"a": True}, {"a": None}, {"a": 1.5}):
        with pytest.raises(TypeError):
            ProcessResourceContext.from_json({"type": "process_resource", "pid": 1, "attributes": attributes})
    with pytest.raises(KeyError):
        ProcessResourceContext.from_json({"type": "process_resource", "pid": 1})

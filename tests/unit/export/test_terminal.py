"""Waterfall rendering of JSON-lines span files."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, TraceFlags
from opentelemetry.trace.status import Status, StatusCode
from rich.console import Console

from otel_envoy.export.sinks import JsonLinesFileSink
from otel_envoy.export.terminal import format_duration, load_records, render_file
from tests.support.sdk_oracle import records_from_sdk_spans

RESOURCE = Resource.create({"service.name": "envoy"})
SCOPE = InstrumentationScope("otel-envoy", "0.1.0")
T0 = 1_700_000_000_000_000_000
TRACE_1 = 0x4BF92F3577B34DA6A3CE929D0E0E4736
TRACE_2 = 0x00F067AA0BA902B700F067AA0BA902B7


def _span(
    trace_id: int,
    name: str,
    span_id: int,
    parent: int | None,
    start_us: int,
    end_us: int,
    attributes: dict | None = None,
    events: list[Event] | None = None,
    status: Status | None = None,
    kind: SpanKind = SpanKind.INTERNAL,
) -> ReadableSpan:
    return ReadableSpan(
        name=name,
        context=SpanContext(trace_id, span_id, False, TraceFlags(1)),
        parent=SpanContext(trace_id, parent, False, TraceFlags(1)) if parent else None,
        resource=RESOURCE,
        attributes=attributes or {},
        events=events or [],
        kind=kind,
        status=status or Status(StatusCode.UNSET),
        start_time=T0 + start_us * 1000,
        end_time=T0 + end_us * 1000,
        instrumentation_scope=SCOPE,
    )


def connection_trace(trace_id: int = TRACE_1, offset_us: int = 0) -> list[ReadableSpan]:
    o = offset_us
    return [
        _span(
            trace_id,
            "envoy.connection",
            1,
            None,
            o,
            o + 12_500,
            {
                "network.peer.address": "10.0.0.7",
                "network.peer.port": 51234,
                "envoy.listener.name": "ingress_https",
            },
            kind=SpanKind.SERVER,
        ),
        # Deliberately out of start order: the renderer sorts children by start time.
        _span(
            trace_id,
            "tls.handshake",
            4,
            1,
            o + 1_500,
            o + 4_200,
            {
                "tls.protocol.version": "1.3",
                "tls.client.server_name": "example.com",
                "tls.cipher": "TLS_AES_128_GCM_SHA256",
                "tls.resumed": False,
            },
            events=[Event("tls.client_hello", {"size": 517}, timestamp=T0 + (o + 1_600) * 1000)],
        ),
        _span(trace_id, "tcp.accept_queue", 2, 1, o, o + 800, {"tcp.accept_queue.depth": 3}),
        _span(trace_id, "envoy.listener_filters", 3, 1, o + 800, o + 1_500, {"custom.thing": "abc"}),
        _span(
            trace_id,
            "tls.cert_verify",
            5,
            4,
            o + 2_600,
            o + 3_900,
            status=Status(StatusCode.ERROR, "certificate expired"),
        ),
    ]


def _write(path: Path, *batches: list[ReadableSpan]) -> Path:
    sink = JsonLinesFileSink(path)
    for batch in batches:
        sink.export(records_from_sdk_spans(batch))
    sink.shutdown()
    return path


def _render(path: Path, **kwargs: object) -> tuple[str, int]:
    console = Console(record=True, width=120)
    n = render_file(path, console, **kwargs)
    return console.export_text(), n


def _indent_of(text: str, name: str) -> int:
    for line in text.splitlines():
        stripped = line.lstrip(" ")
        if stripped.startswith(name + " "):
            return len(line) - len(stripped)
    raise AssertionError(f"{name} not rendered:\n{text}")


def test_waterfall_names_nesting_and_durations(tmp_path: Path) -> None:
    text, n = _render(_write(tmp_path / "t.jsonl", connection_trace()))
    assert n == 1
    # Header: trace id, root name, total duration, key attributes.
    assert f"trace {TRACE_1:032x}" in text
    assert "envoy.connection  12.50ms" in text
    assert "peer 10.0.0.7:51234" in text
    assert "listener ingress_https" in text
    assert "sni example.com" in text
    # Indentation by depth.
    assert _indent_of(text, "envoy.connection") == 0
    assert _indent_of(text, "tcp.accept_queue") == 2
    assert _indent_of(text, "tls.handshake") == 2
    assert _indent_of(text, "tls.cert_verify") == 4
    # Children ordered by start time, grandchild right under its parent (and its details).
    order = [
        text.index(name)
        for name in ("tcp.accept_queue", "envoy.listener_filters", "tls.handshake  ", "tls.cert_verify")
    ]
    assert order == sorted(order)
    # Offsets and durations.
    assert re.search(r"tls\.handshake\s+\+1\.50ms\s+2\.70ms\s+│", text)
    assert re.search(r"tcp\.accept_queue\s+\+0ns\s+800\.0µs\s+│", text)
    assert re.search(r"tls\.cert_verify\s+\+2\.60ms\s+1\.30ms\s+│", text)
    # Important attributes, events and errors.
    assert "version=1.3 sni=example.com cipher=TLS_AES_128_GCM_SHA256 resumed=false" in text
    assert "depth=3" in text
    assert "custom.thing=abc" in text  # unknown span name: generic attributes
    assert "◆ tls.client_hello" in text and "size=517" in text
    assert "status=ERROR certificate expired" in text
    # Nothing wider than the console.
    assert max(len(line) for line in text.splitlines()) <= 120


def test_bars_are_proportional(tmp_path: Path) -> None:
    text, _ = _render(_write(tmp_path / "t.jsonl", connection_trace()))
    bars = {}
    for line in text.splitlines():
        m = re.match(r"\s*(\S+)\s.*│([█▏·]+)│$", line)
        if m:
            bars[m.group(1)] = m.group(2)
    root, tls = bars["envoy.connection"], bars["tls.handshake"]
    assert set(root) == {"█"}  # the root spans the whole timeline
    width = len(root)
    start = tls.index("█")
    length = tls.count("█")
    assert abs(start - 1_500 / 12_500 * width) <= 1
    assert abs(length - 2_700 / 12_500 * width) <= 2


def test_error_spans_are_red(tmp_path: Path) -> None:
    console = Console(record=True, width=120, force_terminal=True, color_system="standard")
    render_file(_write(tmp_path / "t.jsonl", connection_trace()), console)
    html = console.export_html(inline_styles=True)
    assert re.search(r'<span style="[^"]*color: #800000[^"]*">tls\.cert_verify</span>', html)


def test_multiple_traces_filter_and_limit(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "t.jsonl",
        connection_trace(TRACE_2, offset_us=50_000),
        connection_trace(TRACE_1, offset_us=0),
    )
    text, n = _render(path)
    assert n == 2
    # Ordered by start time, not by file order.
    assert text.index(f"{TRACE_1:032x}") < text.index(f"{TRACE_2:032x}")

    text, n = _render(path, max_traces=1)
    assert n == 1 and f"{TRACE_2:032x}" not in text and "1 more trace" in text

    text, n = _render(path, trace_id=f"{TRACE_2:032x}"[:8].upper())
    assert n == 1 and f"{TRACE_2:032x}" in text and f"{TRACE_1:032x}" not in text

    text, n = _render(path, trace_id="deadbeef")
    assert n == 0 and "no trace with id deadbeef" in text


def test_orphans_and_generic_spans(tmp_path: Path) -> None:
    spans = [
        _span(TRACE_1, "mystery.span", 7, 99, 0, 5, {"a": 1, "b": [1, 2], "c": "x", "d": "not shown"}),
        _span(TRACE_1, "instant", 8, 7, 2, 2),
    ]
    text, n = _render(_write(tmp_path / "t.jsonl", spans))
    assert n == 1
    assert _indent_of(text, "mystery.span") == 0  # parent missing: shown as a root
    assert _indent_of(text, "instant") == 2
    assert "a=1 b=[1,2] c=x" in text and "not shown" not in text
    assert "▏" in text  # zero-length span still gets a marker


def test_format_duration() -> None:
    assert format_duration(850) == "850ns"
    assert format_duration(12_345) == "12.3µs"
    assert format_duration(4_560_000) == "4.56ms"
    assert format_duration(1_234_000_000) == "1.234s"
    assert format_duration(-5) == "0ns"


def test_malformed_file_reports_line_number(tmp_path: Path) -> None:
    path = _write(tmp_path / "t.jsonl", connection_trace())
    with path.open("a") as fh:
        fh.write("\n")  # blank lines are fine
        fh.write('{"not": "otlp"}\n')
    with pytest.raises(
        ValueError, match=r"t\.jsonl: line 3 is not an OTLP/JSON request: missing 'resourceSpans'"
    ):
        render_file(path, Console(record=True, width=120))

    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text("{truncated\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl: line 1 is not an OTLP/JSON request: ") as info:
        load_records(bad_json)
    assert "\n" not in str(info.value)

    with pytest.raises(ValueError, match="cannot read"):
        load_records(tmp_path / "missing.jsonl")


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    text, n = _render(path)
    assert n == 0 and "no spans" in text


def test_show_draws_each_listener_s_worker_balance_and_the_chain(tmp_path: Path) -> None:
    spans = []
    for i in range(12):
        worker = "wrk:worker_0" if i < 9 else "wrk:worker_1"
        spans.append(_span(0x1000 + i, "envoy.downstream.connection", 1, None, 0, 100, {
            "envoy.listener.name": "ingress", "thread.name": worker, "network.peer.port": 40000 + i,
            "envoy.filter_chain.name": "chain_alpha", "envoy.filter_chain.inferred": True},
            kind=SpanKind.SERVER))
    text, n = _render(_write(tmp_path / "t.jsonl", spans))
    assert n == 12
    assert "chain_alpha" in text  # the connection's filter chain among its highlights
    rows = [line for line in text.splitlines() if line.strip().startswith("ingress")]
    assert len(rows) == 2, text
    assert "wrk:worker_0" in rows[0] and rows[0].rstrip().endswith("9 (75 %)")
    assert "wrk:worker_1" in rows[1] and rows[1].rstrip().endswith("3 (25 %)")
    assert abs(rows[0].count("█") - 3 * rows[1].count("█")) <= 2  # bars in proportion

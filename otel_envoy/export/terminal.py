"""Terminal waterfall rendering of a JSON-lines OTLP span file (the ``show`` command).

Each trace gets a header (trace id, root span, duration, key connection attributes) followed by one
row per span: the name indented by depth (children ordered by start time), the offset from the
trace start, the duration and a bar placed proportionally on a fixed-width timeline.  ERROR spans
are red; span events are listed under their span with a marker on the timeline; a few important
attributes are shown per span (known span names have curated lists, others a generic pick).
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

from rich.console import Console
from rich.text import Text

from otel_envoy.export.otlp_json_decode import decode_request_json
from otel_envoy.spans.model import SpanRecord

__all__ = [
    "SPAN_HIGHLIGHTS",
    "format_duration",
    "group_traces",
    "load_records",
    "render_file",
    "render_records",
    "render_trace",
    "render_worker_balance",
    "worker_balance",
]

#: Per span name: ``(label, candidate attribute keys)`` shown under the span when present.
SPAN_HIGHLIGHTS: dict[str, tuple[tuple[str, tuple[str, ...]], ...]] = {
    "tls.handshake": (
        ("version", ("tls.protocol.version", "tls.version")),
        ("sni", ("tls.client.server_name", "tls.server_name", "server.address")),
        ("cipher", ("tls.cipher", "tls.cipher_suite")),
        ("resumed", ("tls.resumed", "tls.session.resumed")),
        ("alpn", ("tls.next_protocol", "tls.alpn", "network.protocol.name")),
        ("error", ("tls.error", "error.message")),
    ),
    "envoy.downstream.connection": (
        ("chain", ("envoy.filter_chain.name",)),
        ("chain_unknown", ("envoy.filter_chain.not_inferred_reason",)),
        ("thread", ("thread.name",)),
        ("rx", ("envoy.connection.bytes_received",)),
        ("tx", ("envoy.connection.bytes_sent",)),
        ("closed_by", ("envoy.connection.close_initiator",)),
        ("still_open", ("envoy.connection.still_open",)),
        ("partial", ("otel_envoy.partial",)),
    ),
    "envoy.listener_filters": (
        ("peeked_bytes", ("envoy.listener_filters.peeked_bytes",)),
        ("peeks", ("envoy.listener_filters.peeks",)),
    ),
    "tcp.accept_queue": (
        ("depth", ("tcp.accept_queue.depth", "envoy.accept_queue.depth", "tcp.backlog.depth")),
        ("depth_on_arrival", ("tcp.accept_queue.depth_on_arrival",)),
    ),
    "envoy.upstream.connection": (
        ("peer", ("server.port",)),
        ("requests", ("envoy.upstream.requests",)),
        ("closed_by", ("envoy.connection.close_initiator",)),
        ("error", ("error.type",)),
    ),
}
#: Request spans are named after their method: highlighted by these keys whatever the name.
HTTP_HIGHLIGHTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("path", ("url.path",)),
    ("status", ("http.response.status_code",)),
    ("upstream", ("server.port",)),
    ("thread", ("thread.name",)),
    ("round", ("envoy.event_loop.round",)),
    ("trace_from", ("otel_envoy.trace_context",)),
    ("error", ("error.type",)),
)

# Shown for any span when present (after the curated ones).
_COMMON_HIGHLIGHTS: tuple[tuple[str, tuple[str, ...]], ...] = (("error", ("error.type",)),)
_MAX_HIGHLIGHTS = 6
_GENERIC_HIGHLIGHTS = 3

_NAME_COL = 38
_NUM_COL = 10
_BAR_MIN, _BAR_MAX = 16, 60

_STYLE_BAR = "cyan"
_STYLE_ROOT_BAR = "bright_blue"
_STYLE_ERROR = "red"
_STYLE_EVENT = "yellow"


# --------------------------------------------------------------------------------------------- loading


def load_records(path: str | os.PathLike[str]) -> list[SpanRecord]:
    """Read a JSON-lines file of OTLP/JSON requests into records.

    Raises ``ValueError("<path>: line N is not an OTLP/JSON request: ...")`` for a malformed line and
    ``ValueError("<path>: cannot read: ...")`` when the file cannot be read.
    """
    name = os.fspath(path)
    records: list[SpanRecord] = []
    try:
        with open(name, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                    records.extend(decode_request_json(obj))
                except (ValueError, RecursionError) as exc:
                    reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                    raise ValueError(f"{name}: line {lineno} is not an OTLP/JSON request: {reason}") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"{name}: is not a UTF-8 text file: {exc.reason}") from None
    except OSError as exc:
        raise ValueError(f"{name}: cannot read: {exc.strerror or exc}") from None
    return records


def group_traces(records: Iterable[SpanRecord]) -> dict[str, list[SpanRecord]]:
    """Group records by trace id (later duplicates of a span id replace earlier ones).

    Traces are ordered by their earliest span start.
    """
    traces: dict[str, dict[str, SpanRecord]] = {}
    for rec in records:
        traces.setdefault(rec.trace_id, {})[rec.span_id] = rec
    ordered = sorted(traces.items(), key=lambda kv: min(r.start_ns for r in kv[1].values()))
    return {tid: list(spans.values()) for tid, spans in ordered}


# --------------------------------------------------------------------------------------------- formatting


def format_duration(ns: int | float) -> str:
    """Human duration: ``850ns``, ``12.3µs``, ``4.56ms``, ``1.234s``."""
    ns = max(0, ns)
    if ns < 1_000:
        return f"{int(ns)}ns"
    if ns < 1_000_000:
        return f"{ns / 1_000:.1f}µs"
    if ns < 1_000_000_000:
        return f"{ns / 1_000_000:.2f}ms"
    return f"{ns / 1_000_000_000:.3f}s"


def _fmt_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ",".join(_fmt_value(v) for v in value) + "]"
    if isinstance(value, bytes):
        return value.hex()
    text = str(value)
    return text if len(text) <= 60 else text[:59] + "…"


def _first(attrs: dict[str, Any], keys: Sequence[str]) -> Any:
    for key in keys:
        if key in attrs:
            return attrs[key]
    return None


def _endpoint(attrs: dict[str, Any], addr_keys: Sequence[str], port_keys: Sequence[str]) -> str | None:
    addr = _first(attrs, addr_keys)
    if addr is None:
        return None
    port = _first(attrs, port_keys)
    addr = str(addr)
    if port is None:
        return addr
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


def _highlights(rec: SpanRecord, skip: dict[str, Any]) -> list[tuple[str, str]]:
    """``(label, value)`` pairs of the attributes worth showing for ``rec``."""
    attrs = rec.attributes
    out: list[tuple[str, str]] = []
    used: set[str] = set()
    named = HTTP_HIGHLIGHTS if "http.request.method" in attrs else SPAN_HIGHLIGHTS.get(rec.name, ())
    for label, keys in named + _COMMON_HIGHLIGHTS:
        for key in keys:
            if key in attrs and key not in used:
                out.append((label, _fmt_value(attrs[key])))
                used.add(key)
                break
    prefix = rec.name + "."
    for key, value in attrs.items():
        if key.startswith(prefix) and key not in used:
            out.append((key[len(prefix) :], _fmt_value(value)))
            used.add(key)
    if not out:  # nothing curated matched: show a few attributes generically
        for key, value in attrs.items():
            if len(out) >= _GENERIC_HIGHLIGHTS:
                break
            if key in skip and skip[key] == value:
                continue  # already shown in the trace header / identical to the root
            out.append((key, _fmt_value(value)))
    return out[:_MAX_HIGHLIGHTS]


# --------------------------------------------------------------------------------------------- layout


def _tree(spans: list[SpanRecord]) -> list[tuple[SpanRecord, int]]:
    """Depth-first ``(span, depth)`` order; children by start time, orphans as extra roots."""
    by_id = {s.span_id: s for s in spans}
    children: dict[str, list[SpanRecord]] = {}
    roots: list[SpanRecord] = []
    for s in spans:
        if s.parent_span_id and s.parent_span_id in by_id and s.parent_span_id != s.span_id:
            children.setdefault(s.parent_span_id, []).append(s)
        else:
            roots.append(s)

    def order(items: list[SpanRecord]) -> list[SpanRecord]:
        return sorted(items, key=lambda r: (r.start_ns, -r.end_ns, r.name))

    out: list[tuple[SpanRecord, int]] = []
    seen: set[str] = set()
    stack = [(r, 0) for r in reversed(order(roots))]
    while stack:
        rec, depth = stack.pop()
        if rec.span_id in seen:
            continue
        seen.add(rec.span_id)
        out.append((rec, depth))
        for child in reversed(order(children.get(rec.span_id, []))):
            stack.append((child, depth + 1))
    # Spans only reachable through a parent cycle: show them flat rather than lose them.
    out.extend((s, 0) for s in order([s for s in spans if s.span_id not in seen]))
    return out


def _cells(start_ns: int, end_ns: int, t0: int, total: int, width: int) -> tuple[int, int]:
    a = int((start_ns - t0) / total * width)
    b = math.ceil((end_ns - t0) / total * width)
    a = min(max(a, 0), width - 1)
    b = min(max(b, a + 1), width)
    return a, b


def _bar(a: int, b: int, width: int, style: str, char: str = "█") -> Text:
    text = Text()
    text.append("│", style="dim")
    text.append("·" * a, style="dim")
    text.append(char * (b - a), style=style)
    text.append("·" * (width - b), style="dim")
    text.append("│", style="dim")
    return text


def _marker_bar(positions: list[int], width: int) -> Text:
    cells = [" "] * width
    for p in positions:
        cells[min(max(p, 0), width - 1)] = "◆"
    text = Text()
    text.append("│", style="dim")
    for ch in cells:
        text.append(ch, style=_STYLE_EVENT if ch != " " else "")
    text.append("│", style="dim")
    return text


def _left(label: Text, offset: str, duration: str, name_col: int) -> Text:
    label.truncate(name_col, overflow="ellipsis", pad=True)
    row = Text()
    row.append_text(label)
    row.append(f"{offset:>{_NUM_COL}}", style="dim")
    row.append(f"{duration:>{_NUM_COL}} ")
    return row


def _print(console: Console, text: Text) -> None:
    console.print(text, no_wrap=True, overflow="ellipsis", crop=True)


def _pairs_line(indent: str, pairs: Sequence[tuple[str, str]], value_style: str = "green") -> Text:
    line = Text(indent)
    for i, (k, v) in enumerate(pairs):
        if i:
            line.append(" ")
        line.append(f"{k}=", style="dim")
        line.append(v, style="red" if k == "status" else value_style)
    return line


_PEER_KEYS = (
    ("network.peer.address", "client.address", "source.address"),
    ("network.peer.port", "client.port", "source.port"),
)
_LOCAL_KEYS = (("network.local.address", "server.address"), ("network.local.port", "server.port"))
_SNI_KEY = "tls.client.server_name"
_LISTENER_KEY = "envoy.listener.name"


def render_trace(console: Console, spans: list[SpanRecord]) -> None:
    """Draw one trace (all records sharing a trace id) as a waterfall."""
    if not spans:
        return
    rows = _tree(spans)
    t0 = min(s.start_ns for s in spans)
    t1 = max(max(s.end_ns, s.start_ns) for s in spans)
    total = max(t1 - t0, 1)
    root = rows[0][0]
    bar_w = min(_BAR_MAX, max(_BAR_MIN, console.width - _NAME_COL - 2 * _NUM_COL - 3))

    # Header.
    header = Text()
    header.append("trace ", style="bold")
    header.append(root.trace_id, style="bold magenta")
    header.append("  ")
    header.append(root.name, style="bold red" if root.is_error else "bold")
    header.append(f"  {format_duration(t1 - t0)}", style="bold")
    header.append(f"  {len(spans)} span{'s' if len(spans) != 1 else ''}", style="dim")
    _print(console, header)

    facts: list[tuple[str, str]] = []
    peer = _endpoint(root.attributes, *_PEER_KEYS)
    if peer:
        facts.append(("peer", peer))
    local = _endpoint(root.attributes, *_LOCAL_KEYS)
    if local:
        facts.append(("local", local))
    listener = root.attributes.get(_LISTENER_KEY)
    if listener is not None:
        facts.append(("listener", _fmt_value(listener)))
    sni = next((s.attributes[_SNI_KEY] for s, _ in rows if _SNI_KEY in s.attributes), None)
    if sni is not None:
        facts.append(("sni", _fmt_value(sni)))
    if root.is_error:
        facts.append(("status", "ERROR" + (f": {root.status_message}" if root.status_message else "")))
    if facts:
        line = Text("  ")
        for i, (label, value) in enumerate(facts):
            if i:
                line.append("  ")
            line.append(f"{label} ", style="dim")
            line.append(value, style="red" if label == "status" else "")
        _print(console, line)

    # Timeline scale.
    scale = Text(" " * (_NAME_COL + 2 * _NUM_COL + 1))
    scale.append(f"0{format_duration(total):>{bar_w + 1}}", style="dim")
    _print(console, scale)

    # Root attributes already summarised in the header are not repeated under the spans.
    header_keys = {k for group in (*_PEER_KEYS, *_LOCAL_KEYS) for k in group} | {_LISTENER_KEY}
    header_attrs = {k: v for k, v in root.attributes.items() if k in header_keys}
    for rec, depth in rows:
        indent = "  " * depth
        error = rec.is_error
        name_style = "bold red" if error else ("bold" if depth == 0 else "")
        label = Text(indent)
        label.append(rec.name or "(unnamed)", style=name_style)
        end = max(rec.end_ns, rec.start_ns)
        offset = "+" + format_duration(rec.start_ns - t0)
        row = _left(label, offset, format_duration(end - rec.start_ns), _NAME_COL)
        a, b = _cells(rec.start_ns, end, t0, total, bar_w)
        style = _STYLE_ERROR if error else (_STYLE_ROOT_BAR if depth == 0 else _STYLE_BAR)
        row.append_text(_bar(a, b, bar_w, style, "█" if end > rec.start_ns else "▏"))
        _print(console, row)

        detail_indent = indent + "   "
        pairs = _highlights(rec, header_attrs)
        if error:
            pairs.insert(0, ("status", "ERROR" + (f" {rec.status_message}" if rec.status_message else "")))
        if pairs:
            _print(console, _pairs_line(detail_indent, pairs))

        for ev_time, ev_name, ev_attrs in sorted(rec.events, key=lambda e: e[0]):
            ev_label = Text(detail_indent)
            ev_label.append("◆ ", style=_STYLE_EVENT)
            ev_label.append(ev_name or "(event)", style=_STYLE_EVENT)
            ev_row = _left(ev_label, "+" + format_duration(ev_time - t0), "", _NAME_COL)
            ev_row.append_text(_marker_bar([int((ev_time - t0) / total * bar_w)], bar_w))
            _print(console, ev_row)
            if ev_attrs:
                shown = [(k, _fmt_value(v)) for k, v in list(ev_attrs.items())[:_MAX_HIGHLIGHTS]]
                _print(console, _pairs_line(detail_indent + "  ", shown, value_style=""))
    console.print()


def render_records(
    records: Iterable[SpanRecord],
    console: Console,
    max_traces: int | None = None,
    trace_id: str | None = None,
) -> int:
    """Render records grouped into traces; returns the number of traces drawn.

    ``trace_id`` selects one trace (a unique hex prefix is enough); ``max_traces`` limits the output
    to the first N traces by start time.
    """
    traces = group_traces(records)
    if trace_id:
        wanted = trace_id.strip().lower()
        traces = {tid: spans for tid, spans in traces.items() if tid.startswith(wanted)}
        if not traces:
            console.print(f"no trace with id {trace_id}")
            return 0
    if not traces:
        console.print("no spans")
        return 0
    items = list(traces.items())
    shown = items if max_traces is None else items[: max(0, max_traces)]
    for _, spans in shown:
        render_trace(console, spans)
    if len(shown) < len(items):
        console.print(Text(f"… {len(items) - len(shown)} more trace(s) not shown", style="dim"))
    if trace_id is None:
        render_worker_balance(console, [r for spans in traces.values() for r in spans])
    return len(shown)


def worker_balance(records: Iterable[SpanRecord]) -> dict[str, Counter[str]]:
    """Per listener (its name, else ``:port``), the traced downstream connections each thread accepted."""
    out: dict[str, Counter[str]] = {}
    for rec in records:
        if rec.name != "envoy.downstream.connection":
            continue
        attrs = rec.attributes
        listener = attrs.get("envoy.listener.name") or f":{attrs.get('network.local.port', '?')}"
        out.setdefault(str(listener), Counter())[str(attrs.get("thread.name", "?"))] += 1
    return out


def render_worker_balance(console: Console, records: Iterable[SpanRecord], width: int = 30) -> None:
    """Which worker took each listener's traced connections, as bars (a skewed worker shows at a glance;
    the exact counts of every connection are the envoy.worker.connections.accepted metric)."""
    balance = worker_balance(records)
    if not balance:
        return
    console.print(Text("traced connections by listener and worker", style="bold"))
    for listener, threads in sorted(balance.items()):
        total = sum(threads.values())
        for thread, n in sorted(threads.items()):
            cells = max(1, round(width * n / total))
            line = Text(f"  {listener:<20} {thread:<16} ")
            line.append("█" * cells, style="cyan")
            line.append(f" {n} ({100 * n / total:.0f} %)")
            _print(console, line)


def render_file(
    path: str | os.PathLike[str],
    console: Console,
    max_traces: int | None = None,
    trace_id: str | None = None,
) -> int:
    """Render a JSON-lines OTLP/JSON span file as per-trace waterfalls; returns traces drawn.

    Raises ``ValueError("<path>: line N is not an OTLP/JSON request: ...")`` for malformed input.
    """
    return render_records(load_records(path), console, max_traces=max_traces, trace_id=trace_id)

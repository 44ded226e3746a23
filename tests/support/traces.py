"""Grouping exported spans into traces for assertions."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from otel_envoy.spans.model import SpanRecord

__all__ = ["Trace", "connection_traces", "format_traces", "group_traces", "service_of"]


@dataclass
class Trace:
    """All spans of one trace id, with the root and children by name."""

    trace_id: str
    spans: list[SpanRecord] = field(default_factory=list)

    @property
    def root(self) -> SpanRecord:
        roots = [s for s in self.spans if s.parent_span_id is None]
        assert len(roots) == 1, f"trace {self.trace_id} has {len(roots)} roots"
        return roots[0]

    def children(self, name: str) -> list[SpanRecord]:
        return [s for s in self.spans if s.name == name]

    def child(self, name: str) -> SpanRecord:
        found = self.children(name)
        assert len(found) == 1, f"trace {self.trace_id}: {len(found)} spans named {name}"
        return found[0]

    def assert_nested(self) -> None:
        """Every non-root span descends from the root and lies inside its parent's interval (an upstream
        connection may end after the request that opened it; an event-loop round, a worker's interval, only
        overlaps the connection it served)."""
        root = self.root
        by_id = {s.span_id: s for s in self.spans}
        for s in self.spans:
            if s is root:
                continue
            parent = by_id.get(s.parent_span_id or "")
            assert parent is not None, f"{s.name}'s parent is not in the trace"
            if s.name == "envoy.event_loop.round":  # the worker's round overlaps the connection it served
                assert s.start_ns <= parent.end_ns and parent.start_ns <= s.end_ns, (
                    f"round [{s.start_ns}, {s.end_ns}] misses {parent.name} "
                    f"[{parent.start_ns}, {parent.end_ns}]")
                continue
            # a pooled upstream connection outlives the request that made Envoy open it
            end_ok = s.end_ns <= parent.end_ns or s.name == "envoy.upstream.connection"
            assert parent.start_ns <= s.start_ns <= s.end_ns and end_ok, (
                f"{s.name} [{s.start_ns}, {s.end_ns}] outside {parent.name} "
                f"[{parent.start_ns}, {parent.end_ns}]")

    def parent_of(self, span: SpanRecord) -> SpanRecord | None:
        """The span's parent when it is in this trace."""
        return next((s for s in self.spans if s.span_id == span.parent_span_id), None)


def group_traces(spans: list[SpanRecord]) -> dict[str, Trace]:
    """trace id -> Trace."""
    out: dict[str, Trace] = defaultdict(lambda: Trace(""))
    for s in spans:
        t = out[s.trace_id]
        t.trace_id = s.trace_id
        t.spans.append(s)
    return dict(out)


def connection_traces(spans: list[SpanRecord], local_port: int | None = None) -> dict[int, Trace]:
    """peer port -> trace of that downstream connection (optionally only on ``local_port``)."""
    out: dict[int, Trace] = {}
    for trace in group_traces(spans).values():
        roots = [s for s in trace.spans if s.name == "envoy.downstream.connection"]
        if not roots:
            continue
        attrs = roots[0].attributes
        if local_port is not None and attrs.get("network.local.port") != local_port:
            continue
        out[attrs["network.peer.port"]] = trace
    return out


_KINDS = {0: "UNSPECIFIED", 1: "INTERNAL", 2: "SERVER", 3: "CLIENT", 4: "PRODUCER", 5: "CONSUMER"}


def service_of(span: SpanRecord) -> str:
    """The ``service.name`` of the span's resource ("" when none)."""
    return str(span.resource_attributes.get("service.name", ""))


def _span_lines(trace: Trace) -> list[str]:
    by_id = {s.span_id: s for s in trace.spans}
    children: dict[str | None, list[SpanRecord]] = defaultdict(list)
    for s in trace.spans:
        children[s.parent_span_id if s.parent_span_id in by_id else None].append(s)
    lines: list[str] = []
    stack = [(top, 1) for top in sorted(children[None], key=lambda c: c.start_ns, reverse=True)]
    while stack:
        span, depth = stack.pop()
        pad = "  " * depth
        outside = "" if span.parent_span_id in by_id else f" (parent {span.parent_span_id})"
        kind = _KINDS.get(span.kind, str(span.kind))
        lines.append(f"{pad}- [{service_of(span)}] {span.name} {kind} {span.span_id}{outside}")
        for t, sid, attrs in span.links:
            lines.append(f"{pad}    link -> {t}/{sid} {attrs.get('otel_envoy.link', '')}".rstrip())
        kids = sorted(children.get(span.span_id, []), key=lambda c: c.start_ns, reverse=True)
        stack.extend((k, depth + 1) for k in kids)
    return lines


def format_traces(spans: list[SpanRecord], trace_ids: list[str] | None = None) -> str:
    """The spans as indented trees, one per trace (only ``trace_ids``, in that order, when given). Each line:
    ``[service] name KIND span_id``, then its links; a span whose parent is absent shows that parent's id."""
    traces = group_traces(spans)
    lines: list[str] = []
    for trace_id in trace_ids if trace_ids is not None else list(traces):
        trace = traces.get(trace_id)
        lines.append(f"trace {trace_id}" + ("" if trace else ": no spans"))
        if trace is not None:
            lines.extend(_span_lines(trace))
    return "\n".join(lines)


def request_spans(trace: Trace) -> list[SpanRecord]:
    """The downstream request spans (SERVER, not the connection span) of a connection trace, oldest first."""
    return sorted((s for s in trace.spans if s.kind == 2 and s.name != "envoy.downstream.connection"),
                  key=lambda s: s.start_ns)


def upstream_requests_of(spans: list[SpanRecord], parent: SpanRecord) -> list[SpanRecord]:
    """The upstream request spans (CLIENT, not the upstream connection span) under ``parent``."""
    return [s for s in spans if s.kind == 3 and s.name != "envoy.upstream.connection"
            and s.parent_span_id == parent.span_id]

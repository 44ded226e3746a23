"""Grouping exported spans into traces for assertions."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from otel_envoy.export.records import SpanRecord

__all__ = ["Trace", "connection_traces", "group_traces"]


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
        """Every non-root span is a direct child of the root and inside its interval."""
        root = self.root
        for s in self.spans:
            if s is root:
                continue
            assert s.parent_span_id == root.span_id, f"{s.name} is not a child of the root"
            assert root.start_ns <= s.start_ns <= s.end_ns <= root.end_ns, (
                f"{s.name} [{s.start_ns}, {s.end_ns}] outside root [{root.start_ns}, {root.end_ns}]")


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

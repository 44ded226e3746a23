"""A canonical form of the spans a replay writes, so two replays can be compared for equality.

Span and trace ids are random per run; the canonical form names each id by its place in a stable order
of the spans (sorted by everything but ids), drops the resource's per-run `service.instance.id`, and keeps
every other field of every span as the OTLP/JSON line had it. Works on the raw JSON, not on the package's
decoder, so a change of the decoder cannot hide a change of the output.
"""

from __future__ import annotations

import json
from typing import Any

_PER_RUN_RESOURCE_KEYS = frozenset({"service.instance.id"})


def _sort_key(span: dict[str, Any]) -> str:
    without_ids = {k: v for k, v in span.items() if k not in ("traceId", "spanId", "parentSpanId", "links")}
    links = [{k: v for k, v in link.items() if k not in ("traceId", "spanId")}
             for link in span.get("links", [])]
    return json.dumps([without_ids, links], sort_keys=True)


def canonical_spans(jsonl_text: str) -> list[dict[str, Any]]:
    """Every span of an OTLP/JSON lines text with its resource and scope, ids renamed, in a stable order."""
    spans: list[dict[str, Any]] = []
    for line in jsonl_text.splitlines():
        if not line.strip():
            continue
        for rs in json.loads(line).get("resourceSpans", []):
            resource = [a for a in rs.get("resource", {}).get("attributes", [])
                        if a["key"] not in _PER_RUN_RESOURCE_KEYS]
            for ss in rs.get("scopeSpans", []):
                for span in ss.get("spans", []):
                    spans.append({**span, "_resource": resource, "_scope": ss.get("scope", {})})
    spans.sort(key=_sort_key)
    names: dict[str, str] = {}

    def name(value: str, kind: str) -> str:
        if not value:
            return value
        return names.setdefault(value, f"{kind}{len(names)}")

    for span in spans:
        name(span.get("traceId", ""), "trace")
        name(span.get("spanId", ""), "span")
    for span in spans:
        for key, kind in (("traceId", "trace"), ("spanId", "span"), ("parentSpanId", "span")):
            if key in span:
                span[key] = name(span[key], kind)
        for link in span.get("links", []):
            link["traceId"] = name(link.get("traceId", ""), "trace")
            link["spanId"] = name(link.get("spanId", ""), "span")
    return spans


def dumps(spans: list[dict[str, Any]]) -> str:
    """The canonical spans as the committed file holds them: one span per line, keys sorted."""
    return "".join(json.dumps(s, sort_keys=True) + "\n" for s in spans)


if __name__ == "__main__":  # python -m tests.support.golden SPANS.jsonl > tests/data/lab.spans.canonical
    import sys

    with open(sys.argv[1], encoding="utf-8") as f:
        sys.stdout.write(dumps(canonical_spans(f.read())))

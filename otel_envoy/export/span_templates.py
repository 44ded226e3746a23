"""What the OTLP/JSON and protobuf encoders share about templated spans (:class:`TemplatedSpan`).

An encoder writes a template's prototype with sentinels in the places its spans differ (span id, start,
end, the varying attribute's value, each event's time: in that order), cuts that encoding at the sentinels'
encodings, and remembers the pieces in ``template.encoded``; each span is the pieces with its own values
between them. A span the pieces do not fit (no start or end time, a value the encoding cannot cut) is
encoded in full.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import TypeVar

from otel_envoy.spans.model import SpanRecord, SpanTemplate, TemplatedSpan

__all__ = ["NO_PIECES", "cut_at_marks", "sentinel_copy", "template_pieces"]

_T = TypeVar("_T", str, bytes)
#: A template's encoding: the pieces between its spans' values, and the number of events it was made with.
Pieces = tuple[tuple, int]
NO_PIECES: Pieces = ((), -1)  # no encoding could be cut: the template's spans are encoded in full


def template_pieces(r: TemplatedSpan, encoding: str, make: Callable[[SpanTemplate], Pieces]) -> tuple | None:
    """The pieces of ``r``'s template in ``encoding`` (made by ``make`` the first time), or None when ``r``
    does not fit them."""
    template = r.template
    entry = template.encoded.get(encoding)
    if entry is None:
        entry = template.encoded[encoding] = make(template)
    pieces, n_events = entry
    if len(r.event_times) != n_events or not r.start_ns or not r.end_ns or not pieces:
        return None
    return pieces


def sentinel_copy(template: SpanTemplate, span_id: str, sentinels: Sequence[int]) -> SpanRecord:
    """The template's prototype with ``span_id`` and, in order, ``sentinels`` for its start, end, varying
    value and event times."""
    r = template.prototype
    return dataclasses.replace(
        r, span_id=span_id, start_ns=sentinels[0], end_ns=sentinels[1],
        attributes={**template.block.items, template.varying_key: sentinels[2]},
        events=[(sentinels[3 + i], name, attrs) for i, (_ts, name, attrs) in enumerate(r.events)])


def cut_at_marks(encoded: _T, marks: Sequence[tuple[_T, _T]], n_events: int) -> Pieces:
    """``encoded`` cut at each ``(before, value)`` mark: ``before`` stays with the piece in front, ``value``
    (a sentinel's encoding) goes. Every mark must be found exactly once, in order, else NO_PIECES."""
    pieces, last = [], 0
    for before, value in marks:
        mark = before + value
        at = encoded.find(mark, last)
        if at < 0 or encoded.find(mark, at + 1) >= 0 or encoded.find(mark) != at:
            return NO_PIECES
        pieces.append(encoded[last:at + len(before)])
        last = at + len(mark)
    pieces.append(encoded[last:])
    return tuple(pieces), n_events

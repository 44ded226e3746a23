"""The ledger of a run: at every stage of the pipeline, what came in equals what went on plus what was
dropped (counted, with a reason) plus what is still held.

Stages, top to bottom (``run --summary-json`` writes them under ``accounting``; docs/accounting.md):

* ``ring``: records the programs submitted (the kernel's count) = records user space read. Checked after
  the programs stopped producing and the ring was drained; records the ring had no room for never reach
  this line (``kernel.ringbuf_full``), runs the kernel skipped neither (``kernel.recursion_missed.*``).
* ``decoder``: records read = events decoded + records it could not decode (by reason).
* ``connections``: downstream connections accepted = connections finished (closed, evicted, still open at
  the end: every one is handed on).
* ``connection_spans``: connections finished = connection span sets built + the daemon's own connections
  left out + span-building errors.
* ``rounds``: event-loop rounds and off-CPU waits handed to the round worker = built + failed + dropped
  (its queue was full).
* ``span_queue``: spans built = spans offered to the export queue = accepted + queue full + refused
  while stopping; accepted = taken out of the queue + still queued + abandoned at shutdown.
* ``sink:<name>``: spans taken out of the queue (each goes to every sink) = left out as invalid + in
  batches whose encoder failed + handed to the sink's worker; handed = sent + refused + evicted from
  the bounded buffer + unsent at shutdown + still buffered.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["Stage", "ledger"]

Stage = dict[str, Any]


def _stage(came_in: int, went: Mapping[str, int]) -> Stage:
    """One line: ``in``, where it went (``out``), and whether the two agree."""
    out = {k: int(v) for k, v in went.items()}
    return {"in": int(came_in), "out": out, "holds": came_in == sum(out.values())}


def ledger(*, records_submitted: int, records_received: int, decoded: int, decode_errors: Mapping[str, int],
           correlator_stats: Mapping[str, int], counts: Mapping[str, int], rounds_offered: int | None,
           rounds_dropped: int, export: Mapping[str, Any]) -> dict[str, Stage]:
    """The stages of a finished run (see the module's text), each with ``holds``."""
    stages: dict[str, Stage] = {
        "ring": _stage(records_submitted, {"received": records_received}),
        "decoder": _stage(records_received, {"decoded": decoded, **decode_errors}),
        "connections": _stage(correlator_stats.get("accepts", 0),
                              {"finished": correlator_stats.get("connections", 0),
                               "sampled_out": correlator_stats.get("connections_sampled_out", 0)}),
        "connection_spans": _stage(correlator_stats.get("connections", 0), {
            "built": counts.get("connections", 0),
            "own_connections_left_out": counts.get("own_connections_left_out", 0),
            "build_errors": counts.get("span_build_errors.connections", 0)}),
    }
    if rounds_offered is not None:
        stages["rounds"] = _stage(rounds_offered, {
            "built": counts.get("rounds", 0) + counts.get("offcpu_waits", 0),
            "build_errors": counts.get("span_build_errors.rounds", 0)
            + counts.get("span_build_errors.offcpu_waits", 0),
            "dropped_queue_full": rounds_dropped})
    drops = export.get("drops", {})
    stages["span_queue"] = _stage(counts.get("spans", 0), {
        "accepted": export["accepted"], "queue_full": drops.get("queue_full", 0),
        "refused_stopping": export["refused_stopping"]})
    taken = export["processed"] - export["abandoned"]  # each batch taken out goes to every sink
    stages["span_queue_out"] = _stage(export["accepted"], {
        "processed": taken, "abandoned": export["abandoned"],
        "queued": export["queue_depth"] + export["in_flight"]})
    for name, sink in export.get("sinks", {}).items():
        stages[f"sink:{name}"] = _stage(taken, {
            "invalid_span": drops.get(f"invalid_span:{name}", 0),
            "encode_failed": drops.get(f"encode_failed:{name}", 0),
            "handed": sink["handed"]})
        stages[f"sink:{name}:delivery"] = _stage(sink["handed"], {
            k: sink[k] for k in ("sent", "failed", "buffer_full", "unsent", "buffered")})
    return stages

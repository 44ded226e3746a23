"""The ledger (otel_envoy/accounting.py): each stage's equation, and a stage that does not balance says so."""

from __future__ import annotations

from otel_envoy.accounting import ledger

EXPORT = {"accepted": 90, "refused_stopping": 0, "processed": 90, "abandoned": 0, "queue_depth": 0,
          "in_flight": 0, "drops": {"queue_full": 10, "invalid_span:jsonl": 1},
          "sinks": {"jsonl": {"handed": 89, "sent": 89, "failed": 0, "buffer_full": 0, "unsent": 0,
                              "buffered": 0}}}


def _accounts(**changes: object) -> dict:
    args: dict = {"records_submitted": 500, "records_received": 500, "decoded": 499,
                  "decode_errors": {"short_record": 1}, "correlator_stats": {"accepts": 7, "connections": 7},
                  "counts": {"connections": 6, "own_connections_left_out": 1, "spans": 100, "rounds": 3},
                  "rounds_offered": 4, "rounds_dropped": 1, "export": EXPORT}
    args.update(changes)
    return ledger(**args)


def test_a_run_whose_counts_agree_balances_everywhere() -> None:
    accounts = _accounts()
    assert all(stage["holds"] for stage in accounts.values()), accounts
    queue = accounts["span_queue"]
    assert queue["in"] == 100 and queue["out"] == {"accepted": 90, "queue_full": 10, "refused_stopping": 0}


def test_a_record_read_but_never_submitted_or_a_lost_span_breaks_its_stage_only() -> None:
    accounts = _accounts(records_received=499, decoded=498)
    assert [n for n, s in accounts.items() if not s["holds"]] == ["ring"]
    export = {**EXPORT, "sinks": {"jsonl": {**EXPORT["sinks"]["jsonl"], "sent": 88}}}
    accounts = _accounts(export=export)
    assert [n for n, s in accounts.items() if not s["holds"]] == ["sink:jsonl:delivery"]

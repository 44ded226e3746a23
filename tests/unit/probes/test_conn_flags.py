"""The conn_state flags (bpf/state.bpf.h, and CONN_ADOPTED in bpf/events.h, which user space sets) are
distinct bits: two flags sharing a bit make one mean the other (a summarised request's connection looked
adopted and was left out of the connection metrics)."""

from __future__ import annotations

import re
from pathlib import Path

BPF = Path(__file__).resolve().parents[3] / "bpf"
FLAG = re.compile(r"^#define (CONN_[A-Z_]+) (\d+)\b", re.MULTILINE)


def test_every_conn_state_flag_is_its_own_bit() -> None:
    flags = {name: int(value) for path in ("events.h", "state.bpf.h")
             for name, value in FLAG.findall((BPF / path).read_text())}
    assert {"CONN_ADOPTED", "CONN_SUMMARY", "CONN_SKIP", "CONN_SAW_IO"} <= set(flags)
    assert all(v > 0 and v & (v - 1) == 0 for v in flags.values()), flags  # one bit each
    assert len(set(flags.values())) == len(flags), flags  # no two alike

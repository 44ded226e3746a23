"""The committed recordings replay to exactly the committed spans (ids aside): reshaping changes no output.

tests/data/NAME.spans.canonical is the canonical form (tests/support/golden.py) of what `otel-envoy replay
tests/data/NAME.events` wrote when it was made. lab.events holds plain HTTP/1.1, TLS 1.3 and 1.2, a reset
and a burst; h2c_rounds.events adds h2c and every event-loop round and off-CPU wait (see the make_*.py beside
them). A change that means to alter the spans regenerates them with `otel-envoy replay tests/data/NAME.events
--output /tmp/s.jsonl && python -m tests.support.golden /tmp/s.jsonl > tests/data/NAME.spans.canonical` and
shows the diff in its commit.
"""

from __future__ import annotations

import difflib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.golden import canonical_spans, dumps

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "tests" / "data"


@pytest.mark.parametrize(("name", "min_spans"), [("lab", 100), ("h2c_rounds", 100)])
def test_replay_matches_the_committed_spans(tmp_path: Path, name: str, min_spans: int) -> None:
    out = tmp_path / "spans.jsonl"
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    proc = subprocess.run([sys.executable, "-m", "otel_envoy.cli", "replay", str(DATA / f"{name}.events"),
                           "--output", str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    got = dumps(canonical_spans(out.read_text()))
    want = (DATA / f"{name}.spans.canonical").read_text()
    assert got.count("\n") > min_spans  # an empty replay must not pass
    diff = "".join(difflib.unified_diff(want.splitlines(True), got.splitlines(True),
                                        "committed", "replayed", n=1))
    assert got == want, diff[:20000]

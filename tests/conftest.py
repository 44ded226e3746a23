"""Run-wide rules. As root (how CI runs the suite, after scripts/setup.sh installed every tool), a skipped
test is a failure: a test skipped because its tool or its privilege is missing would otherwise let a broken
install pass green. ``OTEL_ENVOY_ALLOW_SKIPS=1`` lets a root run on a partial machine skip all the same."""

from __future__ import annotations

import os
from collections.abc import Generator

import pytest

_STRICT = os.geteuid() == 0 and os.environ.get("OTEL_ENVOY_ALLOW_SKIPS") != "1"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, None, None]:
    """Turn a skip into a failure in a strict (root) run."""
    outcome = yield
    report = outcome.get_result()
    if not (_STRICT and report.skipped) or hasattr(report, "wasxfail"):
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    report.outcome = "failed"
    report.longrepr = (f"skipped in a root run: {reason}\n(a root run has every tool scripts/setup.sh "
                       "installs; OTEL_ENVOY_ALLOW_SKIPS=1 allows skips)")

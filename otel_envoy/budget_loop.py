"""The CPU budget at work: once a second, the daemon's share of a CPU and the kept records the kernel sent to
:class:`~.sampling.CpuBudget`, and what it changes to the kernel (the ratio's threshold, the keep rate) and to
the pipeline (the ratio, for the upstream requests user space samples)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from .sampling import CpuBudget, kernel_threshold

__all__ = ["BUDGET_INTERVAL_S", "keep_to_budget"]

log = logging.getLogger("otel_envoy.daemon")

BUDGET_INTERVAL_S = 1.0


async def keep_to_budget(budget: CpuBudget, probes: Any, publish_ratio: Callable[[float], None]) -> None:
    """Run until cancelled: each interval, the share of a CPU all the daemon's threads used and the kept
    records a second (``probes``: a loaded :class:`~.probes.loader.ConnectionProbes`) to ``budget``; a changed
    ratio to the kernel and to ``publish_ratio``, a changed keep rate to the kernel."""
    wall, cpu, kept = time.monotonic(), time.process_time(), _kept_sent(probes)
    ratio, keep_rate = budget.ratio, budget.keep_rate
    while True:
        await asyncio.sleep(BUDGET_INTERVAL_S)
        now_wall, now_cpu, now_kept = time.monotonic(), time.process_time(), _kept_sent(probes)
        elapsed = max(now_wall - wall, 1e-3)
        step = budget.observe((now_cpu - cpu) / elapsed, (now_kept - kept) / elapsed)
        wall, cpu, kept = now_wall, now_cpu, now_kept
        if step is None:
            continue
        if step.ratio != ratio:
            probes.set_sample_threshold(kernel_threshold(step.ratio))
            publish_ratio(step.ratio)
        if step.keep_rate != keep_rate:
            probes.set_keep_rate(step.keep_rate)
        ratio, keep_rate = step
        log.info("CPU budget %.2f: tracing %.4g of plaintext requests, kept records %s a second",
                 budget.budget, step.ratio, step.keep_rate or "any number")


def _kept_sent(probes: Any) -> int:
    """Kept records the kernel sent so far."""
    return probes.keep_counts().get("sent", 0)

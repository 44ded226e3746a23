"""Which requests are traced: the OpenTelemetry sampler settings, turned into the kernel's decision.

Configured the OpenTelemetry way: ``OTEL_TRACES_SAMPLER`` / ``OTEL_TRACES_SAMPLER_ARG``, or ``--sampler`` /
``--sampler-arg`` (flags win):

* ``parentbased_traceidratio`` (the default, ratio :data:`DEFAULT_RATIO` unless an argument is given): a
  request with a valid ``traceparent`` header is traced when its sampled flag is set and not otherwise;
  one without is traced with the ratio's probability;
* ``parentbased_always_on``: the same, and every request without a traceparent is traced;
* ``parentbased_always_off``: only requests whose traceparent says sampled are traced;
* ``always_on``: every request is traced; ``always_off``: none (connection traces are kept);
* ``traceidratio`` with a ratio in [0, 1] (default 1.0), whatever a traceparent says.

Every plaintext HTTP/1.x request is decided in the kernel at its first read (bpf/sampling.bpf.h, the header
read by bpf/traceparent.bpf.h), so a request that is not traced costs no ring record; all of them are
counted in the request metrics. The ratio's decision is random rather than a function of the trace id,
because the kernel decides before any header is parsed; over many requests it keeps the same share.

Requests and connections the sampler leaves out are traced all the same when something went wrong with them
(:class:`KeepThresholds`: 5xx, closed before an answer, slow; a failed or slow TLS handshake, a reset, a long
wait in the accept queue), decided in the kernel when they complete.

A CPU budget (``--cpu-budget``, :class:`CpuBudget`) lowers the ratio while the daemon uses more than its
share of a CPU, and raises it back when it can; a sampled parent is always followed.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from socket import AF_INET6
from typing import Any, NamedTuple

__all__ = [
    "DEFAULT_CPU_BUDGET",
    "DEFAULT_KEEP_RATE",
    "DEFAULT_KEEP_SLOW_ACCEPT_MS",
    "DEFAULT_KEEP_SLOW_HANDSHAKE_MS",
    "DEFAULT_KEEP_SLOW_MS",
    "DEFAULT_RATIO",
    "DEFAULT_SAMPLER",
    "MIN_BUDGET_RATIO",
    "MIN_KEEP_RATE",
    "SAMPLERS",
    "BudgetStep",
    "CpuBudget",
    "KeepThresholds",
    "SamplerError",
    "SamplerSettings",
    "kernel_threshold",
    "peer_hash",
    "sampler_settings",
]

#: Sampler names this build accepts.
SAMPLERS = ("parentbased_traceidratio", "parentbased_always_on", "parentbased_always_off", "always_on",
            "always_off", "traceidratio")
#: The default sampler and its ratio: 1 % of the requests that carry no traceparent. At 50k requests per
#: second that is 500 traces a second, ~2 % of one CPU for the daemon (docs/overhead.md); errors and every
#: request's metrics do not depend on it.
DEFAULT_SAMPLER = "parentbased_traceidratio"
DEFAULT_RATIO = 0.01


class SamplerError(ValueError):
    """An unknown sampler name or a ratio out of range (message is one line)."""


@dataclass(frozen=True, slots=True)
class SamplerSettings:
    """The sampler chosen, its ratio of requests traced when no parent decides (1.0 for always_on, 0.0 for
    always_off), and whether a request's traceparent decides first."""

    name: str
    ratio: float
    parent_based: bool = False

    def kernel_threshold(self) -> int:
        """The kernel's threshold for this sampler's ratio (:func:`kernel_threshold`)."""
        return kernel_threshold(self.ratio)


def kernel_threshold(ratio: float) -> int:
    """The threshold the kernel compares a 32-bit random number with: a request is sampled when below it."""
    return round(ratio * 2**32)


def _ratio(text: str) -> float:
    try:
        ratio = float(text)
    except ValueError:
        raise SamplerError(f"sampler argument {text!r} is not a number (a ratio from 0 to 1)") from None
    if not 0.0 <= ratio <= 1.0:
        raise SamplerError(f"sampler argument {text} is out of range (a ratio from 0 to 1)")
    return ratio


def sampler_settings(name: str | None = None, arg: str | None = None,
                     env: Mapping[str, str] | None = None) -> SamplerSettings:
    """The sampler from the flags (``name``, ``arg``) over the environment's ``OTEL_TRACES_SAMPLER(_ARG)``."""
    env = os.environ if env is None else env
    chosen = (name if name is not None else env.get("OTEL_TRACES_SAMPLER") or DEFAULT_SAMPLER).strip().lower()
    arg = arg if arg is not None else env.get("OTEL_TRACES_SAMPLER_ARG")
    if chosen not in SAMPLERS:
        raise SamplerError(f"unknown sampler {chosen!r}; use one of {', '.join(SAMPLERS)}")
    parent_based = chosen.startswith("parentbased_")
    root = chosen.removeprefix("parentbased_")
    if root == "always_on":
        return SamplerSettings(chosen, 1.0, parent_based)
    if root == "always_off":
        return SamplerSettings(chosen, 0.0, parent_based)
    default = DEFAULT_RATIO if parent_based else 1.0
    return SamplerSettings(chosen, _ratio(arg) if arg not in (None, "") else default, parent_based)


#: Default threshold (``--keep-slow-ms``) over which a request that was not sampled is kept all the same: one
#: second is well past the latency objectives of interactive APIs behind a gateway (tens to hundreds of ms),
#: so only what a user would call slow is kept, and how many stays small when a backend stalls.
DEFAULT_KEEP_SLOW_MS = 1000.0

#: Default thresholds over which a connection sampled whole and not traced (a TLS listener's) is kept all the
#: same, at its close. A TLS handshake as the server sees it (from the ClientHello to the client's Finished)
#: is one round trip plus both sides' crypto: a few ms in a data centre, up to a few hundred ms for a client
#: on another continent or a mobile network. One second (``--keep-slow-handshake-ms``) is past that
#: anywhere, so what is kept is a handshake that lost packets, a client that stalled or a starved worker.
DEFAULT_KEEP_SLOW_HANDSHAKE_MS = 1000.0
#: Envoy's worker accepts a connection as soon as its event loop sees the listener readable: microseconds,
#: a millisecond under load. A 100 ms wait in the accept queue (``--keep-slow-accept-ms``) means the worker's
#: loop was blocked or overloaded, which is what the kept connection then shows.
DEFAULT_KEEP_SLOW_ACCEPT_MS = 100.0
#: Kept records a second at most (``--keep-rate``; 0: no ceiling). By default none: every anomaly is kept
#: while the daemon is within its CPU budget, and the budget (:class:`CpuBudget`) lowers the rate only once
#: the ratio is at its floor, so a flood of failures (a TLS scanner, a backend failing every request at
#: saturation) cannot take the daemon past its share of a CPU; what was refused is counted, and the metrics
#: count every one.
DEFAULT_KEEP_RATE = 0
#: The lowest keep rate the budget lowers it to (records a second): a trickle of anomalies stays traced.
MIN_KEEP_RATE = 10


@dataclass(frozen=True, slots=True)
class KeepThresholds:
    """How slow a request or connection the sampler left out must be to be traced all the same (ms; 0:
    never for being slow; 5xx and requests closed before an answer, failed TLS handshakes and resets are
    kept whatever these say), and how many such a second at most."""

    request_ms: float = DEFAULT_KEEP_SLOW_MS
    handshake_ms: float = DEFAULT_KEEP_SLOW_HANDSHAKE_MS
    accept_ms: float = DEFAULT_KEEP_SLOW_ACCEPT_MS
    rate: float = DEFAULT_KEEP_RATE  # kept records a second at most (0: no limit)

    def apply(self, probes: Any) -> None:
        """Hand the thresholds to the kernel (a loaded :class:`~.probes.loader.ConnectionProbes`)."""
        probes.set_keep_slow(int(self.request_ms * 1e6))
        probes.set_keep_slow_connections(int(self.handshake_ms * 1e6), int(self.accept_ms * 1e6))
        probes.set_keep_rate(int(self.rate))


#: Default share of one CPU the daemon may use before it traces fewer requests (``--cpu-budget``).
DEFAULT_CPU_BUDGET = 0.1
#: The lowest share of requests the budget lowers the ratio to.
MIN_BUDGET_RATIO = 1 / 65536


class BudgetStep(NamedTuple):
    """What the budget set: the ratio and the keep rate now in force (kept records a second, 0: no limit)."""

    ratio: float
    keep_rate: int


class CpuBudget:
    """Keeps the daemon within ``budget`` of one CPU by lowering the share of requests traced, then the rate
    of what is kept all the same.

    Once a second the daemon reports the share of a CPU it used and the kept records the kernel sent a
    second (:meth:`observe`). Above the budget the ratio is halved (down to :data:`MIN_BUDGET_RATIO`); once it
    is there, the keep rate is halved instead (from what was kept, down to :data:`MIN_KEEP_RATE`). Below half
    of the budget the keep rate comes back first (doubling, until it is well above what is kept: no limit, or
    ``keep_ceiling``), then the ratio doubles back, never above the sampler's own. What the kernel did not
    sample or did not keep is counted there, so what was not traced is known.
    """

    def __init__(self, budget: float, ratio: float, keep_ceiling: int = DEFAULT_KEEP_RATE) -> None:
        self.budget = budget
        self.configured = ratio
        self.ratio = ratio
        self.lowest = ratio
        self.keep_ceiling = keep_ceiling  # --keep-rate (0: none)
        self.keep_rate = keep_ceiling  # in force (0: no limit)
        self.keep_lowest = keep_ceiling
        self.changes = 0
        self.highest_share = 0.0

    def observe(self, share: float, kept_per_s: float = 0.0) -> BudgetStep | None:
        """The CPU share of the last interval and the kept records sent a second; what is in force when
        something changed, else None."""
        self.highest_share = max(self.highest_share, share)
        ratio, keep = self.ratio, self.keep_rate
        if share > self.budget:
            if ratio > MIN_BUDGET_RATIO:
                ratio = max(ratio / 2, MIN_BUDGET_RATIO)
            else:  # the sampler is at its floor: what is left is what is kept all the same
                base = keep or int(kept_per_s)
                if base > MIN_KEEP_RATE:
                    keep = max(MIN_KEEP_RATE, base // 2)
        elif share < self.budget / 2:
            if keep != self.keep_ceiling:  # kept records come back first
                keep *= 2
                if self.keep_ceiling and keep >= self.keep_ceiling:
                    keep = self.keep_ceiling
                elif not self.keep_ceiling and keep > 4 * kept_per_s + MIN_KEEP_RATE:  # no longer binding
                    keep = 0
            elif ratio < self.configured:
                ratio = min(ratio * 2, self.configured)
        if (ratio, keep) == (self.ratio, self.keep_rate):
            return None
        self.ratio, self.keep_rate, self.changes = ratio, keep, self.changes + 1
        self.lowest = min(self.lowest, ratio)
        if keep and (not self.keep_lowest or keep < self.keep_lowest):
            self.keep_lowest = keep
        return BudgetStep(ratio, keep)

    def summary(self) -> dict[str, float | int]:
        """What the budget did, for the run's summary."""
        return {"budget": self.budget, "ratio_now": self.ratio, "ratio_lowest": self.lowest,
                "keep_rate_now": self.keep_rate, "keep_rate_lowest": self.keep_lowest,
                "changes": self.changes, "highest_share": round(self.highest_share, 3)}


def peer_hash(peer_raw: bytes, family: int, port: int) -> int:
    """``peer_hash()`` of bpf/conn_sampling.bpf.h: the 32-bit hash of a peer (address bytes as the kernel's
    sockaddr holds them, host-order port) by which the kernel samples whole connections. User space uses it
    for connections it hands to the kernel itself (adopted ones), so both reach the same decision."""
    m = 0xFFFFFFFF
    raw = (peer_raw[:16] if family == AF_INET6 else peer_raw[:4]).ljust(16, b"\0")
    w = [int.from_bytes(raw[i:i + 4], "little") for i in range(0, 16, 4)]
    h = (port * 0x9E3779B1) & m
    h ^= (w[0] * 0x85EBCA77) & m
    h ^= (w[1] * 0xC2B2AE3D) & m
    h ^= (w[2] * 0x27D4EB2F) & m
    h ^= (w[3] * 0x165667B1) & m
    h ^= h >> 15
    h = (h * 0x2C1B3C6D) & m
    h ^= h >> 12
    return h

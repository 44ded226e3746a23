"""What the end-of-run summary (``--summary-json``) and the per-worker metrics read from the kernel's tables
and the correlator, in the shapes they report."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import Any

from .correlate.correlator import ConnectionCorrelator
from .correlate.kept_connections import KEPT_CONNECTION_REASONS
from .correlate.round_tracker import OFFCPU_REASONS
from .envoy.listen_socket import ListenSocket
from .envoy.threads import thread_identity
from .probes.loader import ConnectionProbes, RequestSeries, RequestTotals, TlsSeries
from .protocols.tls.names import tls_version_name

__all__ = [
    "accepts_by_worker",
    "kernel_tables",
    "offcpu_by_reason",
    "request_totals",
    "sampler_decisions",
    "tls_totals",
    "wakes_by_kind",
    "worker_accepts",
]


def sampler_decisions(probes: ConnectionProbes) -> dict[str, dict[str, int]]:
    """The sampler's summary of whole connections: decided per kind (traced, not), those it left out that
    the kernel kept at their close, by reason, and the kept requests and connections over the keep rate."""
    decided = {f"{kind}_connections": probes.connection_sample_counts(kind)
               for kind in ("tls", "h2c", "other")}
    kept = probes.kept_connection_counts()
    kept_by_reason = {"without_handshake_bytes": kept.get(0, 0),
                      **{name: kept.get(n, 0) for n, name in KEPT_CONNECTION_REASONS.items()}} if kept else {}
    keeps = probes.keep_counts()
    return {**decided, "kept_connections": kept_by_reason, "kept_records_sent": keeps.pop("sent", 0),
            "kept_over_rate": keeps}


def request_totals(series: Mapping[RequestSeries, RequestTotals]) -> dict[str, Any]:
    """The kernel's request counts for the summary: in all, by status code and by method."""
    by_status: Counter[str] = Counter()
    by_method: Counter[str] = Counter()
    for key, totals in series.items():
        by_status[str(key.status)] += totals.count
        by_method[key.method] += totals.count
    return {"total": sum(by_status.values()), "by_status": dict(sorted(by_status.items())),
            "by_method": dict(sorted(by_method.items()))}


def tls_totals(series: Mapping[TlsSeries, RequestTotals]) -> dict[str, int]:
    """The kernel's TLS handshake counts for the summary: by "<version>/<resumed|full>/<outcome>"."""
    out: dict[str, int] = {}
    for key, totals in series.items():
        name = f"{tls_version_name(key.version) if key.version else 'unknown'}/" \
               f"{'resumed' if key.resumed else 'full'}/{key.outcome}"
        out[name] = out.get(name, 0) + totals.count
    return dict(sorted(out.items()))


def offcpu_by_reason(totals: dict[tuple[int, int], tuple[int, int, int]]) -> dict[str, dict[str, int]]:
    """Kernel off-CPU totals of all target threads by reason name: ns, runnable ns, waits."""
    out: dict[str, dict[str, int]] = {}
    for (_tid, reason), (ns, runnable, waits) in totals.items():
        agg = out.setdefault(OFFCPU_REASONS.get(reason, str(reason)), {"ns": 0, "runnable_ns": 0, "waits": 0})
        agg["ns"] += ns
        agg["runnable_ns"] += runnable
        agg["waits"] += waits
    return out


def wakes_by_kind(wakes: dict[tuple[int, str], tuple[int, int]]) -> dict[str, dict[str, int]]:
    """Idle wake-ups of all target threads by waker kind: ns asleep before them, wake-ups."""
    out: dict[str, dict[str, int]] = {}
    for (_tid, kind), (ns, count) in wakes.items():
        agg = out.setdefault(kind, {"ns": 0, "wakeups": 0})
        agg["ns"] += ns
        agg["wakeups"] += count
    return out


def accepts_by_worker(probes: ConnectionProbes, correlator: ConnectionCorrelator
                      ) -> Mapping[tuple[int, int, str, int], int]:
    """Accepts by (process, thread, thread name, listening fd): the kernel's count of every connection,
    traced or not, in sampling builds (each thread named as its accept events gave it, else from /proc; ""
    for a thread gone unseen); without them, the accepts that reached the correlator."""
    if not probes.config.sampling:
        return correlator.accepts_by_thread
    names = {tid: name for (_pid, tid, name, _fd) in list(correlator.accepts_by_thread)}
    return {(tgid, tid, names.get(tid) or thread_identity(tid)[1], fd): n
            for (tgid, tid, fd), n in probes.accepts_by_thread().items()}


def worker_accepts(accepts: Mapping[tuple[int, int, str, int], int],
                    sockets: Mapping[tuple[int, int], ListenSocket]) -> list[dict[str, Any]]:
    """--summary-json rows: accepts by process, thread and listening socket (its port and listener)."""
    rows = []
    for (pid, tid, name, fd), n in sorted(accepts.items()):
        listen = sockets.get((pid, fd))
        rows.append({"pid": pid, "tid": tid, "thread": name, "listen_fd": fd,
                     "port": listen.port if listen else None,
                     "listener": listen.listener_name if listen else None, "accepted": n})
    return rows


def kernel_tables(probes: ConnectionProbes, correlator: ConnectionCorrelator) -> dict[str, Any]:
    """The summary's figures from the kernel's exact tables (read before the probes close):
    ``http_requests``, ``connections_closed`` (by process:listening fd) and ``connections_closed_by_reason``,
    ``accept_queue``, ``tls_handshakes`` and ``accepts_by_worker``."""
    closed: Counter[str] = Counter()
    by_reason: Counter[str] = Counter()
    for (pid, fd, reason), totals in sorted(probes.connection_metrics().items()):
        closed[f"{pid}:{fd}"] += totals.count
        by_reason[reason] += totals.count
    return {
        "http_requests": request_totals(probes.http_request_metrics()),
        "connections_closed": dict(closed),
        "connections_closed_by_reason": dict(by_reason),
        "accept_queue": {"waits": sum(t.count for t in probes.accept_queue_metrics().values()),
                         "not_seen": probes.accept_waits_not_seen()},
        "tls_handshakes": tls_totals(probes.tls_handshake_metrics()),
        "accepts_by_worker": worker_accepts(accepts_by_worker(probes, correlator),
                                            correlator.downstream.listen_sockets),
    }

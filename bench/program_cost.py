"""Time spent inside our BPF programs per request, from the kernel's own accounting (root).

Envoy's CPU per request (bench/probe_cost.py, bench/overhead.py) moves by +-30 % on this shared machine when
other tenants load the host, which hides a difference of a few percent. The kernel can instead time every
run of every BPF program (``kernel.bpf_stats_enabled``: ``run_time_ns`` and ``run_cnt`` in each program's
fdinfo). This benchmark loads the connection program (connection spans only, as `--no-requests`; off-CPU
probes on unless ``--no-offcpu``), drives one direct-response Envoy (1 worker on CPU 0) with wrk keep-alive
(32 connections, CPU 1), and reports per program: runs, ns per run and ns per request. The sum is what our
programs add to a request; the tracepoints' own dispatch (and the syscall slow path they switch on) comes on
top and is not in these counters.

``--workload tls_new`` drives a new TLS connection per request instead (wrk over https with ``Connection:
close``, 16 connections; wrk resumes its first TLS session on the later ones) with request capture on, as
the daemon runs by default: the per-connection path (accept, listener filters' peek, TLS records walked and
their first bytes captured, close). With ``--sample-ratio`` the TLS listener's connections are sampled
whole with that ratio, as the daemon has them once it saw the listener is TLS (the untraced ones' path:
handshake steps, held hello bytes, close).

``--baseline-bpf DIR`` loads a second program from DIR (the bpf/ directory of another revision: conn.bpf.c,
its *.bpf.h units and events.h, e.g. from ``git archive REV bpf | tar -x -C DIR --strip-components=1``) and
alternates the two, so both see the same machine.

``--rate N`` drives a fixed N requests/s with h2load (``--rps``, 20 connections) instead of saturating wrk:
below saturation the worker sleeps in epoll_wait between requests, so context switches (and the scheduler
probes) come per request. ``--capture`` turns request capture on for the keep-alive workload.

Usage:  .venv/bin/python bench/program_cost.py [--rounds 3] [--seconds 5] [--baseline-bpf DIR] [--no-offcpu]
                                              [--workload keepalive|tls_new] [--rate N] [--capture]
                                              [--sample-ratio R]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from overhead import RESULTS, cpu_seconds, h2load, wrk

from otel_envoy.envoy.process import listening_sockets
from otel_envoy.lab.lab import EnvoyLab
from otel_envoy.probes import loader
from otel_envoy.sampling import kernel_threshold

STATS = Path("/proc/sys/kernel/bpf_stats_enabled")


def program_stats(probes: loader.ConnectionProbes) -> dict[str, tuple[int, int]]:
    """run_time_ns and run_cnt of every program of the loaded object, by name."""
    out: dict[str, tuple[int, int]] = {}
    for name, fn in probes.bpf.funcs.items():
        text = Path(f"/proc/self/fdinfo/{fn.fd}").read_text()
        fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
        out[name.decode()] = (int(fields.get("run_time_ns", 0)), int(fields.get("run_cnt", 0)))
    return out


def load(source: Path | None, offcpu: bool, http_capture: bool = False,
         sample_ratio: float | None = None) -> loader.ConnectionProbes:
    """The connection program from the working tree, or from ``source``; with ``sample_ratio``, the
    sampling build (the daemon's default) sampling that share of requests."""
    config = loader.ProbeConfig(http_capture=http_capture, offcpu=offcpu, sampling=sample_ratio is not None)
    if source is not None:
        config = dataclasses.replace(config, program_dir=source)
    probes = loader.ConnectionProbes(config)
    if sample_ratio is not None:
        probes.set_sample_threshold(kernel_threshold(sample_ratio))
        probes.set_parent_based(True)  # the default sampler: parentbased_traceidratio
    return probes


RATE_CLIENTS = 20  # h2load connections of a fixed-rate run


def one_run(lab: EnvoyLab, source: Path | None, offcpu: bool, seconds: float, workload: str = "keepalive",
            rate: int | None = None, capture: bool = False, sample_ratio: float | None = None) -> dict:
    """Load, run the client (wrk; h2load at a fixed ``rate``), read the counters, unload."""
    tls = workload == "tls_new"
    probes = load(source, offcpu, http_capture=tls or capture or sample_ratio is not None,
                  sample_ratio=sample_ratio)
    try:
        probes.add_targets([lab.pid])
        probes.set_listen_ports([lab.tls_port if tls else lab.http_port])
        if tls and sample_ratio is not None:  # as the daemon does once it saw the listener is TLS
            probes.sample_connections_of({key: sock.port for key, sock in listening_sockets(lab.pid).items()
                                          if sock.port == lab.tls_port})
        probes.open_ring_buffer(lambda _raw: None)
        before, envoy0 = program_stats(probes), cpu_seconds(lab.pid)
        if rate:
            url = f"https://127.0.0.1:{lab.tls_port}/" if tls else f"http://127.0.0.1:{lab.http_port}/"
            r = h2load(url, int(rate * seconds), RATE_CLIENTS, ["Connection: close"] if tls else [],
                       rps_per_client=max(1, rate // RATE_CLIENTS))
        elif tls:
            r = wrk(f"https://127.0.0.1:{lab.tls_port}/", seconds, 16, ["-H", "Connection: close"])
        else:
            r = wrk(f"http://127.0.0.1:{lab.http_port}/", seconds, 32, [])
        after, envoy1 = program_stats(probes), cpu_seconds(lab.pid)
        probes.consume()
    finally:
        probes.close()
    requests = max(r["requests"], 1)
    programs = {}
    for name, (ns1, cnt1) in after.items():
        ns0, cnt0 = before.get(name, (0, 0))
        if cnt1 - cnt0:
            programs[name] = {"runs": cnt1 - cnt0, "ns_per_run": (ns1 - ns0) / (cnt1 - cnt0),
                              "ns_per_request": (ns1 - ns0) / requests}
    return {"rps": r["rps"], "requests": r["requests"],
            "envoy_cpu_us_per_req": (envoy1 - envoy0) / requests * 1e6,
            "ns_per_request": sum(p["ns_per_request"] for p in programs.values()), "programs": programs}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--baseline-bpf", type=Path, help="bpf/ directory to compare (all its units)")
    ap.add_argument("--no-offcpu", dest="offcpu", action="store_false", help="without the scheduler probes")
    ap.add_argument("--workload", choices=("keepalive", "tls_new"), default="keepalive")
    ap.add_argument("--rate", type=int, help="a fixed request rate (h2load --rps over 20 connections) "
                    "instead of saturating wrk: below saturation the worker sleeps between requests")
    ap.add_argument("--capture", action="store_true",
                    help="keepalive with request capture on (the daemon's default build)")
    ap.add_argument("--sample-ratio", type=float,
                    help="the sampling build (request capture on) with the default parent-based sampler, "
                         "sampling this share of the requests without a traceparent")
    args = ap.parse_args()
    variants: dict[str, Path | None] = {"current": None}
    if args.baseline_bpf:
        loader.program_text(args.baseline_bpf)  # every unit is there: fail now, not after starting Envoy
        variants["baseline"] = args.baseline_bpf
    old_stats = STATS.read_text().strip()
    STATS.write_text("1")
    runs: dict[str, list[dict]] = {name: [] for name in variants}
    try:
        with EnvoyLab(concurrency=1, direct_response=True, cpu=0, log_level="error") as lab:
            wrk(f"http://127.0.0.1:{lab.http_port}/", 2, 8, [])  # warm-up
            for i in range(args.rounds):
                names = list(variants) if i % 2 == 0 else list(reversed(variants))
                for name in names:
                    r = one_run(lab, variants[name], args.offcpu, args.seconds, args.workload, args.rate,
                                args.capture, args.sample_ratio)
                    runs[name].append(r)
                    top = sorted(r["programs"].items(), key=lambda kv: -kv[1]["ns_per_request"])[:3]
                    print(f"{name:9s} {r['rps']:9.0f} req/s  Envoy {r['envoy_cpu_us_per_req']:5.2f} us/req  "
                          f"programs {r['ns_per_request']:6.1f} ns/req  ("
                          + ", ".join(f"{n} {p['ns_per_request']:.1f} ns/req, {p['ns_per_run']:.0f} ns/run"
                                      for n, p in top) + ")", flush=True)
    finally:
        STATS.write_text(old_stats)
    summary = {name: {"ns_per_request_median": statistics.median(r["ns_per_request"] for r in rs),
                      "envoy_cpu_us_per_req_median": statistics.median(r["envoy_cpu_us_per_req"] for r in rs)}
               for name, rs in runs.items()}
    for name, s in summary.items():
        print(f"median {name:9s} programs {s['ns_per_request_median']:6.1f} ns/request, "
              f"Envoy {s['envoy_cpu_us_per_req_median']:5.2f} us/request")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"program_cost-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"workload": args.workload, "offcpu": args.offcpu, "seconds": args.seconds,
                               "rate": args.rate, "capture": args.capture, "sample_ratio": args.sample_ratio,
                               "runs": runs,
                               "summary": summary}, indent=2))
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

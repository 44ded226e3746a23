"""Side-by-side overhead benchmark: one Envoy, with the daemon attached vs without, alternating runs.

Envoy runs one worker pinned to CPU 0 and answers with a direct response (no backend), so Envoy itself is
what is measured. The load generator (wrk) and the daemon share CPU 1. For every run we record the
throughput, Envoy's CPU time per request (its BPF programs run in its context: the steadiest figure on a
noisy machine), and for traced runs the daemon's CPU per traced connection, spans per second and drops.

  workloads:  keepalive          - HTTP/1.1 keep-alive, wrk -c 32, connection spans only (--no-requests)
              keepalive_requests - the same with request capture on: a span for every request
              tls_new            - a new TLS connection per request (wrk over https with Connection: close)

Usage (root, after scripts/setup.sh):  .venv/bin/python bench/overhead.py [--rounds 3] [--seconds 8]
Writes bench/results/overhead-<timestamp>.json and prints a table of medians and ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from otel_envoy.lab.lab import EnvoyLab

RESULTS = Path(__file__).resolve().parent / "results"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a whole process (all threads), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def wrk(url: str, seconds: float, connections: int, extra: list[str]) -> dict:
    """Run wrk pinned to CPU 1; returns requests, seconds, errors."""
    cmd = [
        "taskset",
        "-c",
        "1",
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{int(seconds)}s",
        "--latency",
        *extra,
        url,
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60).stdout
    m = re.search(r"(\d+) requests in ([\d.]+)(\w+)", out)
    if not m:
        raise RuntimeError(f"wrk output not understood:\n{out}")
    dur = float(m.group(2)) * {"s": 1, "ms": 1e-3, "m": 60}[m.group(3)]
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    p99 = re.search(r"99%\s+([\d.]+)(\w+)", out)
    return {
        "requests": int(m.group(1)),
        "seconds": dur,
        "rps": int(m.group(1)) / dur,
        "socket_errors": sum(int(x) for x in errors.groups()) if errors else 0,
        "non_2xx": int(non2xx.group(1)) if non2xx else 0,
        "p99": p99.group(0).split()[-1] if p99 else None,
    }


class Daemon:
    """The real daemon, pinned to CPU 1, writing spans to a file."""

    def __init__(self, lab: EnvoyLab, workdir: Path, requests: bool = True) -> None:
        self.ready = workdir / f"ready-{time.monotonic_ns()}"
        self.summary = workdir / f"summary-{time.monotonic_ns()}.json"
        self.output = workdir / f"spans-{time.monotonic_ns()}.jsonl"
        cmd = [
            "taskset",
            "-c",
            "1",
            sys.executable,
            "-m",
            "otel_envoy.cli",
            "run",
            "--pid",
            str(lab.pid),
            "--output",
            str(self.output),
            "--ready-file",
            str(self.ready),
            "--summary-json",
            str(self.summary),
            *([] if requests else ["--no-requests"]),
        ]
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 180
        while not self.ready.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"daemon failed: {self.proc.stderr.read().decode() if self.proc.stderr else ''}"
                )
            time.sleep(0.05)

    def cpu(self) -> float:
        return cpu_seconds(self.proc.pid)

    def stop(self) -> dict:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(120)
        summary = json.loads(self.summary.read_text())
        self.output.unlink(missing_ok=True)
        return summary


def one_run(lab: EnvoyLab, workload: str, traced: bool, seconds: float, workdir: Path) -> dict:
    daemon = Daemon(lab, workdir, requests=workload != "keepalive") if traced else None
    time.sleep(0.5)
    if workload in ("keepalive", "keepalive_requests"):
        url, conns, extra = f"http://127.0.0.1:{lab.http_port}/", 32, []
    else:
        url, conns, extra = f"https://127.0.0.1:{lab.tls_port}/", 16, ["-H", "Connection: close"]
    envoy0 = cpu_seconds(lab.pid)
    daemon0 = daemon.cpu() if daemon else 0.0
    result = wrk(url, seconds, conns, extra)
    result["envoy_cpu_s"] = cpu_seconds(lab.pid) - envoy0
    result["envoy_cpu_us_per_req"] = result["envoy_cpu_s"] / max(result["requests"], 1) * 1e6
    if daemon is not None:
        time.sleep(0.3)  # let the daemon drain what is in flight before reading its CPU
        result["daemon_cpu_s"] = daemon.cpu() - daemon0
        summary = daemon.stop()
        conns_traced = summary["counts"].get("connections", 0)
        result["connections_traced"] = conns_traced
        result["spans"] = summary["counts"].get("spans", 0)
        result["spans_per_s"] = result["spans"] / result["seconds"]
        result["requests_traced"] = summary["counts"].get("requests", 0)
        result["events"] = summary["counts"].get("events", 0)
        result["drops"] = summary["drops"]
        result["daemon_cpu_us_per_conn"] = (
            (result["daemon_cpu_s"] / conns_traced * 1e6) if conns_traced else None
        )
        result["daemon_cpu_us_per_req"] = result["daemon_cpu_s"] / max(result["requests"], 1) * 1e6
    return result


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3, help="baseline/traced pairs per workload")
    parser.add_argument("--seconds", type=float, default=8.0, help="length of one wrk run")
    parser.add_argument("--workloads", default="keepalive,keepalive_requests,tls_new")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench: must run as root", file=sys.stderr)
        return 1
    for tool in ("wrk", "taskset"):
        if shutil.which(tool) is None:
            print(f"bench: {tool} is not installed", file=sys.stderr)
            return 1
    RESULTS.mkdir(exist_ok=True)
    report: dict = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "rounds": args.rounds,
        "seconds": args.seconds,
        "machine": {"cpus": os.cpu_count(), "kernel": os.uname().release},
        "workloads": {},
    }
    with (
        tempfile.TemporaryDirectory(prefix="otel-envoy-bench-") as tmp,
        EnvoyLab(concurrency=1, direct_response=True, cpu=0, log_level="error") as lab,
    ):
        for workload in args.workloads.split(","):
            runs: dict[str, list[dict]] = {"baseline": [], "traced": []}
            wrk(f"http://127.0.0.1:{lab.http_port}/", 2, 8, [])  # warm-up
            for i in range(args.rounds):
                for mode in ("baseline", "traced") if i % 2 == 0 else ("traced", "baseline"):
                    r = one_run(lab, workload, mode == "traced", args.seconds, Path(tmp))
                    runs[mode].append(r)
                    print(
                        f"{workload:9s} {mode:8s} round {i}: {r['rps']:9.0f} req/s  envoy "
                        f"{r['envoy_cpu_us_per_req']:6.1f} us/req"
                        + (
                            f"  daemon {r['daemon_cpu_us_per_req']:6.1f} us/req, "
                            f"{r['spans_per_s']:7.0f} spans/s, drops {r['drops'] or 0}"
                            if mode == "traced"
                            else ""
                        ),
                        flush=True,
                    )
            report["workloads"][workload] = {"runs": runs, "summary": summarize(runs)}
    out = RESULTS / f"overhead-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(report, indent=2))
    print_table(report)
    print(f"\nwritten: {out}")
    return 0


def summarize(runs: dict[str, list[dict]]) -> dict:
    def med(mode: str, key: str) -> float | None:
        vals = [r[key] for r in runs[mode] if r.get(key) is not None]
        return statistics.median(vals) if vals else None

    base_rps, traced_rps = med("baseline", "rps"), med("traced", "rps")
    base_cpu, traced_cpu = med("baseline", "envoy_cpu_us_per_req"), med("traced", "envoy_cpu_us_per_req")
    drops: dict[str, int] = {}
    for r in runs["traced"]:
        for k, v in (r.get("drops") or {}).items():
            drops[k] = drops.get(k, 0) + v
    return {
        "baseline_rps": base_rps,
        "traced_rps": traced_rps,
        "throughput_ratio": traced_rps / base_rps if base_rps and traced_rps else None,
        "envoy_cpu_us_per_req_baseline": base_cpu,
        "envoy_cpu_us_per_req_traced": traced_cpu,
        "envoy_cpu_ratio": traced_cpu / base_cpu if base_cpu and traced_cpu else None,
        "daemon_cpu_us_per_conn": med("traced", "daemon_cpu_us_per_conn"),
        "daemon_cpu_us_per_req": med("traced", "daemon_cpu_us_per_req"),
        "spans_per_s": med("traced", "spans_per_s"),
        "connections_traced_per_run": med("traced", "connections_traced"),
        "requests_traced_per_run": med("traced", "requests_traced"),
        "requests_per_run": med("traced", "requests"),
        "drops_total": drops,
    }


def print_table(report: dict) -> None:
    print("\nworkload   baseline req/s  traced req/s  ratio   envoy us/req base->traced  "
          "daemon us/conn  spans/s  drops")
    for name, w in report["workloads"].items():
        s = w["summary"]

        def f(v, spec):
            return format(v, spec) if v is not None else "-"

        print(
            f"{name:10s} {f(s['baseline_rps'], '14.0f')} {f(s['traced_rps'], '13.0f')} "
            f"{f(s['throughput_ratio'], '6.3f')}   {f(s['envoy_cpu_us_per_req_baseline'], '6.1f')} -> "
            f"{f(s['envoy_cpu_us_per_req_traced'], '6.1f')}          {f(s['daemon_cpu_us_per_conn'], '8.1f')}"
            f"  {f(s['spans_per_s'], '7.0f')}  {s['drops_total'] or 0}"
        )


if __name__ == "__main__":
    sys.exit(main())

"""Keep-alive requests at fixed offered rates, request capture on: up to which rate is every request traced?

Same setup as bench/overhead.py (one direct-response Envoy worker pinned to CPU 0; the load generator and the
daemon share CPU 1), but the load is paced: for each offered rate, a baseline run (no daemon) and a traced
run (the daemon with request capture on, --sampler always_on --cpu-budget 0, spans to a JSON-lines file),
alternating, --rounds times. Per run:
achieved req/s, Envoy CPU per request, the daemon's CPU (% of a core while the load ran, and per request
including what it did after the load stopped), spans exported per second, every drop counter, and whether
every request was traced: the HTTP request spans in the daemon's output file (spans named GET) against the
requests Envoy itself completed (its `downstream_rq_completed` counter, read while no daemon is attached),
and against the requests the load generator completed (which leaves out those in flight at the cut-off).

Load generators (--loadgen):
  h2load  h2load --h1 -c<connections> --rps=<rate/connections>: every connection sends on a schedule (and
          catches up when a response is late), so the offered rate holds whatever the response time; default.
  wrk     wrk -s bench/wrk/delay.lua: each connection waits --wrk-delay-ms after every response, with
          rate * delay / 1000 connections. Closed loop and 1 ms timer granularity: the achieved rate falls
          10-45 % short of the nominal one (docs/overhead.md), so it is kept for comparison only.
A rate of "max" runs the generator unpaced (h2load, --connections connections) as a saturation reference.

The highest rate traced fully is the highest offered rate at which this and every lower rate had zero drops
(kernel and daemon) and a request span for every request Envoy completed, in every round. A short run can
pass with the daemon falling behind while the kernel ring (16 MiB, some 40 000 requests) absorbs the
difference, so the sweep also measures the daemon's lag when the load stops (the share of the span file
written after that point): the highest sustained rate is the highest rate traced fully with that lag at
most --max-lag seconds. --refine N bisects N more times between the highest sustained rate and the next
one (a baseline and a traced run each).

A shared machine: before each run the sweep waits (--quiet-timeout) for a second without other busy
processes, process creation or other processes' BPF programs (other tracers tax every syscall), and repeats
a run (--retries) that was disturbed by them; waits and repeats stop when they would overrun --budget
seconds. Runs kept although disturbed are marked in the JSON ("interference") and counted in the table.
--daemon-rev REV runs the daemon of a commit (extracted with git archive) instead of the working tree's.

Usage (root, after scripts/setup.sh):
  .venv/bin/python bench/rate_sweep.py [--rates 5000,10000,...,60000[,max]] [--rounds 2] [--seconds 8]
                                       [--refine 2] [--loadgen h2load|wrk] [--daemon-rev HEAD]
Writes bench/results/rate_sweep-<timestamp>.json and prints a table (about 10 minutes with the defaults).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from otlp_sink import OtlpSink
from overhead import (
    RESULTS,
    Daemon,
    bpf_program_holders,
    cpu_busy,
    cpu_seconds,
    cpu_ticks,
    daemon_fields,
    daemon_revision,
    daemon_source,
    envoy_requests,
    forks,
    other_processes,
    process_cpu,
    wrk,
)

from otel_envoy.lab.lab import EnvoyLab

SCRATCH = "/dev/shm" if os.path.isdir("/dev/shm") else None
DELAY_LUA = Path(__file__).resolve().parent / "wrk" / "delay.lua"
DEFAULT_RATES = "5000,10000,20000,30000,40000,50000,60000"
# the load is GET /: one SERVER span named GET per request (no upstream: direct response)
REQUEST_SPAN = "GET"


def children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def h2load(url: str, seconds: float, connections: int, rate: float | None) -> dict:
    """h2load over HTTP/1.1 pinned to CPU 1, ``rate`` requests/s in all (None: as fast as it can)."""
    cmd = ["taskset", "-c", "1", "h2load", "--h1", "-t1", f"-c{connections}", "-D", f"{seconds:g}"]
    if rate is not None:
        cmd.append(f"--rps={rate / connections:.3f}")
    out = subprocess.run([*cmd, url], capture_output=True, text=True, timeout=seconds + 60).stdout
    fin = re.search(r"finished in ([\d.]+)(m?s)", out)
    req = re.search(
        r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored, "
        r"(\d+) timeout",
        out,
    )
    if not fin or not req:
        raise RuntimeError(f"h2load output not understood:\n{out}")
    dur = float(fin.group(1)) * (1e-3 if fin.group(2) == "ms" else 1.0)
    _total, started, done, succeeded, failed, errored, timeout = (int(x) for x in req.groups())
    lat = re.search(r"time for request:\s+(\S+)\s+(\S+)\s+(\S+)", out)
    return {
        "requests": done,
        "started": started,
        "in_flight_at_end": started - done,
        "seconds": dur,
        "rps": done / dur,
        "errors": failed + errored + timeout + (done - succeeded),
        "latency_min_max_mean": list(lat.groups()) if lat else None,
    }


def paced_wrk(url: str, seconds: float, rate: float | None, delay_ms: int, connections: int) -> dict:
    """wrk with bench/wrk/delay.lua: rate * delay / 1000 connections, each waiting delay_ms per request."""
    if rate is None:
        r = wrk(url, seconds, connections, [])
    else:
        connections = max(1, round(rate * delay_ms / 1000))
        r = wrk(url, seconds, connections, ["-s", str(DELAY_LUA)], [str(delay_ms)])
    r["connections"] = connections
    r["in_flight_at_end"] = None  # wrk does not say; at most one per connection
    r["errors"] = r.pop("socket_errors") + r["non_2xx"]
    return r


def wait_quiet(ours: set[int], timeout: float) -> float:
    """Wait (up to ``timeout`` s) for a second with no other busy process, no forks, no other BPF programs.

    The machine may be shared (tests of other work attach their own tracers, compilers come and go);
    returns the seconds waited."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        procs0, forks0 = process_cpu(), forks()
        time.sleep(1.0)
        busy = sum(other_processes(procs0, process_cpu(), ours).values())
        if busy < 0.03 and forks() - forks0 <= 2 and not bpf_program_holders(exclude=ours):
            break
    return time.monotonic() - start


def one_run(
    lab: EnvoyLab,
    rate: float | None,
    traced: bool,
    args: argparse.Namespace,
    workdir: Path,
    source: Path | None = None,
    quiet_timeout: float = 0.0,
    sink: OtlpSink | None = None,
) -> dict:
    ours = {os.getpid(), lab.pid, lab.backend_pid, *([sink.proc.pid] if sink is not None else [])}
    waited = wait_quiet(ours, quiet_timeout) if quiet_timeout > 0 else 0.0
    envoy_rq0 = envoy_requests(lab)  # before the daemon attaches: admin requests would be traced
    # every request traced (the question is up to which rate that holds): no sampler, no CPU budget
    daemon = Daemon(lab, workdir, requests=True, source=source,
                    extra_args=["--sampler", "always_on", "--cpu-budget", "0"], sink=sink) if traced else None
    sink_cpu0 = sink.cpu() if sink is not None and traced else 0.0
    try:
        r = _measure(lab, rate, daemon, args)
    except BaseException:
        if daemon is not None:
            daemon.kill()
        raise
    r["waited_for_quiet_s"] = waited
    if sink is not None and traced:  # the receiver's CPU: not the daemon's, but on the CPUs the load shares
        r["sink_cpu_us_per_req"] = (sink.cpu() - sink_cpu0) / max(r["requests"], 1) * 1e6
    r["envoy_requests"] = envoy_requests(lab) - envoy_rq0
    r["envoy_cpu_us_per_req"] = r["envoy_cpu_s"] / max(r["envoy_requests"], 1) * 1e6
    if daemon is not None:
        # Envoy's counter includes the requests in flight when the generator stopped (it answered them);
        # the generator's count leaves them out: request spans = generator's count + at most one per
        # connection (h2load says how many exactly).
        r["requests_missing"] = r["envoy_requests"] - r["request_spans"]
        r["spans_minus_completed"] = r["request_spans"] - r["requests"]
        slack = r["in_flight_at_end"] if r["in_flight_at_end"] is not None else r["connections"]
        r["fully_traced"] = (
            not r["drops"] and r["requests_missing"] == 0 and 0 <= r["spans_minus_completed"] <= slack
        )
        r["keeps_up"] = r["lag_at_end_s"] <= args.max_lag
    return r


def _measure(lab: EnvoyLab, rate: float | None, daemon: Daemon | None, args: argparse.Namespace) -> dict:
    """One load run against ``lab`` (and ``daemon``, which it stops); everything but Envoy's counter."""
    url = f"http://127.0.0.1:{lab.http_port}/"
    time.sleep(0.5)
    envoy0, ticks0, load0, wall0 = cpu_seconds(lab.pid), cpu_ticks(), children_cpu(), time.monotonic()
    daemon0 = daemon.cpu() if daemon else 0.0
    ours = {os.getpid(), lab.pid, lab.backend_pid, *([daemon.proc.pid] if daemon else []),
            *([daemon.sink.proc.pid] if daemon is not None and daemon.sink is not None else [])}
    foreign_bpf = bpf_program_holders(exclude=ours)
    procs0, forks0 = process_cpu(), forks()
    if args.loadgen == "h2load":
        r = h2load(url, args.seconds, args.connections, rate)
        r["connections"] = args.connections
    else:
        r = paced_wrk(url, args.seconds, rate, args.wrk_delay_ms, args.connections)
    cpu_load = daemon.cpu() - daemon0 if daemon is not None else 0.0
    written_at_end = daemon.output_bytes() if daemon is not None else 0
    r["loadgen_cpu_s"] = children_cpu() - load0
    r["envoy_cpu_s"] = cpu_seconds(lab.pid) - envoy0
    r["cpu_busy"] = cpu_busy(ticks0, cpu_ticks())
    wall = time.monotonic() - wall0
    r["forks"] = forks() - forks0  # ours: the generator (taskset execs it), its thread
    r["other_processes"] = other_processes(procs0, process_cpu(), ours)
    r["other_processes_pct"] = sum(r["other_processes"].values()) / wall * 100
    r["foreign_bpf"] = sorted(set(foreign_bpf + bpf_program_holders(exclude=ours)))
    r["offered_rps"] = rate
    # CPU time on the two CPUs that was not ours (Envoy on 0; generator and daemon on 1): other processes
    # on the machine, also short-lived ones that other_processes() misses, and interrupt work.
    r["cpu0_other_pct"] = (r["cpu_busy"].get("cpu0", 0) * wall - r["envoy_cpu_s"]) / wall * 100
    r["cpu1_other_pct"] = (r["cpu_busy"].get("cpu1", 0) * wall - r["loadgen_cpu_s"] - cpu_load) / wall * 100
    if daemon is not None:
        r["daemon_drain_s"] = daemon.wait_idle()
        cpu_total = daemon.cpu() - daemon0
        summary = daemon.stop(count_spans=True)
        r.update(daemon_fields(summary, cpu_total, r["seconds"], r["requests"]))
        r["daemon_cpu_pct"] = cpu_load / r["seconds"] * 100
        r["spans_exported_per_s"] = r["spans_exported"] / r["seconds"]
        r["span_names"] = summary.get("span_names", {})
        r["request_spans"] = r["span_names"].get(REQUEST_SPAN, 0)
        # Backlog when the load stopped: the share of the span file written after that (spans are nearly
        # all request spans of one size). Records waiting in the kernel ring or the span queue; a lag that
        # keeps growing means the daemon is slower than the load and the ring will fill in a longer run.
        written_share = written_at_end / summary["output_bytes"] if summary["output_bytes"] else 0.0
        r["spans_per_s_during_load"] = r["spans"] * written_share / r["seconds"]
        r["backlog_at_end_requests"] = round(r["request_spans"] * (1 - written_share))
        r["lag_at_end_s"] = r["backlog_at_end_requests"] / max(r["rps"], 1)
    return r


def interference(r: dict, max_other_pct: float) -> str | None:
    """Why a run is not clean: other processes busy, or other BPF programs loaded (None: clean)."""
    if r["foreign_bpf"]:
        return f"other BPF programs loaded by {', '.join(r['foreign_bpf'])}"
    if r["forks"] > 10:
        return f"{r['forks']} processes/threads started during the run"
    if r["other_processes_pct"] > max_other_pct:
        top = sorted(r["other_processes"].items(), key=lambda kv: -kv[1])[:3]
        return f"other processes used {r['other_processes_pct']:.0f}% of a CPU ({top})"
    return None


def describe(mode: str, rate: float | None, r: dict) -> str:
    line = (
        f"{rate_label(rate):>6s} {mode:8s} {r['rps']:8.0f} req/s"
        f"  envoy {r['envoy_cpu_us_per_req']:5.1f} us/req"
        f"  cpu1 {r['cpu_busy'].get('cpu1', 0) * 100:3.0f}%"
        f" (other {r['cpu0_other_pct']:3.0f}%/{r['cpu1_other_pct']:3.0f}%)"
    )
    if mode == "traced":
        line += (
            f"  daemon {r['daemon_cpu_pct']:3.0f}% {r['daemon_cpu_us_per_req']:5.1f} us/req"
            f" lag {r['lag_at_end_s']:4.2f}s drain {r['daemon_drain_s']:3.1f}s"
            f"  {r['spans_per_s_during_load']:6.0f} spans/s"
            f"  GET spans {r['request_spans']}/{r['envoy_requests']}"
            f" (loadgen {r['requests']})  drops {r['drops'] or 0}"
            f"  {'FULL' if r['fully_traced'] else 'partial'}{'' if r['keeps_up'] else ' BEHIND'}"
        )
    return line


def rate_label(rate: float | None) -> str:
    return "max" if rate is None else f"{rate / 1000:g}k"


def summarize(runs: dict[str, list[dict]]) -> dict:
    def med(mode: str, key: str) -> float | None:
        vals = [r[key] for r in runs[mode] if r.get(key) is not None]
        return statistics.median(vals) if vals else None

    base, traced = med("baseline", "rps"), med("traced", "rps")
    drops: dict[str, int] = {}
    for r in runs["traced"]:
        for k, v in (r.get("drops") or {}).items():
            drops[k] = drops.get(k, 0) + v
    spans = sum(r["request_spans"] for r in runs["traced"])
    envoy = sum(r["envoy_requests"] for r in runs["traced"])
    return {
        "baseline_rps": base,
        "traced_rps": traced,
        "throughput_ratio": traced / base if base and traced else None,
        "envoy_cpu_us_per_req_baseline": med("baseline", "envoy_cpu_us_per_req"),
        "envoy_cpu_us_per_req_traced": med("traced", "envoy_cpu_us_per_req"),
        "daemon_cpu_pct": med("traced", "daemon_cpu_pct"),
        "daemon_cpu_us_per_req": med("traced", "daemon_cpu_us_per_req"),
        "sink_cpu_us_per_req": med("traced", "sink_cpu_us_per_req"),
        "daemon_drain_s": med("traced", "daemon_drain_s"),
        "spans_exported_per_s": med("traced", "spans_exported_per_s"),
        "spans_per_s_during_load": med("traced", "spans_per_s_during_load"),
        "lag_at_end_s_max": max(r["lag_at_end_s"] for r in runs["traced"]),
        "cpu1_busy_traced": statistics.median(r["cpu_busy"].get("cpu1", 0) for r in runs["traced"]),
        "loadgen_cpu_pct_traced": statistics.median(
            r["loadgen_cpu_s"] / r["seconds"] * 100 for r in runs["traced"]
        ),
        "request_spans": spans,
        "envoy_requests": envoy,
        "traced_fraction": spans / envoy if envoy else None,
        "drops_total": drops,
        "fully_traced": all(r["fully_traced"] for r in runs["traced"]),
        "keeps_up": all(r["keeps_up"] for r in runs["traced"]),
        "other_cpu_max_pct": max(
            max(r["cpu0_other_pct"], r["cpu1_other_pct"]) for m in ("baseline", "traced") for r in runs[m]
        ),
        "noisy_runs_kept": sum(1 for m in ("baseline", "traced") for r in runs[m] if r["interference"]),
        "runs_discarded": len(runs["discarded"]),
    }


def highest_full(rates: dict[str, dict], sustained: bool = True) -> float | None:
    """Highest offered rate fully traced, with every lower rate fully traced too; ``sustained``: and the
    daemon kept up (its lag at the end of the load under --max-lag), so a longer run would not drop."""
    best = None
    for w in sorted(
        (w for w in rates.values() if w["offered_rps"] is not None), key=lambda w: w["offered_rps"]
    ):
        s = w["summary"]
        if not s["fully_traced"] or (sustained and not s["keeps_up"]):
            break
        best = w["offered_rps"]
    return best


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--rates", default=DEFAULT_RATES, help="offered req/s, comma-separated; 'max': unpaced"
    )
    parser.add_argument("--rounds", type=int, default=2, help="baseline/traced pairs per rate")
    parser.add_argument("--seconds", type=float, default=8.0, help="length of one load run")
    parser.add_argument("--refine", type=int, default=2, help="bisection steps above the highest full rate")
    parser.add_argument("--loadgen", choices=["h2load", "wrk"], default="h2load")
    parser.add_argument("--connections", type=int, default=32, help="h2load connections (and unpaced wrk)")
    parser.add_argument("--wrk-delay-ms", type=int, default=10, help="wrk: per-connection delay per request")
    parser.add_argument(
        "--max-other",
        type=float,
        default=10.0,
        help="repeat a run when other processes used more than this %% of a CPU during it",
    )
    parser.add_argument("--retries", type=int, default=2, help="repeats of a run disturbed by other load")
    parser.add_argument(
        "--quiet-timeout",
        type=float,
        default=30.0,
        help="before a run, wait up to this long for a quiet machine",
    )
    parser.add_argument(
        "--max-lag",
        type=float,
        default=0.5,
        help="a rate is sustained if the daemon's backlog at the end of the load is at most this (s)",
    )
    parser.add_argument(
        "--budget",
        type=float,
        default=600.0,
        help="seconds for the whole sweep: waits for quiet and repeats stop when they would overrun it",
    )
    parser.add_argument(
        "--daemon-rev", help="run the daemon of this git revision (e.g. HEAD) instead of the working tree's"
    )
    parser.add_argument(
        "--export", choices=["jsonl", "otlp-grpc"], default="jsonl",
        help="where the daemon sends its spans: an OTLP/JSON lines file (its default) or OTLP/gRPC to "
        "bench/otlp_sink.py, a receiver that decodes nothing",
    )
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # clean up the lab and the daemon on kill
    if os.geteuid() != 0:
        print("rate_sweep: must run as root", file=sys.stderr)
        return 1
    for tool in (args.loadgen, "taskset"):
        if shutil.which(tool) is None:
            print(f"rate_sweep: {tool} is not installed", file=sys.stderr)
            return 1
    rates = [None if x.strip() == "max" else float(x) for x in args.rates.split(",") if x.strip()]
    RESULTS.mkdir(exist_ok=True)
    report: dict = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": " ".join([".venv/bin/python", "bench/rate_sweep.py", *sys.argv[1:]]),
        "args": vars(args),
        "machine": {"cpus": os.cpu_count(), "kernel": os.uname().release},
        "daemon": daemon_revision(args.daemon_rev),
        "rates": {},
    }
    t0 = time.monotonic()
    with (
        # spans on tmpfs: no writeback of ~0.5 GB per run disturbing the next runs
        tempfile.TemporaryDirectory(prefix="otel-envoy-sweep-", dir=SCRATCH) as tmp,
        EnvoyLab(concurrency=1, direct_response=True, cpu=0, log_level="error") as lab,
        OtlpSink(Path(tmp)) if args.export == "otlp-grpc" else contextlib.nullcontext() as sink,
    ):
        source = daemon_source(args.daemon_rev, Path(tmp))
        wrk(f"http://127.0.0.1:{lab.http_port}/", 2, 8, [])  # warm-up

        planned = [len(rates) * args.rounds * 2 + args.refine * 2]  # runs still to do

        def slack() -> float:
            """Seconds of the budget not needed by the runs still planned (~4 s of set-up each)."""
            return args.budget - (time.monotonic() - t0) - planned[0] * (args.seconds + 4)

        def measure(rate: float | None, rounds: int) -> None:
            runs: dict[str, list[dict]] = {"baseline": [], "traced": [], "discarded": []}
            for i in range(rounds):
                for mode in ("baseline", "traced") if i % 2 == 0 else ("traced", "baseline"):
                    for attempt in range(args.retries + 1):
                        quiet = min(args.quiet_timeout, max(0.0, slack()))
                        r = one_run(lab, rate, mode == "traced", args, Path(tmp), source, quiet, sink)
                        planned[0] -= attempt == 0
                        noise = interference(r, args.max_other)
                        print(describe(mode, rate, r) + (f"  NOISY: {noise}" if noise else ""), flush=True)
                        if not noise or attempt == args.retries or slack() < args.seconds + 8:
                            break
                        runs["discarded"].append({"mode": mode, "reason": noise, **r})
                        time.sleep(3)  # let whatever else runs on the machine pass
                    r["interference"] = noise
                    runs[mode].append(r)
            report["rates"][rate_label(rate)] = {
                "offered_rps": rate,
                "runs": runs,
                "summary": summarize(runs),
            }

        for rate in rates:
            measure(rate, args.rounds)
        paced = sorted(r for r in rates if r is not None)
        for _ in range(args.refine):
            low = highest_full(report["rates"])
            above = [r for r in paced if low is None or r > low]
            high = above[0] if above else None
            if high is None or (low or 0) + 500 > high:
                break
            mid = round(((low or 0) + high) / 2 / 500) * 500
            if mid in paced:
                break
            paced = sorted([*paced, mid])
            measure(mid, 1)
        planned[0] = 0
        if sink is not None:
            report["otlp_sink"] = sink.stop()  # its totals, and whether the last request decodes
    report["seconds_total"] = time.monotonic() - t0
    report["highest_fully_traced_rps"] = highest_full(report["rates"], sustained=False)
    report["highest_sustained_rps"] = highest_full(report["rates"])
    out = RESULTS / f"rate_sweep-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(report, indent=2))
    print_table(report)
    print(f"\nwritten: {out}  ({report['seconds_total']:.0f} s)")
    return 0


def print_table(report: dict) -> None:
    print(
        "\noffered  baseline  traced  ratio  envoy us/req  daemon        CPU 1  spans/s   lag"
        "  GET spans / Envoy requests   drops"
    )
    print("  req/s     req/s   req/s         base->traced  %core us/req   busy  in load   max")

    def f(v, spec):
        return format(v, spec) if v is not None else "-"

    rows = sorted(
        report["rates"].values(), key=lambda w: float("inf") if w["offered_rps"] is None else w["offered_rps"]
    )
    for w in rows:
        s = w["summary"]
        print(
            f"{rate_label(w['offered_rps']):>7s} {f(s['baseline_rps'], '9.0f')} {f(s['traced_rps'], '7.0f')}"
            f" {f(s['throughput_ratio'], '6.3f')}  {f(s['envoy_cpu_us_per_req_baseline'], '5.1f')}->"
            f"{f(s['envoy_cpu_us_per_req_traced'], '5.1f')}   {f(s['daemon_cpu_pct'], '4.0f')}  "
            f"{f(s['daemon_cpu_us_per_req'], '5.1f')}  {s['cpu1_busy_traced']:5.0%}  "
            f"{f(s['spans_per_s_during_load'], '7.0f')}  {s['lag_at_end_s_max']:4.2f}s "
            f"{s['request_spans']:>9d} / {s['envoy_requests']:<9d} {f(s['traced_fraction'], '6.1%')}"
            f"  {s['drops_total'] or 0}{'' if s['fully_traced'] else '  (not all traced)'}"
            + (f"  [{s['noisy_runs_kept']} run(s) with other load]" if s["noisy_runs_kept"] else "")
        )
    print(
        "\nhighest offered rate traced fully (zero drops, a span per request): "
        f"{f(report['highest_fully_traced_rps'], '.0f')} req/s; and with the daemon keeping up "
        f"(lag at the end <= {report['args']['max_lag']} s): "
        f"{f(report['highest_sustained_rps'], '.0f')} req/s"
    )


if __name__ == "__main__":
    sys.exit(main())

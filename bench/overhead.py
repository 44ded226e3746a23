"""Side-by-side overhead benchmark: one Envoy, with the daemon attached vs without, alternating runs.

Envoy runs one worker pinned to CPU 0 and answers with a direct response (no backend), so Envoy itself is
what is measured. The load generator (wrk) and the daemon share CPU 1. For every run we record the
throughput, Envoy's CPU time per request (its BPF programs run in its context: the steadiest figure on a
noisy machine), and for traced runs the daemon's CPU per traced connection (in all and by thread, the
daemon's threads being named), spans per second and drops.

  workloads:  keepalive          - HTTP/1.1 keep-alive, wrk -c 32, connection spans only (--no-requests);
                                   the scheduler probes (rounds, off-CPU waits) are on, as by default
              keepalive_no_offcpu - the same with --no-offcpu: keepalive vs this is the scheduler probes' cost
              keepalive_requests - the same with request capture on: a span for every request
              h2c_requests       - HTTP/2 with prior knowledge (h2c), keep-alive, one stream at a time per
                                   connection, request capture on (h2load only: --client h2load)
              tls_new            - a new TLS connection per request (wrk over https with Connection: close),
                                   EC P-256 certificates. wrk resumes its first session on every later
                                   connection (TLS 1.3 PSK with ECDHE: no certificate, no signature), and
                                   its half of that costs more CPU than Envoy's: wrk is the bottleneck
              tls_full           - the same with session resumption off in Envoy: a full handshake each
              tls_full_rsa       - full handshakes with RSA 2048 certificates (what most public and many
                                   mesh certificates use): Envoy's signature (~0.2 ms) makes Envoy the
                                   bottleneck, and wrk and the daemon fit on CPU 1
              The tls_full* workloads run on their own Envoy labs (other certificates, other TLS settings).

wrk keeps retrying a TLS handshake while it waits for the server (it spins at 100 % of CPU 1 whenever Envoy
is the slower side), so with wrk CPU 1 always looks saturated; ``--client h2load`` drives every workload
with h2load instead (keep-alive: 16 connections; ``--tls-client`` is the same flag's older name), which
waits, and records every client's own CPU per request either way. The ratios reported are medians of the
per-round (baseline, traced) pairs' ratios. Each run also counts IRQ-work interrupts per CPU (the ring
buffer's reader wake-ups) per 1000 requests.

The method the cost targets are judged by: ``--client h2load --daemon-cpus all --workloads
keepalive_requests,tls_new --rounds 5`` (default daemon flags, the daemon left to the scheduler).

Usage (root, after scripts/setup.sh):  .venv/bin/python bench/overhead.py [--rounds 3] [--seconds 8]
                                           [--workloads ...] [--client wrk|h2load] [--daemon-cpus 1|all]
Writes bench/results/overhead-<timestamp>.json and prints a table of medians and ratios.
bench/rate_sweep.py reuses the helpers here for keep-alive requests at fixed offered rates.
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

from otel_envoy.lab.lab import EnvoyLab

RESULTS = Path(__file__).resolve().parent / "results"
#: workload -> the Envoy lab's TLS settings: (certificate key type, session resumption)
WORKLOADS: dict[str, tuple[str, bool]] = {
    "keepalive": ("ec", True),
    "keepalive_no_offcpu": ("ec", True),
    "keepalive_requests": ("ec", True),
    "h2c_requests": ("ec", True),
    "tls_new": ("ec", True),
    "tls_full": ("ec", False),
    "tls_full_rsa": ("rsa", False),
}
CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a whole process (all threads), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def thread_cpu_seconds(pid: int) -> dict[str, float]:
    """utime + stime of each thread of a process, in seconds, summed by thread name (the daemon names its
    threads: otel_envoy/thread_names.py); threads that ended meanwhile are not counted."""
    out: dict[str, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # the thread ended
            continue
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / CLK_TCK
    return out


def children_cpu_seconds() -> float:
    """User + system CPU of this process's waited-for children (a client run's CPU: the difference around
    it; the daemon and Envoy are waited for only after their runs)."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def cpu_ticks() -> dict[str, tuple[int, int, int]]:
    """Per CPU (``cpu0``, ``cpu1``, ...): (busy, total, steal) jiffies from /proc/stat."""
    out: dict[str, tuple[int, int, int]] = {}
    for line in Path("/proc/stat").read_text().splitlines():
        name, *vals = line.split()
        if name.startswith("cpu") and name != "cpu":
            v = [int(x) for x in vals[:8]]  # user nice system idle iowait irq softirq steal
            out[name] = (sum(v) - v[3] - v[4], sum(v), v[7])
    return out


def cpu_steal(before: dict[str, tuple[int, int, int]], after: dict[str, tuple[int, int, int]]
              ) -> dict[str, float]:
    """Fraction of each CPU's time the hypervisor gave to other guests between two :func:`cpu_ticks`
    samples (this machine is a VM on a shared host: its slow periods)."""
    return {
        cpu: (after[cpu][2] - b[2]) / max(after[cpu][1] - b[1], 1)
        for cpu, b in before.items()
        if cpu in after
    }


def cpu_busy(before: dict[str, tuple[int, int, int]], after: dict[str, tuple[int, int, int]]
             ) -> dict[str, float]:
    """Fraction of each CPU that was busy between two :func:`cpu_ticks` samples."""
    return {
        cpu: (after[cpu][0] - b[0]) / max(after[cpu][1] - b[1], 1)
        for cpu, b in before.items()
        if cpu in after
    }


def process_cpu() -> dict[int, tuple[str, float]]:
    """Every process's (comm, CPU seconds) now; those that vanish meanwhile are skipped."""
    out: dict[int, tuple[str, float]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            raw = (d / "stat").read_text()
        except OSError:
            continue
        fields = raw.rsplit(")", 1)[1].split()
        out[int(d.name)] = (
            raw[raw.find("(") + 1 : raw.rfind(")")],
            (int(fields[11]) + int(fields[12])) / CLK_TCK,
        )
    return out


def other_processes(
    before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]], ours: set[int]
) -> dict[str, float]:
    """CPU seconds used between two :func:`process_cpu` snapshots by processes not in ``ours`` (10 ms and
    more; processes that started and ended in between are not seen)."""
    out: dict[str, float] = {}
    for pid, (comm, cpu) in after.items():
        used = cpu - before.get(pid, (comm, 0.0))[1]
        if pid not in ours and used >= 0.01:
            out[f"{comm}[{pid}]"] = round(used, 2)
    return out


def forks() -> int:
    """Processes and threads created since boot (/proc/stat): a burst means other work started meanwhile."""
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("processes "):
            return int(line.split()[1])
    return 0


def bpf_program_holders(exclude: set[int]) -> list[str]:
    """Processes (other than ``exclude``) holding BPF programs: other tracers also tax every syscall."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) in exclude:
            continue
        try:
            if any(os.readlink(fd) == "anon_inode:bpf-prog" for fd in (d / "fd").iterdir()):
                out.append(f"{(d / 'comm').read_text().strip()}[{d.name}]")
        except OSError:
            continue
    return out


def envoy_requests(lab: EnvoyLab, listener: str = "plain_http") -> int:
    """Requests Envoy's HTTP connection manager completed on a listener so far (its own counter).

    Read it while no daemon is attached: admin requests are HTTP too, and would be traced.
    """
    key = f"http.{listener}.downstream_rq_completed"
    return lab.stats(f"^{re.escape(key)}$").get(key, 0)


SPAN_NAME = re.compile(rb'"name":"([^"]*)","kind"')


def count_span_names(path: Path) -> dict[str, int]:
    """Spans per name in an OTLP/JSON lines file (a span's name is followed by its kind; scopes have none)."""
    counts: dict[str, int] = {}
    if not path.exists():
        return counts
    with path.open("rb") as f:
        for line in f:
            for m in SPAN_NAME.finditer(line):
                name = m.group(1).decode()
                counts[name] = counts.get(name, 0) + 1
    return counts


def wrk(
    url: str, seconds: float, connections: int, extra: list[str], script_args: list[str] | None = None
) -> dict:
    """Run wrk pinned to CPU 1; returns requests, seconds, errors (``script_args``: a Lua init())."""
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
        *(["--", *script_args] if script_args else []),
    ]
    cpu0 = children_cpu_seconds()
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60).stdout
    client_cpu = children_cpu_seconds() - cpu0
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
        "client": "wrk",
        "client_cpu_s": client_cpu,
    }


def h2load(url: str, requests: int, connections: int, headers: list[str], rps_per_client: int | None = None,
           h1: bool = True) -> dict:
    """Run h2load (HTTP/1.1, one thread) pinned to CPU 1 for ``requests`` requests; returns requests,
    seconds, rps, errors and the client's own CPU seconds (``client_cpu_s``). ``rps_per_client``: each
    connection sends at that rate (h2load's ``--rps``), for a fixed total rate below saturation.
    ``h1=False``: HTTP/2 with prior knowledge over a plain URL (h2c), one stream at a time per connection.

    Unlike wrk, h2load waits for the server during a TLS handshake instead of retrying it in a loop (wrk
    keeps the socket's writable event armed until the handshake is done, so it spins at 100 % of its CPU
    whenever Envoy is the slower side). Its ``-D`` (duration) mode does not end with ``Connection: close``
    here, so runs are a request count.
    """
    cmd = ["taskset", "-c", "1", "h2load", "-t1", f"-c{connections}", "-n", str(requests),
           *(["--h1"] if h1 else ["-m1"])]
    if rps_per_client:
        cmd.append(f"--rps={rps_per_client}")
    for h in headers:
        cmd += ["-H", h]
    cmd.append(url)
    start, cpu0 = time.monotonic(), children_cpu_seconds()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out, _ = proc.communicate(timeout=600)
    elapsed, client_cpu = time.monotonic() - start, children_cpu_seconds() - cpu0
    m = re.search(r"requests: \d+ total, \d+ started, \d+ done, (\d+) succeeded, (\d+) failed, (\d+) errored",
                  out)
    fin = re.search(r"finished in ([\d.]+)(\w+),", out)
    if not m or not fin:
        raise RuntimeError(f"h2load output not understood:\n{out}")
    dur = float(fin.group(1)) * {"s": 1, "ms": 1e-3, "us": 1e-6}[fin.group(2)]
    done = int(m.group(1))
    return {
        "requests": done,
        "seconds": dur,
        "wall_seconds": elapsed,
        "rps": done / dur,
        "socket_errors": int(m.group(2)) + int(m.group(3)),
        "non_2xx": 0,
        "p99": None,
        "client": "h2load",
        "client_cpu_s": client_cpu,
    }


def keepalive_load(lab: EnvoyLab, seconds: float, h2load_requests: int | None = None, h2c: bool = False
                   ) -> dict:
    """HTTP/1.1 keep-alive to the lab's plain listener: h2load (16 connections) for ``h2load_requests``
    requests when given, else wrk (32 connections) for ``seconds``. ``h2c``: HTTP/2 with prior knowledge
    (h2load only)."""
    url = f"http://127.0.0.1:{lab.http_port}/"
    if h2load_requests:
        return h2load(url, h2load_requests, 16, [], h1=not h2c)
    if h2c:
        raise SystemExit("bench: the h2c_requests workload needs --client h2load")
    return wrk(url, seconds, 32, [])


def irq_work_interrupts() -> list[int]:
    """Per CPU, the IRQ-work interrupts so far (/proc/interrupts IWI): a BPF ring buffer wakes its reader
    through one, so their count during a run bounds what the ring's wake-ups cost."""
    for line in Path("/proc/interrupts").read_text().splitlines():
        fields = line.split()
        if fields and fields[0] == "IWI:":
            return [int(x) for x in fields[1:] if x.isdigit()]
    return []


def tls_load(lab: EnvoyLab, seconds: float, h2load_requests: int | None = None) -> dict:
    """A new TLS connection per request (``Connection: close``, 16 connections) to the lab's TLS listener:
    h2load for ``h2load_requests`` requests when given, else wrk for ``seconds``."""
    url, connections = f"https://127.0.0.1:{lab.tls_port}/", 16
    if h2load_requests:
        return h2load(url, h2load_requests, connections, ["Connection: close"])
    return wrk(url, seconds, connections, ["-H", "Connection: close"])


def daemon_source(rev: str | None, workdir: Path) -> Path | None:
    """``otel_envoy/`` and ``bpf/`` of a git revision, extracted under ``workdir`` (None: the working tree).

    Lets a benchmark measure a committed daemon while the working tree is being edited.
    """
    if not rev:
        return None
    root = Path(__file__).resolve().parents[1]
    commit = subprocess.run(
        ["git", "-C", str(root), "rev-parse", "--verify", f"{rev}^{{commit}}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    dest = workdir / f"daemon-{commit[:12]}"
    dest.mkdir(exist_ok=True)
    archive = subprocess.run(
        ["git", "-C", str(root), "archive", commit, "otel_envoy", "bpf"], capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def daemon_revision(rev: str | None) -> dict:
    """What a run measured: the commit, and for the working tree whether its daemon files had changes."""
    root = Path(__file__).resolve().parents[1]

    def git(*a: str) -> str:
        return subprocess.run(["git", "-C", str(root), *a], capture_output=True, text=True).stdout.strip()

    out = {"rev": rev or "working tree", "commit": git("rev-parse", f"{rev or 'HEAD'}^{{commit}}")}
    if not rev:
        out["uncommitted_changes"] = git("status", "--porcelain", "--", "otel_envoy", "bpf").splitlines()
    return out


class Daemon:
    """The real daemon, pinned to CPU 1, writing spans to a file.

    ``source``: a directory holding ``otel_envoy/`` and ``bpf/`` to run instead of the working tree's
    (see :func:`daemon_source`); ``python -m`` finds the package in its working directory first.
    """

    def __init__(
        self, lab: EnvoyLab, workdir: Path, requests: bool = True, source: Path | None = None,
        offcpu: bool = True, cpus: str = "1", extra_args: list[str] | None = None,
        sink: OtlpSink | None = None,
    ) -> None:
        self.ready = workdir / f"ready-{time.monotonic_ns()}"
        self.summary = workdir / f"summary-{time.monotonic_ns()}.json"
        self.output = workdir / f"spans-{time.monotonic_ns()}.jsonl"
        self.sink = sink  # export over OTLP/gRPC to it instead of writing self.output
        self.sink_start = sink.stats() if sink is not None else {}  # it may serve several runs
        export = (["--otlp-endpoint", sink.endpoint, "--otlp-protocol", "grpc"] if sink is not None
                  else ["--output", str(self.output)])
        cmd = [
            *(["taskset", "-c", cpus] if cpus != "all" else []),
            sys.executable,
            "-m",
            "otel_envoy.cli",
            "run",
            "--pid",
            str(lab.pid),
            *export,
            "--ready-file",
            str(self.ready),
            "--summary-json",
            str(self.summary),
            *([] if requests else ["--no-requests"]),
            *([] if offcpu else ["--no-offcpu"]),
            *(extra_args or []),
        ]
        # stderr to a file, not a pipe nobody reads while it runs (a full pipe would stall the daemon)
        self.log = workdir / f"daemon-{time.monotonic_ns()}.log"
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(cmd, stderr=log, cwd=source)
        deadline = time.monotonic() + 180
        while not self.ready.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                if self.proc.poll() is None:
                    self.proc.kill()
                    self.proc.wait(10)
                raise RuntimeError(f"daemon failed: {self.log.read_text(errors='replace')}")
            time.sleep(0.05)

    def cpu(self) -> float:
        return cpu_seconds(self.proc.pid)

    def wait_idle(self, timeout: float = 15.0, interval: float = 0.2) -> float:
        """Wait until the daemon uses under 10 % of a core over ``interval``; returns the seconds waited.

        After the load stops, the daemon may still be working through the ring buffer and its span queue;
        the time it takes is its backlog.
        """
        start = time.monotonic()
        last = self.cpu()
        while time.monotonic() - start < timeout:
            time.sleep(interval)
            now = self.cpu()
            if now - last < 0.1 * interval:
                break
            last = now
        return time.monotonic() - start

    def output_bytes(self) -> int:
        """Size of the span file so far (spans are written in batches as they are exported), or the bytes
        the OTLP sink received so far."""
        if self.sink is not None:
            return self.sink.stats()["bytes"] - self.sink_start["bytes"]
        try:
            return self.output.stat().st_size
        except OSError:
            return 0

    def kill(self) -> None:
        """End it without a summary (a benchmark that fails or is interrupted must not leave it attached)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        for path in (self.output, self.log):
            path.unlink(missing_ok=True)

    def stop(self, count_spans: bool = False) -> dict:
        """SIGTERM, wait; returns the summary JSON (and ``span_names`` counted in the output if asked)."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise
        summary = json.loads(self.summary.read_text())
        if self.sink is not None:  # it counts the request spans (GET) only: it decodes nothing
            received = {k: v - self.sink_start[k] for k, v in self.sink.stats().items()}
            summary["span_names"] = {"GET": received["get_spans"]} if count_spans else {}
            summary["output_bytes"] = received["bytes"]
        else:
            if count_spans:
                summary["span_names"] = count_span_names(self.output)
            summary["output_bytes"] = self.output.stat().st_size if self.output.exists() else 0
        summary["stderr_tail"] = self.log.read_text(errors="replace").splitlines()[-5:]
        self.output.unlink(missing_ok=True)
        self.log.unlink(missing_ok=True)
        return summary


def daemon_fields(summary: dict, daemon_cpu_s: float, seconds: float, requests: int) -> dict:
    """Result fields of a traced run from the daemon's summary JSON and its CPU time."""
    counts = summary["counts"]
    conns = counts.get("connections", 0)
    exported = summary.get("export", {}).get("exported", {})
    return {
        "daemon_cpu_s": daemon_cpu_s,
        "connections_traced": conns,
        "spans": counts.get("spans", 0),
        "spans_exported": max(exported.values()) if exported else 0,
        "spans_per_s": counts.get("spans", 0) / seconds,
        "requests_traced": counts.get("requests", 0),
        "events": counts.get("events", 0),
        "drops": summary["drops"],
        "requests_sampled": (summary.get("sampler") or {}).get("requests") or None,
        "daemon_cpu_us_per_conn": (daemon_cpu_s / conns * 1e6) if conns else None,
        "daemon_cpu_us_per_req": daemon_cpu_s / max(requests, 1) * 1e6,
    }


def one_run(
    lab: EnvoyLab, workload: str, traced: bool, seconds: float, workdir: Path, source: Path | None = None,
    daemon_cpus: str = "1", h2load_requests: int | None = None, daemon_args: list[str] | None = None,
) -> dict:
    """One baseline or traced run, with h2load for ``h2load_requests`` requests when given, else wrk for
    ``seconds``."""
    tls = workload.startswith("tls_")
    requests = tls or workload in ("keepalive_requests", "h2c_requests")
    daemon = Daemon(lab, workdir, requests=requests, offcpu=workload != "keepalive_no_offcpu",
                    source=source, cpus=daemon_cpus, extra_args=daemon_args) if traced else None
    try:
        time.sleep(0.5)
        envoy0, ticks0, iwi0 = cpu_seconds(lab.pid), cpu_ticks(), irq_work_interrupts()
        daemon0 = daemon.cpu() if daemon else 0.0
        threads0 = thread_cpu_seconds(daemon.proc.pid) if daemon else {}
        if tls:
            result = tls_load(lab, seconds, h2load_requests)
        else:
            result = keepalive_load(lab, seconds, h2load_requests, h2c=workload == "h2c_requests")
        result["irq_work_per_1k_req"] = [(b - a) * 1000 / max(result["requests"], 1)
                                         for a, b in zip(iwi0, irq_work_interrupts(), strict=False)]
        result["client_cpu_us_per_req"] = result["client_cpu_s"] / max(result["requests"], 1) * 1e6
        result["envoy_cpu_s"] = cpu_seconds(lab.pid) - envoy0
        ticks1 = cpu_ticks()
        result["cpu_busy"], result["cpu_steal"] = cpu_busy(ticks0, ticks1), cpu_steal(ticks0, ticks1)
        result["envoy_cpu_us_per_req"] = result["envoy_cpu_s"] / max(result["requests"], 1) * 1e6
        if daemon is not None:
            time.sleep(0.3)  # let the daemon drain what is in flight before reading its CPU
            daemon_cpu_s = daemon.cpu() - daemon0
            threads = thread_cpu_seconds(daemon.proc.pid)
            result["daemon_thread_us_per_req"] = {  # where the daemon's CPU went, thread by thread
                name: (cpu - threads0.get(name, 0.0)) / max(result["requests"], 1) * 1e6
                for name, cpu in sorted(threads.items())}
            result.update(daemon_fields(daemon.stop(), daemon_cpu_s, result["seconds"], result["requests"]))
    except BaseException:
        if daemon is not None:
            daemon.kill()
        raise
    return result


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3, help="baseline/traced pairs per workload")
    parser.add_argument("--seconds", type=float, default=8.0, help="length of one wrk run")
    parser.add_argument("--workloads", default="keepalive,keepalive_requests,tls_new,tls_full_rsa",
                        help=f"comma-separated, of: {', '.join(WORKLOADS)}")
    parser.add_argument(
        "--daemon-rev", help="run the daemon of this git revision (e.g. HEAD) instead of the working tree's"
    )
    parser.add_argument(
        "--client", "--tls-client", dest="client", choices=("wrk", "h2load"), default="wrk",
        help="load generator of every workload (h2load: a request count sized by a calibration run to last "
             "about --seconds)",
    )
    parser.add_argument(
        "--daemon-cpus", default="1",
        help="CPUs the daemon may run on (taskset list), or 'all' to leave its placement to the scheduler",
    )
    parser.add_argument(
        "--daemon-args", default="",
        help="more daemon flags, space-separated (e.g. '--sampler traceidratio --sampler-arg 0.01')",
    )
    args = parser.parse_args()
    unknown = [w for w in args.workloads.split(",") if w not in WORKLOADS]
    if unknown:
        print(f"bench: unknown workload {unknown[0]!r} (known: {', '.join(WORKLOADS)})", file=sys.stderr)
        return 1
    if os.geteuid() != 0:
        print("bench: must run as root", file=sys.stderr)
        return 1
    for tool in ("wrk", "taskset", *(["h2load"] if args.client == "h2load" else [])):
        if shutil.which(tool) is None:
            print(f"bench: {tool} is not installed", file=sys.stderr)
            return 1
    RESULTS.mkdir(exist_ok=True)
    report: dict = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "rounds": args.rounds,
        "seconds": args.seconds,
        "machine": {"cpus": os.cpu_count(), "kernel": os.uname().release},
        "daemon": daemon_revision(args.daemon_rev),
        "daemon_cpus": args.daemon_cpus,
        "daemon_args": args.daemon_args,
        "client": args.client,
        "workloads": {},
    }
    with (
        tempfile.TemporaryDirectory(prefix="otel-envoy-bench-") as tmp,
        contextlib.ExitStack() as labs_stack,
    ):
        source = daemon_source(args.daemon_rev, Path(tmp))
        labs: dict[tuple[str, bool], EnvoyLab] = {}  # by TLS settings, started when first needed
        for workload in args.workloads.split(","):
            tls_settings = WORKLOADS[workload]
            key_type, resumption = tls_settings
            if tls_settings not in labs:
                labs[tls_settings] = labs_stack.enter_context(EnvoyLab(
                    concurrency=1, direct_response=True, cpu=0, log_level="error", key_type=key_type,
                    session_resumption=resumption))
            lab = labs[tls_settings]
            runs: dict[str, list[dict]] = {"baseline": [], "traced": []}
            wrk(f"http://127.0.0.1:{lab.http_port}/", 2, 8, [])  # warm-up
            h2load_requests = None
            if args.client == "h2load":
                if workload.startswith("tls_"):
                    calibration = tls_load(lab, args.seconds, 2000)
                else:
                    calibration = keepalive_load(lab, args.seconds, 50000, h2c=workload == "h2c_requests")
                h2load_requests = max(1000, int(calibration["rps"] * args.seconds))
            for i in range(args.rounds):
                for mode in ("baseline", "traced") if i % 2 == 0 else ("traced", "baseline"):
                    r = one_run(lab, workload, mode == "traced", args.seconds, Path(tmp), source,
                                args.daemon_cpus, h2load_requests, args.daemon_args.split())
                    runs[mode].append(r)
                    print(
                        f"{workload:11s} {mode:8s} round {i}: {r['rps']:9.0f} req/s  envoy "
                        f"{r['envoy_cpu_us_per_req']:6.1f} us/req  {r['client']} "
                        f"{r['client_cpu_us_per_req']:6.1f} us/req  steal "
                        + "/".join(f"{v:.2f}" for v in r["cpu_steal"].values())
                        + (
                            f"  daemon {r['daemon_cpu_us_per_req']:6.1f} us/req, "
                            f"{r['spans_per_s']:7.0f} spans/s, drops {r['drops'] or 0}"
                            if mode == "traced"
                            else ""
                        ),
                        flush=True,
                    )
            report["workloads"][workload] = {"certificate_keys": key_type, "session_resumption": resumption,
                                             "runs": runs, "summary": summarize(runs)}
    out = RESULTS / f"overhead-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(report, indent=2))
    print_table(report)
    print(f"\nwritten: {out}")
    return 0


def med_list(rs: list[dict], key: str) -> list[float] | None:
    """Element-wise medians of a per-CPU list field over runs."""
    lists = [r[key] for r in rs if r.get(key)]
    return [statistics.median(col) for col in zip(*lists, strict=False)] if lists else None


def summarize(runs: dict[str, list[dict]]) -> dict:
    """Medians per mode; the ratios are medians of the per-round (baseline, traced) pairs' ratios."""
    def med(mode: str, key: str) -> float | None:
        vals = [r[key] for r in runs[mode] if r.get(key) is not None]
        return statistics.median(vals) if vals else None

    base_rps, traced_rps = med("baseline", "rps"), med("traced", "rps")
    base_cpu, traced_cpu = med("baseline", "envoy_cpu_us_per_req"), med("traced", "envoy_cpu_us_per_req")
    pairs = list(zip(runs["baseline"], runs["traced"], strict=False))  # run i of each mode: one round

    def pair_ratio(key: str) -> float | None:
        ratios = [t[key] / b[key] for b, t in pairs if b.get(key) and t.get(key)]
        return statistics.median(ratios) if ratios else None

    drops: dict[str, int] = {}
    for r in runs["traced"]:
        for k, v in (r.get("drops") or {}).items():
            drops[k] = drops.get(k, 0) + v
    return {
        "baseline_rps": base_rps,
        "traced_rps": traced_rps,
        "throughput_ratio": pair_ratio("rps"),
        "throughput_ratio_of_medians": traced_rps / base_rps if base_rps and traced_rps else None,
        "envoy_cpu_us_per_req_baseline": base_cpu,
        "envoy_cpu_us_per_req_traced": traced_cpu,
        "envoy_cpu_ratio": pair_ratio("envoy_cpu_us_per_req"),
        "envoy_cpu_ratio_of_medians": traced_cpu / base_cpu if base_cpu and traced_cpu else None,
        "client_cpu_us_per_req_baseline": med("baseline", "client_cpu_us_per_req"),
        "client_cpu_us_per_req_traced": med("traced", "client_cpu_us_per_req"),
        "daemon_cpu_us_per_conn": med("traced", "daemon_cpu_us_per_conn"),
        "daemon_cpu_us_per_req": med("traced", "daemon_cpu_us_per_req"),
        "daemon_thread_us_per_req": {
            name: statistics.median(r["daemon_thread_us_per_req"].get(name, 0.0) for r in runs["traced"])
            for name in sorted({n for r in runs["traced"] for n in r.get("daemon_thread_us_per_req", {})})
        },
        "spans_per_s": med("traced", "spans_per_s"),
        "connections_traced_per_run": med("traced", "connections_traced"),
        "requests_traced_per_run": med("traced", "requests_traced"),
        "requests_per_run": med("traced", "requests"),
        "drops_total": drops,
        "irq_work_per_1k_req_traced": med_list(runs["traced"], "irq_work_per_1k_req"),
        "cpu_steal_median": {
            mode: statistics.median(statistics.fmean(r["cpu_steal"].values()) for r in rs)
            for mode, rs in runs.items() if rs and all(r.get("cpu_steal") for r in rs)
        },
    }


def print_table(report: dict) -> None:
    print(
        "\nworkload   baseline req/s  traced req/s  ratio   envoy us/req base->traced (ratio)  "
        "daemon us/conn us/req  spans/s  drops"
    )
    for name, w in report["workloads"].items():
        s = w["summary"]

        def f(v, spec):
            return format(v, spec) if v is not None else "-"

        print(
            f"{name:11s} {f(s['baseline_rps'], '14.0f')} {f(s['traced_rps'], '13.0f')} "
            f"{f(s['throughput_ratio'], '6.3f')}   {f(s['envoy_cpu_us_per_req_baseline'], '6.1f')} -> "
            f"{f(s['envoy_cpu_us_per_req_traced'], '6.1f')} ({f(s['envoy_cpu_ratio'], '5.3f')})  "
            f"{f(s['daemon_cpu_us_per_conn'], '8.1f')} {f(s['daemon_cpu_us_per_req'], '6.1f')}"
            f"  {f(s['spans_per_s'], '7.0f')}  {s['drops_total'] or 0}"
        )
        if s.get("daemon_thread_us_per_req"):
            print("            daemon us/req by thread: " + ", ".join(
                f"{thread} {us:.1f}" for thread, us in s["daemon_thread_us_per_req"].items() if us >= 0.05))


if __name__ == "__main__":
    sys.exit(main())

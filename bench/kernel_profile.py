"""Where Envoy's CPU goes with our kernel side attached: perf samples of Envoy's CPU, by BPF program, the
syscall slow path the tracepoints switch on, and the rest (root, after setup.sh; needs `perf`).

The kernel's own accounting (bench/program_cost.py) times each BPF program's body; it misses what the
tracepoints cost around it: the dispatch (``bpf_trace_run2``), the syscall slow path every task takes while
any syscall tracepoint is enabled (``syscall_trace_enter``, ``syscall_exit_work``) and the perf handlers of
the ``syscalls:sys_*`` tracepoints, which run on every syscall of the machine once one is enabled
(``perf_syscall_enter`` / ``perf_syscall_exit``). This benchmark samples CPU 0 (Envoy's one worker, a
direct response, h2load keep-alive on CPU 1 as the cost targets are judged) with ``perf record -C 0 -g``
(cpu-clock: this VM has no PMU) and classifies each sample by its call chain:

  bpf:<program>  inside a BPF program (its helpers included) or its dispatch (``bpf``: the dispatch alone)
  slowpath       the syscall slow path and the perf syscall handlers, outside any program
  idle           CPU 0 idle (Envoy waiting for the client)
  rest           Envoy's own work, user and kernel

Kernel sides (``--side``): ``none``; ``default``: the daemon's default programs (request capture, sampling at
0.01 parent-based, off-CPU probes) loaded from ``--bpf-dir`` (default: this checkout's bpf/) with their ring
drained but no daemon; ``daemon``: the real daemon with default flags (and ``--daemon-args``), not pinned.
The leaves (innermost functions) of the BPF and slow-path samples are listed too: inside a program the
samples sit on the instruction after each helper call (the return through this CPU's return thunk), so
helper calls, not the programs' own instructions, are what a request pays for.

Usage:  .venv/bin/python bench/kernel_profile.py [--side none,default,daemon] [--seconds 5] [--bpf-dir DIR]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from otel_envoy.lab.lab import EnvoyLab
from otel_envoy.probes.loader import BPF_DIR, ConnectionProbes, ProbeConfig
from otel_envoy.sampling import DEFAULT_KEEP_SLOW_MS, kernel_threshold

RESULTS = Path(__file__).resolve().parent / "results"
SLOW_PATH = ("syscall_exit_work", "syscall_trace_enter", "perf_syscall_enter", "perf_syscall_exit")
DISPATCH = ("bpf_trace_run", "trace_call_bpf", "perf_trace_run_bpf")


def classify(script_output: str) -> tuple[int, collections.Counter[str], collections.Counter[str]]:
    """Samples in ``perf script -F comm,ip,sym`` output: their count, by class, and the BPF and slow-path
    samples by (class, innermost function)."""
    total, classes, leaves = 0, collections.Counter(), collections.Counter()
    for block in script_output.split("\n\n"):
        lines = [line.strip() for line in block.strip().splitlines()]
        if not lines:
            continue
        total += 1
        if lines[0].split()[0] == "swapper":
            classes["idle"] += 1
            continue
        syms = [line.split(None, 1)[1] if len(line.split(None, 1)) > 1 else "?" for line in lines[1:]]
        leaf = syms[0] if syms else "?"
        program = next((s for s in syms if s.startswith("bpf_prog_")), None)
        if program is not None:
            name = "bpf:" + program.split("_", 3)[-1]  # bpf_prog_<tag>_<name>
        elif any(s.startswith(DISPATCH) for s in syms):
            name = "bpf"
        elif any(s.startswith(SLOW_PATH) or s.startswith("__bpf_trace_") or s.startswith("__traceiter_")
                 for s in syms):
            name = "slowpath"
        else:
            classes["rest"] += 1
            continue
        classes[name] += 1
        leaves[f"{name} <- {leaf.split('+')[0]}"] += 1
    return total, classes, leaves


def attach_default(lab: EnvoyLab, bpf_dir: Path) -> ConnectionProbes:
    """The daemon's default kernel side, without the daemon."""
    probes = ConnectionProbes(ProbeConfig(offcpu=True, sampling=True, program_dir=bpf_dir))
    probes.set_sample_threshold(kernel_threshold(0.01))
    probes.set_parent_based(True)
    probes.set_keep_slow(int(DEFAULT_KEEP_SLOW_MS * 1e6))
    probes.add_targets([lab.pid])
    probes.set_listen_ports([lab.http_port, lab.tls_port])
    probes.open_ring_buffer(lambda _raw: None)
    return probes


def profile(side: str, seconds: float, bpf_dir: Path, daemon_args: list[str], workdir: Path) -> dict:
    """One profile of CPU 0 under saturating keep-alive load with ``side`` attached."""
    data = workdir / f"perf-{side}.data"
    with EnvoyLab(concurrency=1, direct_response=True, cpu=0, log_level="error") as lab:
        probes, daemon = None, None
        if side == "default":
            probes = attach_default(lab, bpf_dir)
        elif side == "daemon":
            ready = workdir / "ready"
            daemon = subprocess.Popen([sys.executable, "-m", "otel_envoy.cli", "run", "--pid", str(lab.pid),
                                       "--output", os.devnull, "--ready-file", str(ready), *daemon_args])
            while not ready.exists():
                if daemon.poll() is not None:
                    raise SystemExit(f"kernel_profile: the daemon exited {daemon.returncode}")
                time.sleep(0.2)
        url = f"http://127.0.0.1:{lab.http_port}/"
        cmd = ["taskset", "-c", "1", "h2load", "-t1", "-c16", "-n", "100000000", "--h1", url]
        load = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
        try:
            time.sleep(2)  # past the start of the load
            subprocess.run(["perf", "record", "-q", "-C", "0", "-g", "-o", str(data), "--", "sleep",
                            str(seconds)], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        finally:
            load.kill()
            load.wait()
            if daemon is not None:
                daemon.terminate()
                daemon.wait(60)
            if probes is not None:
                probes.close()
    out = subprocess.run(["perf", "script", "-i", str(data), "-F", "comm,ip,sym"], capture_output=True,
                         text=True, check=True).stdout
    total, classes, leaves = classify(out)
    return {"side": side, "samples": total,
            "classes": {k: round(100 * v / total, 2) for k, v in classes.most_common()},
            "leaves": {k: round(100 * v / total, 2) for k, v in leaves.most_common(25)}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--side", default="none,default,daemon")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--bpf-dir", type=Path, default=BPF_DIR, help="bpf/ of the `default` side")
    ap.add_argument("--daemon-args", default="", help="extra flags of the `daemon` side")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("kernel_profile: needs root (BPF, perf on CPU 0)")
    report = []
    with tempfile.TemporaryDirectory() as tmp:
        for side in args.side.split(","):
            r = profile(side, args.seconds, args.bpf_dir, args.daemon_args.split(), Path(tmp))
            report.append(r)
            shares = ", ".join(f"{k} {v}%" for k, v in r["classes"].items())
            print(f"{side:8s} {r['samples']} samples: {shares}")
            for leaf, share in r["leaves"].items():
                print(f"    {share:5.2f}%  {leaf}")
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"kernel_profile-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"bpf_dir": str(args.bpf_dir), "seconds": args.seconds, "profiles": report},
                               indent=1))
    print(f"written: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

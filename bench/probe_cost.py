"""What does attaching syscall probes cost Envoy, before our program does anything? (root, after setup.sh)

Alternates, on one direct-response Envoy (1 worker on CPU 0, wrk keep-alive on CPU 1), minimal BPF programs:
  none             nothing attached
  empty_io_tp      syscalls:sys_{enter,exit}_{read,...,sendmsg} programs that return at once
  filter_io_tp     the same with a pid-filter hash lookup
  raw_enter_exit   one raw_syscalls sys_enter + sys_exit pair with a pid-filter lookup
  epoll_exit_only  syscalls:sys_exit_epoll_wait, empty
  raw_exit_only    one raw_syscalls:sys_exit program with the pid filter (what every syscall pays in the
                   default build before anything else)
  sock_len_only    raw sock:sock_recv_length + sock_send_length programs with the pid filter (socket I/O
                   only)
  full             the real conn.bpf.c (ConnectionProbes, connection spans only), its ring drained
  full_no_offcpu   the same without the scheduler probes (--no-offcpu): full vs this is their cost
  default          the daemon's default kernel side (request capture, sampling at 0.01 parent-based, off-CPU
                   probes), its ring drained: what Envoy pays at default settings, without the daemon's CPU
  default_no_offcpu  the same without the scheduler probes
  full_base        with --baseline-bpf DIR: `full` compiled from DIR (the bpf/ directory of another revision:
                   conn.bpf.c, its *.bpf.h units and events.h, e.g. from `git archive REV bpf | tar -x -C DIR
                   --strip-components=1`), to compare two kernel sides in one run
and prints Envoy's CPU per request for each (medians of --rounds rounds).

Usage:  .venv/bin/python bench/probe_cost.py [--variants none,full] [--rounds 3] [--seconds 6]
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from overhead import cpu_seconds, h2load, wrk

from otel_envoy.lab.lab import EnvoyLab
from otel_envoy.probes.loader import program_text

IO_SYSCALLS = ("read", "readv", "recvfrom", "recvmsg", "write", "writev", "sendto", "sendmsg")
FILTER = "u32 t = bpf_get_current_pid_tgid() >> 32; if (!targets.lookup(&t)) return 0; return 0;"
TABLE = "BPF_HASH(targets, u32, u8, 64);\n"
VARIANTS: dict[str, str | None] = {
    "none": None,
    "empty_io_tp": "".join(
        f"TRACEPOINT_PROBE(syscalls, sys_enter_{s}) {{ return 0; }}\n"
        f"TRACEPOINT_PROBE(syscalls, sys_exit_{s}) {{ return 0; }}\n" for s in IO_SYSCALLS),
    "filter_io_tp": TABLE + "".join(
        f"TRACEPOINT_PROBE(syscalls, sys_enter_{s}) {{ {FILTER} }}\n"
        f"TRACEPOINT_PROBE(syscalls, sys_exit_{s}) {{ {FILTER} }}\n" for s in IO_SYSCALLS),
    "raw_enter_exit": TABLE + f"RAW_TRACEPOINT_PROBE(sys_enter) {{ {FILTER} }}\n"
                              f"RAW_TRACEPOINT_PROBE(sys_exit) {{ {FILTER} }}\n",
    "epoll_exit_only": "TRACEPOINT_PROBE(syscalls, sys_exit_epoll_wait) { return 0; }\n",
    "raw_exit_only": TABLE + f"RAW_TRACEPOINT_PROBE(sys_exit) {{ {FILTER} }}\n",
    "sock_len_only": TABLE + f"RAW_TRACEPOINT_PROBE(sock_recv_length) {{ {FILTER} }}\n"
                             f"RAW_TRACEPOINT_PROBE(sock_send_length) {{ {FILTER} }}\n",
    "default": "",
    "default_no_offcpu": "",
    "full": "",
    "full_no_offcpu": "",
    "full_base": "",
}
BASELINE_BPF: Path | None = None  # --baseline-bpf


def attach(name: str, lab: EnvoyLab) -> object | None:
    """Load one variant; returns what must be cleaned up (a bcc BPF object or ConnectionProbes)."""
    src = VARIANTS[name]
    if src is None:
        return None
    if name.startswith(("full", "default")):
        from otel_envoy.probes.loader import ConnectionProbes, ProbeConfig
        from otel_envoy.sampling import DEFAULT_KEEP_SLOW_MS, kernel_threshold

        if name.startswith("default"):
            config = ProbeConfig(offcpu=name == "default", sampling=True)
        else:
            config = ProbeConfig(http_capture=False, offcpu=name != "full_no_offcpu")
        if name == "full_base":
            if BASELINE_BPF is None:
                raise SystemExit("probe_cost: full_base needs --baseline-bpf DIR")
            config = dataclasses.replace(config, program_dir=BASELINE_BPF)
        probes = ConnectionProbes(config)
        if config.sampling:
            probes.set_sample_threshold(kernel_threshold(0.01))
            probes.set_parent_based(True)
            probes.set_keep_slow(int(DEFAULT_KEEP_SLOW_MS * 1e6))
        probes.add_targets([lab.pid])
        probes.set_listen_ports([lab.http_port, lab.tls_port])
        probes.open_ring_buffer(lambda _raw: None)
        return probes
    from bcc import BPF  # Debian's python3-bpfcc

    bpf = BPF(text=src)
    if "targets" in src:
        bpf[b"targets"][ctypes.c_uint32(lab.pid)] = ctypes.c_uint8(1)
    return bpf


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default=",".join(v for v in VARIANTS if v != "full_base"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--client", choices=("wrk", "h2load"), default="wrk",
                    help="wrk (32 connections, --seconds) or h2load (16 connections, --requests), as "
                         "the cost targets are judged")
    ap.add_argument("--requests", type=int, default=300_000, help="h2load: requests per run")
    ap.add_argument("--baseline-bpf", type=Path, help="bpf/ directory of full_base (all its units)")
    args = ap.parse_args()
    global BASELINE_BPF
    BASELINE_BPF = args.baseline_bpf
    if BASELINE_BPF is not None:
        program_text(BASELINE_BPF)  # every unit is there: fail now, not after starting Envoy
    names = args.variants.split(",")
    results: dict[str, list[tuple[float, float]]] = {n: [] for n in names}
    ratios: dict[str, list[float]] = {n: [] for n in names}
    rps_ratios: dict[str, list[float]] = {n: [] for n in names}
    with EnvoyLab(concurrency=1, direct_response=True, cpu=0, log_level="error") as lab:
        url = f"http://127.0.0.1:{lab.http_port}/"
        wrk(url, 2, 8, [])  # warm-up
        for i in range(args.rounds):
            # the machine's speed drifts over tens of seconds: rotate the order so no variant always runs
            # first, and compare each variant with the other runs of its own round
            order = names[i % len(names):] + names[:i % len(names)]
            this_round: dict[str, float] = {}
            this_rps: dict[str, float] = {}
            for name in order:
                loaded = attach(name, lab)
                try:
                    before = cpu_seconds(lab.pid)
                    r = h2load(url, args.requests, 16, []) if args.client == "h2load" \
                        else wrk(url, args.seconds, 32, [])
                    us = (cpu_seconds(lab.pid) - before) / r["requests"] * 1e6
                finally:
                    if loaded is not None:
                        (loaded.close if hasattr(loaded, "close") else loaded.cleanup)()  # type: ignore[attr-defined]
                results[name].append((r["rps"], us))
                this_round[name] = us
                this_rps[name] = r["rps"]
                print(f"{name:16s} {r['rps']:9.0f} req/s  {us:5.2f} us/req", flush=True)
            if "none" in this_round:
                for name, us in this_round.items():
                    ratios[name].append(us / this_round["none"])
                    rps_ratios[name].append(this_rps[name] / this_rps["none"])
    for name, runs in results.items():
        rps = statistics.median(x[0] for x in runs)
        us = statistics.median(x[1] for x in runs)
        extra = f"  vs none in the same round: Envoy CPU/req x{statistics.median(ratios[name]):.3f}, " \
                f"throughput x{statistics.median(rps_ratios[name]):.3f}" if ratios[name] else ""
        print(f"median {name:16s} {rps:9.0f} req/s  {us:5.2f} us/req{extra}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

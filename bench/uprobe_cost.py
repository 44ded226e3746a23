"""What does one uprobe hit cost? (root, after setup.sh; ~30 s, one CPU)

Builds a tiny C program whose ``SSL_read(SSL *ssl, void *buf, int num)`` returns at once, calls it N times in
a loop pinned to one CPU, and reports wall-clock ns per call in each variant:
  none          nothing attached
  empty_entry   an empty program on a uprobe at entry only (SSL_do_handshake's probe)
  empty         a uprobe + uretprobe pair of programs that return at once: the kernel's trap, breakpoint
                emulation and return-address hijack, i.e. the floor any uprobe tier pays
  not_target    the real tier (bpf/uprobes.bpf.h through ConnectionProbes with UPROBES), the caller not a
                target: what other processes running the same binary pay
  target        the same, the caller a target: entry saves the call in `ssl_calls`, the return looks it up
                and deletes it (no socket was seen, so no record: the ring record is costed in
                docs/overhead.md's ring-buffer figures)
Per hit = (variant - none) / N. Medians of --rounds rounds.

Usage:  .venv/bin/python bench/uprobe_cost.py [--calls 200000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from otel_envoy.probes.loader import ConnectionProbes, ProbeConfig
from otel_envoy.probes.uprobe_symbols import discover

SOURCE = r"""
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
struct ssl_st;
__attribute__((noinline, used)) int SSL_read(struct ssl_st *ssl, void *buf, int num) {
  __asm__ volatile("" ::: "memory");
  return num;
}
__attribute__((noinline, used)) int SSL_write(struct ssl_st *ssl, const void *buf, int num) { return num; }
int main(int argc, char **argv) {
  long n = atol(argv[1]);
  char buf[64];
  struct timespec a, b;
  clock_gettime(CLOCK_MONOTONIC, &a);
  for (long i = 0; i < n; i++) SSL_read((struct ssl_st *)buf, buf, 16);
  clock_gettime(CLOCK_MONOTONIC, &b);
  printf("%.1f\n", ((b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec)) / n);
  return 0;
}
"""
EMPTY = "int on_enter(struct pt_regs *ctx) { return 0; }\nint on_return(struct pt_regs *ctx) { return 0; }\n"


def run(binary: Path, calls: int, cpu: int) -> float:
    """ns per call of one run, pinned to ``cpu``."""
    proc = subprocess.Popen(["taskset", "-c", str(cpu), str(binary), str(calls)], stdout=subprocess.PIPE)
    out, _ = proc.communicate(timeout=300)
    return float(out)


def main() -> int:
    """Build, measure each variant, print ns per call and per hit."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cpu", type=int, default=0)
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("needs root", file=sys.stderr)
        return 1
    from bcc import BPF

    work = Path(tempfile.mkdtemp(prefix="uprobe-cost-"))
    (work / "target.c").write_text(SOURCE)
    binary = work / "target"
    subprocess.run(["gcc", "-O2", "-Wl,--build-id", "-o", str(binary), str(work / "target.c")], check=True)
    tier = discover(str(binary))
    read = tier.functions["SSL_read"].vaddr
    results: dict[str, list[float]] = {}

    def measure(name: str) -> None:
        results[name] = [run(binary, args.calls, args.cpu) for _ in range(args.rounds)]

    measure("none")
    empty = BPF(text=EMPTY)
    empty.attach_uprobe(name=str(binary).encode(), addr=read, fn_name=b"on_enter")
    measure("empty_entry")
    empty.cleanup()
    empty = BPF(text=EMPTY)
    empty.attach_uprobe(name=str(binary).encode(), addr=read, fn_name=b"on_enter")
    empty.attach_uretprobe(name=str(binary).encode(), addr=read, fn_name=b"on_return")
    measure("empty")
    empty.cleanup()
    probes = ConnectionProbes(ProbeConfig(sampling=True, uprobes=tuple(tier.sites())))
    try:
        measure("not_target")
        # the child makes itself a target before it execs the loop (its pid is known only once forked)
        rounds = []
        for _ in range(args.rounds):
            argv = ["taskset", "-c", str(args.cpu), "sh", "-c", 'read x; exec "$0" "$1"', str(binary),
                    str(args.calls)]
            proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            probes.add_targets([proc.pid])
            out, _ = proc.communicate(b"go\n", timeout=300)
            rounds.append(float(out))
        results["target"] = rounds
        calls_in_table = len(list(probes.bpf[b"ssl_calls"].items()))
    finally:
        probes.close()
    base = statistics.median(results["none"])
    print(f"{args.calls} calls of SSL_read per run, CPU {args.cpu}, medians of {args.rounds} rounds")
    for name, values in results.items():
        median = statistics.median(values)
        print(f"  {name:<11} {median:8.1f} ns/call   {median - base:8.1f} ns per hit   "
              f"({', '.join(f'{v:.1f}' for v in values)})")
    print(f"  calls left in ssl_calls after the runs: {calls_in_table} (every entry met its return)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

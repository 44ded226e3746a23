"""What one BPF helper call and one syscall tracepoint cost on this machine (root): the per-request floor.

Our programs' cost per keep-alive request is mostly calls (docs/overhead.md, "Where Envoy's extra CPU goes"):
each call into the kernel returns through this CPU's speculative-return mitigation. This benchmark times
them one by one. A raw ``sys_exit`` program that returns at once for other processes runs, for this process's
``getppid(2)`` in a loop, a body that repeats one call ``--repeat`` times; the kernel's own accounting
(``kernel.bpf_stats_enabled``: ``run_time_ns`` / ``run_cnt``) gives ns per run, and the body's cost over the
empty one's, divided by the repeats, is ns per call. Calls: the current task's pid, the clock, a random
number, the saved registers (``bpf_probe_read_kernel``, 8 bytes), a user read of 8 and of 128 bytes
(``bpf_probe_read_user``), a hash map lookup (a call into the map's code), an array and a per-CPU array
lookup (inlined by the verifier: no call), the current task.

Then the tracepoints themselves, by wall time per ``getppid`` (best of 5 loops of --loops calls): none
attached; an empty raw ``sys_exit`` program (its dispatch, on every syscall of the machine); one
``syscalls:sys_enter_*`` program on another syscall (switches on the syscall slow path for every task, and
the perf handler's check of the syscall number).

Usage:  .venv/bin/python bench/helper_cost.py [--repeat 8] [--calls 200000] [--loops 300000]
Writes bench/results/helper_cost-<time>.json and prints a table.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
STATS = Path("/proc/sys/kernel/bpf_stats_enabled")

#: name -> C statement run --repeat times (adds to x); UADDR is a user buffer of this process
CALLS = {
    "empty": "",
    "bpf_get_current_pid_tgid": "x += bpf_get_current_pid_tgid();",
    "bpf_ktime_get_ns": "x += bpf_ktime_get_ns();",
    "bpf_get_prandom_u32": "x += bpf_get_prandom_u32();",
    "bpf_probe_read_kernel (8 B of the saved registers)":
        "struct pt_regs *regs = (struct pt_regs *)ctx->args[0]; u64 v = 0; "
        "bpf_probe_read_kernel(&v, 8, &regs->di); x += v;",
    "bpf_probe_read_user (8 B)": "u64 v = 0; bpf_probe_read_user(&v, 8, (void *)UADDR); x += v;",
    "bpf_probe_read_user (128 B)": "char b[128]; bpf_probe_read_user(b, 128, (void *)UADDR); x += b[5];",
    "hash map lookup": "u64 k = 7; u64 *p = h.lookup(&k); if (p) x += *p;",
    "array lookup (inlined)": "u32 k = 0; u64 *p = a.lookup(&k); if (p) x += *p;",
    "per-CPU array lookup (inlined)": "u32 k = 0; u64 *p = pa.lookup(&k); if (p) x += *p;",
    "bpf_get_current_task": "x += (u64)bpf_get_current_task();",
}

PROGRAM = """
#include <asm/ptrace.h>
BPF_HASH(h, u64, u64, 1024);
BPF_ARRAY(a, u64, 1);
BPF_PERCPU_ARRAY(pa, u64, 1);
BPF_ARRAY(out, u64, 1);
RAW_TRACEPOINT_PROBE(sys_exit) {
    u64 pid_tgid = bpf_get_current_pid_tgid();
    if ((pid_tgid >> 32) != PID)
        return 0;
    u64 x = 0;
#pragma unroll
    for (int i = 0; i < REPEAT; i++) { BODY }
    u32 zero = 0;
    u64 *o = out.lookup(&zero);
    if (o)
        *o = x;
    return 0;
}
"""


def ns_per_run(bpf: object, calls: int, libc: ctypes.CDLL) -> float:
    """Run getppid ``calls`` times; the program's kernel-timed ns per run."""
    fn = bpf.funcs[b"raw_tracepoint__sys_exit"]  # type: ignore[attr-defined]

    def stats() -> tuple[int, int]:
        text = Path(f"/proc/self/fdinfo/{fn.fd}").read_text()
        fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
        return int(fields.get("run_time_ns", 0)), int(fields.get("run_cnt", 0))

    t0, c0 = stats()
    for _ in range(calls):
        libc.getppid()
    t1, c1 = stats()
    return (t1 - t0) / max(1, c1 - c0)


def wall_ns(libc: ctypes.CDLL, loops: int) -> float:
    """Best of 5: wall ns per getppid call (Python's loop included; compare differences only)."""
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(loops):
            libc.getppid()
        best = min(best, (time.perf_counter() - start) / loops * 1e9)
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=8, help="calls per program run")
    ap.add_argument("--calls", type=int, default=200_000, help="getppid calls per helper")
    ap.add_argument("--loops", type=int, default=300_000, help="getppid calls per timed loop (dispatch)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench: must run as root", file=sys.stderr)
        return 1
    from bcc import BPF

    libc = ctypes.CDLL(None)
    buf = ctypes.create_string_buffer(256)
    old_stats = STATS.read_text().strip()
    STATS.write_text("1")
    per_run: dict[str, float] = {}
    try:
        for name, body in CALLS.items():
            repeat = 1 if name == "empty" else args.repeat
            text = (PROGRAM.replace("BODY", body).replace("REPEAT", str(repeat))
                    .replace("PID", str(os.getpid())).replace("UADDR", str(ctypes.addressof(buf))))
            bpf = BPF(text=text)
            if name == "hash map lookup":
                bpf[b"h"][ctypes.c_ulonglong(7)] = ctypes.c_ulonglong(1)
            per_run[name] = ns_per_run(bpf, args.calls, libc)
            bpf.cleanup()
    finally:
        STATS.write_text(old_stats)
    empty = per_run.pop("empty")
    per_call = {name: (ns - empty) / args.repeat for name, ns in per_run.items()}
    dispatch = {"none": wall_ns(libc, args.loops)}
    for name, text in (("empty raw sys_exit program", "RAW_TRACEPOINT_PROBE(sys_exit) { return 0; }"),
                       ("one syscalls:sys_enter_close program",
                        "TRACEPOINT_PROBE(syscalls, sys_enter_close) { return 0; }")):
        bpf = BPF(text=text)
        dispatch[name] = wall_ns(libc, args.loops)
        bpf.cleanup()
    dispatch["none, again"] = wall_ns(libc, args.loops)
    base = min(dispatch["none"], dispatch["none, again"])
    print(f"program run with no call: {empty:.1f} ns (the pid filter and the kernel's timing of the run)")
    print(f"{'call':55s} ns per call")
    for name, ns in per_call.items():
        print(f"{name:55s} {ns:8.1f}")
    print(f"{'tracepoints attached':55s} ns per syscall over none")
    for name, ns in dispatch.items():
        print(f"{name:55s} {ns - base:8.1f}")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"helper_cost-{time.strftime('%Y%m%d-%H%M%S')}.json"
    report = {"kernel": os.uname().release, "repeat": args.repeat, "calls": args.calls, "empty_run_ns": empty,
              "ns_per_call": per_call, "dispatch_ns_over_none": {k: v - base for k, v in dispatch.items()}}
    out.write_text(json.dumps(report, indent=1))
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

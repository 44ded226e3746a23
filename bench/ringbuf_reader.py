"""Ring-buffer reader stress comparison: bcc's per-record ctypes callback vs MmapRingBuffer (not a test).

A raw sys_enter program writes one record per getppid(2) of a producer process pinned to CPU 0, paced to a
target rate, sizes like the daemon's events (mostly 64-200 bytes, 1 in 32 between 1 and 4 KiB), into a ring
of --pages pages (default 4096 = 16 MiB). The consumer thread, pinned to CPU 1, drains it with one reader
per run; readers alternate within every round:

  bcc         BPF.ring_buffer_poll(100) with the callback shape the loader uses (string_at -> on_record)
  mmap        MmapRingBuffer.poll(on_record, 100)
  mmap-batch  MmapRingBuffer.poll_batch(on_batch, 100); on_batch loops over the list itself
  mmap-6cd73a6  (with --with-reverted) the reader of commit 6cd73a6 (reverted in bcf2bd8), loaded from git

Per-record work: "none" (an empty function call; the batch reader's loop body is empty) or "decode" (a
struct unpack, a namedtuple, a per-key dict update and a spin calibrated to --work-us in total). Optionally a
second Python thread, pinned to the consumer's CPU, encodes JSON span batches non-stop like the export
thread (busy=1), to see how the readers share the GIL and the CPU with it; and optionally a CPU-bound
process pinned to the consumer's CPU (hog=1), as when the daemon shares its CPU with the load generator
(bench/overhead.py): the consumer thread then gets preempted at arbitrary instructions.

Reported per run: records produced (BPF counter), delivered, kernel drops (bpf_ringbuf_output failed),
delivered per second (from the start until the ring was drained), consumer thread CPU per delivered record
(CLOCK_THREAD_CPUTIME_ID) and utilisation, the highest ring fill seen (sampled every 10 ms), the producer's
CPU per record (its syscalls run the BPF program and any wakeups), and with busy=1 the export-like thread's
batches per second. Medians over --rounds are printed; everything goes to bench/results/ringbuf-<time>.json.

Usage (root): .venv/bin/python bench/ringbuf_reader.py [--seconds 4] [--rounds 2] [--with-reverted]
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.util
import json
import mmap
import os
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import namedtuple
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from otel_envoy.probes.ringbuf import MmapRingBuffer  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
PAGE = mmap.PAGESIZE
GETPPID_NR = 110  # x86-64
PRODUCER_CPU, CONSUMER_CPU = 0, 1
REVERTED_COMMIT = "6cd73a6"

PROGRAM = r"""
struct rec_t { u32 seq; u16 cpu; u16 size; u64 ts; u64 pid_tgid; u64 key; u8 rest[4096 - 32]; };
BPF_RINGBUF_OUTPUT(events, RING_PAGES);
BPF_PERCPU_ARRAY(scratch, struct rec_t, 1);
BPF_PERCPU_ARRAY(counters, u64, 2);  /* 0: produced, 1: bpf_ringbuf_output failed */
BPF_ARRAY(target, u32, 1);

RAW_TRACEPOINT_PROBE(sys_enter)
{
    if (ctx->args[1] != GETPPID_NR)
        return 0;
    u32 z = 0, one = 1;
    u32 *tgid = target.lookup(&z);
    u64 pid_tgid = bpf_get_current_pid_tgid();
    if (!tgid || *tgid != (pid_tgid >> 32))
        return 0;
    struct rec_t *r = scratch.lookup(&z);
    u64 *produced = counters.lookup(&z);
    u64 *failed = counters.lookup(&one);
    if (!r || !produced || !failed)
        return 0;
    u64 seq = *produced;
    *produced = seq + 1;
    u32 x = (u32)seq * 1103515245u + 12345u;
    u64 size = 64 + (x >> 8) % 137;                 /* 64 .. 200 bytes */
    if (((x >> 16) & 31) == 0)
        size = 1024 + (x >> 4) % 3073;              /* 1 in 32: 1 .. 4 KiB */
    asm volatile("" : "+r"(size));
    size &= 0x1fff;
    if (size > sizeof(*r)) size = sizeof(*r);
    if (size < 32) size = 32;
    r->seq = seq;
    r->cpu = bpf_get_smp_processor_id();
    r->size = size;
    r->ts = bpf_ktime_get_ns();
    r->pid_tgid = pid_tgid;
    r->key = x & 1023;
    if (events.ringbuf_output(r, size, 0) != 0)
        *failed += 1;
    return 0;
}
"""

# The producer: paced getppid() calls; prints its call count when done.
PRODUCER = r"""
import os, sys, time
rate, seconds = float(sys.argv[1]), float(sys.argv[2])
sys.stdin.readline()
getppid = os.getppid
step = 64
n = 0
t0 = time.perf_counter()
end = t0 + seconds
while True:
    now = time.perf_counter()
    if now >= end:
        break
    ahead = n - (now - t0) * rate
    if ahead > 0:
        time.sleep(min(ahead / rate, 0.001))
        continue
    for _ in range(step):
        getppid()
    n += step
print(n)
"""

HDR = struct.Struct("<IHHQQQ")
Event = namedtuple("Event", "seq cpu size ts pid_tgid key head")


class Work:
    """Per-record work: nothing, or a decode-like step calibrated to about ``work_us``."""

    def __init__(self, kind: str, work_us: float) -> None:
        self.kind = kind
        self.state: dict[int, list[int]] = {}
        self.spin = 0
        self.measured_us = 0.0
        if kind == "decode":
            self.spin = self._calibrate(work_us)

    def decode(self, raw: bytes) -> None:
        seq, cpu, size, ts, pid_tgid, key = HDR.unpack_from(raw)
        ev = Event(seq, cpu, size, ts, pid_tgid, key, raw[32:48])
        st = self.state.get(ev.key)
        if st is None:
            st = self.state[ev.key] = [ev.ts, 0, 0]
        st[1] += 1
        st[2] += ev.size
        x = ev.seq
        for _ in range(self.spin):
            x = (x * 33 + 7) & 0xFFFF

    def _calibrate(self, work_us: float) -> int:
        sample = HDR.pack(1, 0, 100, 123, 456, 7) + bytes(68)
        self.spin = 0
        n = 20000
        t = time.thread_time()
        for _ in range(n):
            self.decode(sample)
        base = (time.thread_time() - t) / n * 1e6
        self.spin = 100
        t = time.thread_time()
        for _ in range(n):
            self.decode(sample)
        per_spin = ((time.thread_time() - t) / n * 1e6 - base) / 100
        spin = max(0, round((work_us - base) / per_spin))
        self.spin = spin
        t = time.thread_time()
        for _ in range(n):
            self.decode(sample)
        self.measured_us = (time.thread_time() - t) / n * 1e6
        self.state.clear()
        return spin

    def per_record(self) -> Callable[[bytes], None]:
        if self.kind == "decode":
            return self.decode

        def nothing(raw: bytes) -> None:
            pass

        return nothing

    def per_batch(self) -> Callable[[list[bytes]], None]:
        if self.kind == "decode":
            decode = self.decode

            def on_batch(batch: list[bytes]) -> None:
                for raw in batch:
                    decode(raw)

            return on_batch

        def on_batch_nothing(batch: list[bytes]) -> None:
            for _raw in batch:
                pass

        return on_batch_nothing


class RingLevel:
    """Read-only view of a ring's two positions (fill level sampling, any reader)."""

    def __init__(self, map_fd: int) -> None:
        self._cons = mmap.mmap(map_fd, PAGE, access=mmap.ACCESS_READ, offset=0)
        self._prod = mmap.mmap(map_fd, PAGE, access=mmap.ACCESS_READ, offset=PAGE)
        self._c = memoryview(self._cons).cast("Q")
        self._p = memoryview(self._prod).cast("Q")

    def used(self) -> int:
        return self._p[0] - self._c[0]

    def close(self) -> None:
        self._c.release()
        self._p.release()
        self._cons.close()
        self._prod.close()


def load_reverted() -> type | None:
    """The MmapRingBuffer of the reverted commit, straight from git (None if git or the commit is missing)."""
    try:
        src = subprocess.run(
            ["git", "-C", str(ROOT), "show", f"{REVERTED_COMMIT}:otel_envoy/probes/ringbuf.py"],
            capture_output=True, check=True, text=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    path = Path(tempfile.mkdtemp(prefix="ringbuf-reverted-")) / "ringbuf_reverted.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("ringbuf_reverted", path)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.MmapRingBuffer


class BusyExporter(threading.Thread):
    """Stands in for the export thread: builds span dicts and JSON-encodes them, non-stop."""

    def __init__(self, cpu: int) -> None:
        super().__init__(name="busy-export", daemon=True)
        self.cpu = cpu
        self.stop = threading.Event()
        self.batches = 0
        self.cpu_s = 0.0

    def run(self) -> None:
        os.sched_setaffinity(0, {self.cpu})
        t0 = time.thread_time()
        i = 0
        while not self.stop.is_set():
            spans = []
            for j in range(32):
                i += 1
                spans.append({
                    "traceId": f"{i:032x}", "spanId": f"{j:016x}", "name": "tcp.connection",
                    "startTimeUnixNano": str(1_700_000_000_000_000_000 + i),
                    "attributes": [{"key": k, "value": {"intValue": str(i * j)}}
                                   for k in ("network.peer.port", "network.local.port", "process.pid")],
                })
            json.dumps({"resourceSpans": [{"scopeSpans": [{"spans": spans}]}]})
            self.batches += 1
        self.cpu_s = time.thread_time() - t0


class Consumer(threading.Thread):
    """Runs one reader on CONSUMER_CPU until told to stop, then drains what is left."""

    def __init__(self, reader: str, bpf: object, pages: int, work: Work, reverted: type | None) -> None:
        super().__init__(name=f"consumer-{reader}", daemon=True)
        self.reader = reader
        self.bpf = bpf
        self.pages = pages
        self.work = work
        self.reverted = reverted
        self.stop = threading.Event()
        self.started = threading.Event()
        self.delivered = 0
        self.cpu_s = 0.0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            os.sched_setaffinity(0, {CONSUMER_CPU})
            self._run()
        except BaseException as exc:
            self.error = exc
            self.started.set()

    def _run(self) -> None:
        events = self.bpf[b"events"]
        if self.reader == "bcc":
            from bcc import libbcc

            on_record = self.work.per_record()
            string_at = ctypes.string_at

            def callback(_ctx: object, data: int, size: int) -> None:  # the loader's callback shape
                on_record(string_at(data, size))

            events.open_ring_buffer(callback)
            manager = self.bpf._ringbuf_manager
            poll = libbcc.lib.bpf_poll_ringbuf  # BPF.ring_buffer_poll without dropping the count
            consume = libbcc.lib.bpf_consume_ringbuf
            t0 = time.thread_time()
            self.started.set()
            n = 0
            while not self.stop.is_set():
                r = poll(manager, 100)
                if r < 0:
                    raise OSError(-r, "bpf_poll_ringbuf")
                n += r
            n += max(0, consume(manager))
        else:
            cls = self.reverted if self.reader == "mmap-6cd73a6" else MmapRingBuffer
            rb = cls(events.map_fd, self.pages * PAGE)
            t0 = time.thread_time()
            self.started.set()
            n = 0
            if self.reader == "mmap-batch":
                on_batch = self.work.per_batch()
                while not self.stop.is_set():
                    n += rb.poll_batch(on_batch, 100)
                n += rb.consume_batch(on_batch)
            else:
                on_record = self.work.per_record()
                while not self.stop.is_set():
                    n += rb.poll(on_record, 100)
                n += rb.consume(on_record)
            rb.close()
        self.cpu_s = time.thread_time() - t0
        self.delivered = n


def counters(bpf: object) -> tuple[int, int]:
    rows = [list(v) for _, v in sorted(bpf[b"counters"].items(), key=lambda kv: kv[0].value)]
    return sum(rows[0]), sum(rows[1])


def one_run(reader: str, work: Work, busy: bool, hog: bool, rate: float, seconds: float, pages: int,
            reverted: type | None) -> dict:
    from bcc import BPF

    hog_proc = None
    if hog:
        hog_proc = subprocess.Popen([sys.executable, "-c", "while True: pass"],
                                    preexec_fn=lambda: os.sched_setaffinity(0, {CONSUMER_CPU}))
    bpf = BPF(text=PROGRAM.encode(), cflags=[f"-DRING_PAGES={pages}", f"-DGETPPID_NR={GETPPID_NR}"])
    level = RingLevel(bpf[b"events"].map_fd)
    busy_thread = BusyExporter(CONSUMER_CPU) if busy else None
    consumer = Consumer(reader, bpf, pages, work, reverted)
    child = subprocess.Popen([sys.executable, "-c", PRODUCER, str(rate), str(seconds)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True,
                             preexec_fn=lambda: os.sched_setaffinity(0, {PRODUCER_CPU}))
    try:
        bpf[b"target"][ctypes.c_int(0)] = ctypes.c_uint32(child.pid)
        consumer.start()
        consumer.started.wait(10)
        if consumer.error:
            raise consumer.error
        if busy_thread:
            busy_thread.start()
            time.sleep(0.05)
        batches0 = busy_thread.batches if busy_thread else 0
        max_used = 0
        t0 = time.monotonic()
        child.stdin.write("go\n")
        child.stdin.flush()
        usage = None
        while usage is None:  # wait4, not Popen.poll: the producer's rusage is wanted
            pid, status, ru = os.wait4(child.pid, os.WNOHANG)
            if pid:
                usage, child.returncode = ru, os.waitstatus_to_exitcode(status)
            else:
                max_used = max(max_used, level.used())
                time.sleep(0.01)
        t_prod = time.monotonic() - t0
        calls = int(child.stdout.read().strip() or 0)
        # Drain: wait until the ring is empty (everything was delivered or dropped).
        deadline = time.monotonic() + 120
        while level.used() > 0 and time.monotonic() < deadline:
            max_used = max(max_used, level.used())
            time.sleep(0.002)
        t_drained = time.monotonic() - t0
        busy_batches = (busy_thread.batches - batches0) if busy_thread else 0
        consumer.stop.set()
        consumer.join(30)
        if consumer.error:
            raise consumer.error
    finally:
        if child.returncode is None:
            child.kill()
            child.wait()
        if hog_proc is not None:
            hog_proc.kill()
            hog_proc.wait()
        if busy_thread:
            busy_thread.stop.set()
            busy_thread.join(10)
        consumer.stop.set()
        level.close()
    produced, dropped = counters(bpf)
    bpf.cleanup()
    producer_cpu = usage.ru_utime + usage.ru_stime
    delivered = consumer.delivered
    return {
        "reader": reader,
        "work": work.kind,
        "busy_thread": busy,
        "hog_process": hog,
        "target_rate": rate,
        "producer_calls": calls,
        "produced": produced,
        "delivered": delivered,
        "drops": dropped,
        "accounted": delivered + dropped == produced,
        "produce_seconds": t_prod,
        "drain_seconds": t_drained,
        "produced_per_s": produced / t_prod,
        "delivered_per_s": delivered / t_drained,
        "consumer_cpu_s": consumer.cpu_s,
        "consumer_cpu_us_per_record": consumer.cpu_s / delivered * 1e6 if delivered else None,
        "consumer_cpu_util": consumer.cpu_s / t_drained,
        "max_ring_fill": max_used / (pages * PAGE),
        "producer_cpu_us_per_record": producer_cpu / produced * 1e6 if producer_cpu and produced else None,
        "busy_batches_per_s": busy_batches / t_drained if busy else None,
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=4.0, help="producer run time per run")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--pages", type=int, default=4096)
    parser.add_argument("--work-us", type=float, default=6.0, help="per-record cost of the decode work")
    parser.add_argument("--readers", default="bcc,mmap,mmap-batch")
    parser.add_argument("--with-reverted", action="store_true",
                        help=f"also run the reader of {REVERTED_COMMIT}")
    parser.add_argument("--scenarios", default="none:300000:0,none:700000:0,decode:60000:0,decode:200000:0,"
                        "none:300000:1,none:700000:1,decode:60000:1,decode:200000:1,"
                        "none:300000:0:1,decode:60000:0:1",
                        help="comma-separated work:rate:busy[:hog]")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench: must run as root", file=sys.stderr)
        return 1
    if len(os.sched_getaffinity(0)) < 2:
        print("bench: needs 2 CPUs", file=sys.stderr)
        return 1
    readers = args.readers.split(",")
    reverted = None
    if args.with_reverted:
        reverted = load_reverted()
        if reverted is None:
            print(f"bench: cannot load the reader of {REVERTED_COMMIT} from git", file=sys.stderr)
            return 1
        readers.append("mmap-6cd73a6")
    os.sched_setaffinity(0, {PRODUCER_CPU})  # the coordinating thread stays off the consumer's CPU
    works: dict[str, Work] = {}
    report: dict = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "args": vars(args),
        "machine": {"cpus": os.cpu_count(), "kernel": os.uname().release, "python": sys.version.split()[0]},
        "scenarios": [],
    }
    RESULTS.mkdir(exist_ok=True)
    for spec in args.scenarios.split(","):
        kind, rate_s, busy_s, *hog_s = spec.split(":")
        if kind not in works:
            os.sched_setaffinity(0, {CONSUMER_CPU})
            works[kind] = Work(kind, args.work_us)
            os.sched_setaffinity(0, {PRODUCER_CPU})
        work = works[kind]
        scenario = {"work": kind, "work_us": round(work.measured_us, 2) if kind == "decode" else 0.0,
                    "rate": float(rate_s), "busy_thread": busy_s == "1", "hog_process": hog_s == ["1"],
                    "runs": []}
        for rnd in range(args.rounds):
            order = readers if rnd % 2 == 0 else readers[::-1]
            for reader in order:
                r = one_run(reader, work, scenario["busy_thread"], scenario["hog_process"], scenario["rate"],
                            args.seconds, args.pages, reverted)
                r["round"] = rnd
                scenario["runs"].append(r)
                print(f"{kind:6s} {int(scenario['rate']):7d}/s busy={int(scenario['busy_thread'])} "
                      f"hog={int(scenario['hog_process'])} "
                      f"{reader:13s} delivered {r['delivered']:8d} drops {r['drops']:7d} "
                      f"{r['delivered_per_s']:9.0f}/s  {r['consumer_cpu_us_per_record'] or 0:6.3f} us/rec  "
                      f"fill {r['max_ring_fill'] * 100:5.1f}%"
                      + ("" if r["accounted"] else "  NOT ACCOUNTED"),
                      flush=True)
        scenario["summary"] = summarize(scenario["runs"], readers)
        report["scenarios"].append(scenario)
    out = RESULTS / f"ringbuf-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(report, indent=2))
    print_table(report, readers)
    print(f"\nwritten: {out}")
    return 0


def summarize(runs: list[dict], readers: list[str]) -> dict:
    out = {}
    for reader in readers:
        rs = [r for r in runs if r["reader"] == reader]

        def med(key: str, rs: list[dict] = rs) -> float | None:
            vals = [r[key] for r in rs if r.get(key) is not None]
            return statistics.median(vals) if vals else None

        out[reader] = {
            "produced_per_s": med("produced_per_s"),
            "delivered_per_s": med("delivered_per_s"),
            "consumer_cpu_us_per_record": med("consumer_cpu_us_per_record"),
            "consumer_cpu_util": med("consumer_cpu_util"),
            "drops_total": sum(r["drops"] for r in rs),
            "produced_total": sum(r["produced"] for r in rs),
            "max_ring_fill": max(r["max_ring_fill"] for r in rs),
            "producer_cpu_us_per_record": med("producer_cpu_us_per_record"),
            "busy_batches_per_s": med("busy_batches_per_s"),
            "all_accounted": all(r["accounted"] for r in rs),
        }
    return out


def print_table(report: dict, readers: list[str]) -> None:
    print("\nwork    work_us   rate/s  busy hog  reader         produced/s  delivered/s  cons us/rec  "
          "cons CPU  drops/produced      max fill  busy batch/s")
    for sc in report["scenarios"]:
        for reader in readers:
            s = sc["summary"][reader]
            bb = s["busy_batches_per_s"]
            busy = f"{bb:12.0f}" if bb is not None else f"{'-':>12s}"
            print(f"{sc['work']:7s} {sc['work_us']:7.2f} {int(sc['rate']):8d}  {int(sc['busy_thread']):4d} "
                  f"{int(sc['hog_process']):3d}  "
                  f"{reader:13s} {s['produced_per_s']:11.0f} {s['delivered_per_s']:12.0f} "
                  f"{s['consumer_cpu_us_per_record']:12.3f} {s['consumer_cpu_util'] * 100:8.0f}% "
                  f"{s['drops_total']:9d}/{s['produced_total']:<9d} {s['max_ring_fill'] * 100:6.1f}%  {busy}"
                  + ("" if s["all_accounted"] else "  NOT ACCOUNTED"))


if __name__ == "__main__":
    sys.exit(main())

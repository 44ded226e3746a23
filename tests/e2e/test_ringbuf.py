"""MmapRingBuffer against the real kernel: a small ring that wraps hundreds of times, concurrent producers on
every CPU with counted drops, discarded records, a consumer position that must never go backwards, wakeups,
limits, batches and a raising callback.

The producer is a raw sys_enter program that fires on getppid(2) of chosen processes and writes one record per
call: an 8-byte header {u32 seq; u16 cpu; u16 size} (seq counts per CPU), the sample filled with a fixed byte
pattern, and ``seq ^ TAIL_MAGIC`` in its last 8 bytes. Sizes run from 8 to 4096 bytes as a function of seq, so
the reader can check every record's length and contents. A per-CPU array counts records produced, output
failures (the ring was full) and discards.
"""

from __future__ import annotations

import ctypes
import os
import platform
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from otel_envoy.probes.ringbuf import SUPPORTED, MmapRingBuffer, ringbuf_map_size

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to load BPF programs"),
    pytest.mark.skipif(not SUPPORTED, reason=f"the mmap reader needs x86-64 ({platform.machine()})"),
]

bcc = pytest.importorskip("bcc", reason="bcc (python3-bpfcc) is not importable")

PAGE = os.sysconf("SC_PAGE_SIZE")
GETPPID_NR = 110  # x86-64
TAIL_MAGIC = 0x5A17C0DE5A17C0DE
RES_SMALL, RES_LARGE = 40, 3000  # bpf_ringbuf_reserve needs constant sizes
PATTERN = bytes((i * 131 + 7) & 0xFF for i in range(4096))
HDR = struct.Struct("<IHH")
TAIL = struct.Struct("<Q")

PROGRAM = r"""
#define MAX_REC 4096
struct scratch_t { u8 buf[MAX_REC]; };
struct rec_hdr { u32 seq; u16 cpu; u16 size; };

BPF_RINGBUF_OUTPUT(events, RING_PAGES);
BPF_PERCPU_ARRAY(scratch, struct scratch_t, 1);
BPF_PERCPU_ARRAY(counters, u64, 3);  /* 0: produced, 1: output failed (ring full), 2: discarded */
BPF_ARRAY(targets, u32, 4);           /* tgids whose getppid() produces a record; 0 = unused slot */

static __always_inline int is_target(u32 tgid)
{
    for (u32 i = 0; i < 4; i++) {
        u32 k = i;
        u32 *t = targets.lookup(&k);
        if (t && *t == tgid)
            return 1;
    }
    return 0;
}

RAW_TRACEPOINT_PROBE(sys_enter)
{
    if (ctx->args[1] != GETPPID_NR || !is_target(bpf_get_current_pid_tgid() >> 32))
        return 0;
    u32 z = 0, k1 = 1, k2 = 2;
    struct scratch_t *s = scratch.lookup(&z);
    u64 *produced = counters.lookup(&z);
    u64 *failed = counters.lookup(&k1);
    u64 *discarded = counters.lookup(&k2);
    if (!s || !produced || !failed || !discarded)
        return 0;
    u64 seq = *produced;
    *produced = seq + 1;
#ifdef USE_RESERVE
    u64 size = (seq & 1) ? RES_LARGE : RES_SMALL;
#else
    u32 x = (u32)seq * 1103515245u + 12345u;
    u64 size = 8 + (x >> 8) % 4089;          /* 8 .. 4096 */
#endif
    asm volatile("" : "+r"(size));             /* keep the bounds checks below for the verifier */
    size &= 0x1fff;
    if (size > MAX_REC) size = MAX_REC;
    if (size < 8) size = 8;
    struct rec_hdr *h = (void *)s->buf;
    h->seq = seq;
    h->cpu = bpf_get_smp_processor_id();
    h->size = size;
    u64 off = size - 8;
    asm volatile("" : "+r"(off));
    off &= 0xfff;
    if (off > MAX_REC - 8)
        return 0;
    u64 tail = seq ^ TAIL_MAGIC;
    if (size >= 16)
        __builtin_memcpy(s->buf + off, &tail, 8);
#ifdef USE_RESERVE
    if (seq & 1) {
        void *p = events.ringbuf_reserve(RES_LARGE);
        if (!p) { *failed += 1; goto restore; }
        bpf_probe_read_kernel(p, RES_LARGE, s->buf);
        if (seq % 3 == 1) { events.ringbuf_discard(p, 0); *discarded += 1; }
        else events.ringbuf_submit(p, 0);
    } else {
        void *p = events.ringbuf_reserve(RES_SMALL);
        if (!p) { *failed += 1; goto restore; }
        bpf_probe_read_kernel(p, RES_SMALL, s->buf);
        if (seq % 3 == 1) { events.ringbuf_discard(p, 0); *discarded += 1; }
        else events.ringbuf_submit(p, 0);
    }
#else
    if (events.ringbuf_output(s, size, 0) != 0)
        *failed += 1;
#endif
restore:
    if (size >= 16) {                          /* put the pattern back under the tail */
        for (int j = 0; j < 8; j++) {
            u64 o = (off + j) & 0xfff;
            s->buf[o] = (u8)(o * 131 + 7);
        }
    }
    return 0;
}
"""


def expected_size(seq: int, reserve: bool) -> int:
    if reserve:
        return RES_LARGE if seq & 1 else RES_SMALL
    x = (seq * 1103515245 + 12345) & 0xFFFFFFFF
    return 8 + (x >> 8) % 4089


@dataclass
class Producer:
    """The loaded program, its ring (read through mmap) and its counters."""

    bpf: object
    ring: MmapRingBuffer
    pages: int
    reserve: bool
    slots: int = 0

    def add_target(self, tgid: int) -> None:
        self.bpf[b"targets"][ctypes.c_int(self.slots)] = ctypes.c_uint32(tgid)
        self.slots += 1

    def counters(self) -> dict[int, tuple[int, int, int]]:
        """Per CPU: (produced, failed, discarded)."""
        table = self.bpf[b"counters"]
        rows = [list(v) for _, v in sorted(table.items(), key=lambda kv: kv[0].value)]
        return {cpu: (rows[0][cpu], rows[1][cpu], rows[2][cpu]) for cpu in range(len(rows[0]))}


@pytest.fixture
def make_producer() -> Iterator:
    made: list[Producer] = []

    def make(pages: int = 16, reserve: bool = False) -> Producer:
        cflags = [f"-DRING_PAGES={pages}", f"-DGETPPID_NR={GETPPID_NR}", f"-DTAIL_MAGIC={TAIL_MAGIC}ULL",
                  f"-DRES_SMALL={RES_SMALL}", f"-DRES_LARGE={RES_LARGE}"]
        if reserve:
            cflags.append("-DUSE_RESERVE")
        b = bcc.BPF(text=PROGRAM.encode(), cflags=cflags)
        # Each CPU's scratch buffer starts as the pattern; the program only ever writes header and tail.
        scratch = b[b"scratch"]
        one = scratch.sLeaf()
        ctypes.memmove(ctypes.addressof(one), PATTERN, len(PATTERN))
        scratch[ctypes.c_int(0)] = scratch.Leaf(*([one] * scratch.total_cpu))
        ring = MmapRingBuffer(b[b"events"].map_fd, pages * PAGE)
        p = Producer(b, ring, pages, reserve)
        made.append(p)
        return p

    yield make
    for p in made:
        p.ring.close()
        p.bpf.cleanup()


@dataclass
class Checker:
    """Checks every delivered record against what the program wrote; tracks order per CPU."""

    reserve: bool = False
    last_seq: dict[int, int] = field(default_factory=dict)
    delivered: dict[int, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    def __call__(self, rec: bytes) -> None:
        n = len(rec)
        if n < 8:
            self.errors.append(f"short record ({n} bytes)")
            return
        seq, cpu, size = HDR.unpack_from(rec)
        want = expected_size(seq, self.reserve)
        problems = []
        if n != want or size != want:
            problems.append(f"length {n} / header size {size}, want {want}")
        elif n >= 16:
            if TAIL.unpack_from(rec, n - 8)[0] != seq ^ TAIL_MAGIC:
                problems.append("tail")
            if rec[8 : n - 8] != PATTERN[8 : n - 8]:
                problems.append("body")
        elif rec[8:] != PATTERN[8:n]:
            problems.append("body")
        if self.reserve and seq % 3 == 1:
            problems.append("a discarded record was delivered")
        if seq <= self.last_seq.get(cpu, -1):
            problems.append(f"out of order or repeated after {self.last_seq[cpu]}")
        if problems and len(self.errors) < 20:
            self.errors.append(f"cpu {cpu} seq {seq}: " + ", ".join(problems))
        self.last_seq[cpu] = seq
        self.delivered[cpu] = self.delivered.get(cpu, 0) + 1


@pytest.fixture
def one_cpu() -> Iterator[int]:
    """Pin the calling thread (the producer in tests that call getppid themselves) to one CPU, so its
    records carry one per-CPU sequence."""
    saved = os.sched_getaffinity(0)
    cpu = min(saved)
    os.sched_setaffinity(0, {cpu})
    yield cpu
    os.sched_setaffinity(0, saved)


def getppid_burst(n: int) -> None:
    for _ in range(n):
        os.getppid()


def ring_record_len(size: int) -> int:
    return (size + 8 + 7) & ~7


def test_map_size_and_bad_sizes(make_producer):
    p = make_producer(pages=16)
    assert ringbuf_map_size(p.ring.map_fd) == 16 * PAGE
    with pytest.raises(ValueError, match="holds"):
        MmapRingBuffer(p.ring.map_fd, 32 * PAGE)
    with pytest.raises(ValueError, match="power of two"):
        MmapRingBuffer(p.ring.map_fd, 3 * PAGE)
    with pytest.raises(ValueError, match="not a ring buffer"):
        ringbuf_map_size(p.bpf[b"counters"].map_fd)


def test_small_ring_wraps_hundreds_of_times_without_loss(make_producer, one_cpu):
    """Bursts that fit in the ring, drained between bursts: nothing may be lost, and records that straddle
    the end of the data area (read through the second mapping) must arrive whole."""
    p = make_producer(pages=16)
    p.add_target(os.getpid())
    check = Checker()
    data_size = 16 * PAGE
    pos = p.ring._pos
    straddling = 0
    burst = (data_size - 64) // ring_record_len(4096)  # the largest records still fit
    for _ in range(1500):
        getppid_burst(burst)
        got: list[bytes] = []
        assert p.ring.consume(got.append) == len(got)
        for rec in got:
            check(rec)
            straddling += (pos & (data_size - 1)) + 8 + len(rec) > data_size
            pos += ring_record_len(len(rec))
        assert p.ring.available_bytes() == 0
    counts = p.counters()
    produced = sum(c[0] for c in counts.values())
    assert check.errors == []
    assert sum(c[1] for c in counts.values()) == 0, "a burst that fits must not fail"
    assert sum(check.delivered.values()) == produced >= 1500 * burst
    assert pos == p.ring._pos
    assert pos > 300 * data_size  # wrapped hundreds of times
    assert straddling >= 100


def test_concurrent_producers_every_record_once_in_order_or_counted(make_producer):
    """One producer process per CPU into a 64 KiB ring while a thread polls: whatever the kernel could not
    write it counted, everything else arrives exactly once, intact, in order per CPU."""
    p = make_producer(pages=16)
    cpus = sorted(os.sched_getaffinity(0))[:2]
    calls = 20_000
    # First half paced (8 calls, then 0.5 ms off-CPU: the consumer keeps up), second half flat out (the
    # 64 KiB ring overflows and the kernel counts what it could not write).
    code = (f"import os,sys,time\nsys.stdin.readline()\nfor i in range({calls}):\n os.getppid()\n"
            f" if i % 8 == 7 and i < {calls // 2}: time.sleep(0.0005)\n")
    children = []
    for cpu in cpus:
        child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                                 preexec_fn=lambda c=cpu: os.sched_setaffinity(0, {c}))
        children.append(child)
        p.add_target(child.pid)
    check = Checker()
    stop = threading.Event()

    def consumer() -> None:
        while not stop.is_set():
            p.ring.poll(check, 50)
        p.ring.consume(check)

    t = threading.Thread(target=consumer)
    t.start()
    try:
        for child in children:
            child.stdin.write(b"go\n")
            child.stdin.flush()
        for child in children:
            assert child.wait(120) == 0
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
        stop.set()
        t.join(30)
    assert not t.is_alive()
    counts = p.counters()
    assert check.errors == []
    produced = sum(c[0] for c in counts.values())
    failed = sum(c[1] for c in counts.values())
    assert produced == calls * len(cpus)
    for cpu, (prod, fail, _) in counts.items():
        assert check.delivered.get(cpu, 0) + fail == prod, (cpu, counts, check.delivered)
        if prod:
            assert check.last_seq[cpu] <= prod - 1
    assert sum(check.delivered.values()) + failed == produced
    assert p.ring.available_bytes() == 0


OBSERVER = r"""
import mmap, os, sys, time
fd, page, seconds = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
cons = memoryview(mmap.mmap(fd, page, access=mmap.ACCESS_READ, offset=0)).cast("Q")
print("ready", flush=True)
last, reads, backwards, lowest = cons[0], 0, 0, None
end = time.monotonic() + seconds
while time.monotonic() < end:
    for _ in range(1000):
        v = cons[0]
        if v < last:
            backwards += 1
            lowest = v if lowest is None else min(lowest, v)
        last = v
    reads += 1000
print(reads, backwards, lowest, flush=True)
"""


def test_consumer_position_never_goes_backwards(make_producer, one_cpu):
    """Another process watches consumer_pos while we consume: it must only ever grow. (The reverted reader
    of 6cd73a6 published it with struct.pack_into, which zeroes the target first: the kernel could read
    consumer_pos == 0 and fail reservations as "ring full" with the ring nearly empty.)"""
    p = make_producer(pages=16)
    p.add_target(os.getpid())
    other = [c for c in sorted(os.sched_getaffinity(0)) if c != one_cpu] or [one_cpu]
    watcher = subprocess.Popen([sys.executable, "-c", OBSERVER, str(p.ring.map_fd), str(PAGE), "1.5"],
                               stdout=subprocess.PIPE, text=True, pass_fds=[p.ring.map_fd],
                               preexec_fn=lambda: os.sched_setaffinity(0, {other[0]}))
    try:
        assert watcher.stdout.readline().strip() == "ready"
        check = Checker()
        end = time.monotonic() + 1.7
        while time.monotonic() < end:
            getppid_burst(4)
            p.ring.consume(check)
        reads, backwards, lowest = watcher.stdout.readline().split()
        assert watcher.wait(10) == 0
    finally:
        if watcher.poll() is None:
            watcher.kill()
            watcher.wait()
    assert check.errors == []
    assert int(reads) > 100_000
    assert int(backwards) == 0, f"consumer_pos went backwards {backwards} times (down to {lowest})"
    assert p.ring._pos > 16 * PAGE


def test_discarded_records_are_skipped_and_their_space_reused(make_producer, one_cpu):
    p = make_producer(pages=16, reserve=True)
    p.add_target(os.getpid())
    check = Checker(reserve=True)
    for _ in range(1000):
        getppid_burst(12)  # <= 6 x 3008 + 6 x 48 bytes: fits
        assert p.ring.consume(check) >= 0
        assert p.ring.available_bytes() == 0
    counts = p.counters()
    produced = sum(c[0] for c in counts.values())
    discarded = sum(c[2] for c in counts.values())
    assert check.errors == []
    assert sum(c[1] for c in counts.values()) == 0
    assert produced == 12_000 and discarded == sum(1 for s in range(produced) if s % 3 == 1)
    assert sum(check.delivered.values()) == produced - discarded
    assert p.ring._pos > 100 * 16 * PAGE


def test_batches_deliver_the_same_records(make_producer, one_cpu):
    p = make_producer(pages=64)
    p.add_target(os.getpid())
    check = Checker()
    sizes: list[int] = []

    def on_batch(batch: list[bytes]) -> None:
        sizes.append(len(batch))
        for rec in batch:
            check(rec)

    for _ in range(200):
        getppid_burst(30)
        assert p.ring.consume_batch(on_batch) == 30
    assert check.errors == [] and sum(check.delivered.values()) == 6000 == sum(sizes)


def test_limit_leaves_the_rest_in_the_ring(make_producer, one_cpu):
    p = make_producer(pages=16)
    p.add_target(os.getpid())
    getppid_burst(10)
    check = Checker()
    assert p.ring.consume(check, limit=3) == 3
    assert p.ring.available_bytes() > 0
    assert p.ring.consume(check, limit=1) == 1
    assert p.ring.consume(check) == 6
    assert check.errors == [] and check.last_seq[next(iter(check.last_seq))] == 9


def test_raising_callback_loses_nothing(make_producer, one_cpu):
    p = make_producer(pages=16)
    p.add_target(os.getpid())
    getppid_burst(10)
    seen: list[int] = []

    def on_record(rec: bytes) -> None:
        seen.append(HDR.unpack_from(rec)[0])
        if len(seen) == 4:
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        p.ring.consume(on_record)
    assert p.ring.available_bytes() == 0  # copied out, space handed back
    assert p.ring.consume(on_record) == 6
    assert seen == list(range(10))


def test_poll_sleeps_when_empty_and_wakes_on_a_record(make_producer, one_cpu):
    p = make_producer(pages=16)
    p.add_target(os.getpid())
    got: list[bytes] = []
    t0 = time.monotonic()
    assert p.ring.poll(got.append, 150) == 0
    assert 0.14 <= time.monotonic() - t0 < 2.0
    results: list[tuple[int, float]] = []
    for _ in range(20):
        ready = threading.Event()

        def waiter(ready: threading.Event = ready) -> None:
            ready.set()
            t = time.monotonic()
            n = p.ring.poll(got.append, 10_000)
            results.append((n, time.monotonic() - t))

        th = threading.Thread(target=waiter)
        th.start()
        ready.wait()
        time.sleep(0.02)  # let it block in poll(2)
        os.getppid()
        th.join(15)
        assert not th.is_alive()
    assert all(n == 1 for n, _ in results), results
    assert max(dt for _, dt in results) < 1.0  # woken, not timed out
    assert [HDR.unpack_from(r)[0] for r in got] == list(range(20))

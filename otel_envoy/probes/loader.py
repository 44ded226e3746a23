"""Compiles bpf/conn.bpf.c with bcc, attaches its tracepoints, and drains its ring buffer.

Configuration enters as compile-time constants (-D flags), never as pasted C. bcc is imported lazily so the
rest of the package (replay, show, unit tests) works without it. The program is split into units
(bpf/*.bpf.h) that conn.bpf.c includes; ``program_text`` splices them into one text for bcc.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import mmap
import platform
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from ..events.layout import BPF_DIR, load_layout
from . import ringbuf
from .btf import BtfError, KernelTypes
from .errors import ProbeError
from .sampling_tables import SamplingTables
from .uprobe_symbols import UprobeSite

__all__ = ["ConnectionProbes", "ProbeConfig", "ProbeError", "program_text"]

# What of one process the kernel's tables hold, by how its key names it: (table, "prefix": a u64 key
# tgid << 32 | fd; "value": the u32 key itself; else the key's field of that name). Tables a build lacks
# are skipped.
_STATE_BY_TGID = (("conns", "prefix"), ("bound_fds", "prefix"), ("conn_sampled_listeners", "prefix"),
                  ("held_handshakes", "prefix"), ("ssl_fds", "tgid"))
_STATE_BY_TID = (("threads", "value"), ("setup_inflight", "value"), ("ssl_calls", "value"))
_SERIES_BY_TGID = (("accepts_by_thread", "pid"), ("http_metrics", "pid"), ("conn_metrics", "pid"),
                   ("accept_metrics", "pid"), ("tls_metrics", "pid"))
_SERIES_BY_TID = (("offcpu_totals", "tid"), ("idle_wakes", "tid"))

log = logging.getLogger("otel_envoy.probes")

CONN_PROGRAM = "conn.bpf.c"
# An #include of one of the program's own units (bpf/*.bpf.h): spliced by program_text, never left to clang.
UNIT_INCLUDE = re.compile(r'^#include "([A-Za-z0-9_]+\.bpf\.h)"[ \t]*$', re.MULTILINE)


#: target_bits' size (TARGET_BITS in bpf/state.bpf.h)
TARGET_BITS = 4096
BPF_NOEXIST = 1  # bpf(2)'s map update flag: only if the key is not there yet


class TlsSeries(NamedTuple):
    """One series of the kernel's TLS handshake metrics."""

    pid: int
    listen_fd: int
    version: int  # the ServerHello's: 0x0304, 0x0303, ...; 0: not seen (closed before it)
    resumed: bool
    outcome: str  # "done" or "closed" (enum tls_outcome)


class RequestSeries(NamedTuple):
    """One series of the kernel's request metrics."""

    pid: int
    listen_fd: int
    method: str  # http.request.method ("_OTHER" for other tokens)
    status: int  # 0: the connection closed before an answer (or its status line was not readable)


class RequestTotals(NamedTuple):
    """A series' totals: requests (or connections), the sum of their durations, and log2 slots of
    microseconds."""

    count: int
    sum_ns: int
    slots: dict[int, int]

    @classmethod
    def of(cls, metric: Any) -> RequestTotals:
        """The totals of a kernel ``struct http_metric`` (a table's value)."""
        slots = {i: int(n) for i, n in enumerate(metric.slots) if n}
        return cls(int(metric.count), int(metric.sum_ns), slots)


@dataclass(frozen=True, slots=True)
class ProbeConfig:
    """Compile-time knobs of the kernel side."""

    max_conns: int = 65536
    ringbuf_pages: int = 4096  # 16 MiB with 4 KiB pages
    http_capture: bool = True  # every read/write of plaintext connections carries bytes (request spans)
    offcpu: bool = True  # sched_switch / sched_waking probes: off-CPU waits of the targets' threads
    offcpu_min_ns: int = 1_000_000  # waits at least this long are sent (shorter ones only aggregated)
    round_min_ns: int = 10_000_000  # event-loop rounds at least this long are sent (or holding such a wait)
    sampling: bool = False  # plaintext HTTP/1.x requests sampled in the kernel (set_sample_threshold)
    program_dir: Path = BPF_DIR  # conn.bpf.c, its units and events.h (benchmarks compare another revision's)
    uprobes: tuple[UprobeSite, ...] = ()  # SSL_read/SSL_write/... (probes/uprobe_symbols.py): TLS plaintext

    def cflags(self) -> list[str]:
        """The -D/-I flags handed to bcc's clang."""
        return [
            f"-I{self.program_dir}",
            f"-DMAX_CONNS={int(self.max_conns)}",
            f"-DRINGBUF_PAGES={int(self.ringbuf_pages)}",
            f"-DHTTP_CAPTURE={int(self.http_capture)}",
            f"-DOFFCPU={int(self.offcpu)}",
            f"-DOFFCPU_MIN_NS={int(self.offcpu_min_ns)}ULL",
            f"-DROUND_MIN_NS={int(self.round_min_ns)}ULL",
            f"-DSAMPLING={int(self.sampling)}",
            f"-DUPROBES={int(bool(self.uprobes))}",
            "-Wno-macro-redefined",
            "-Wno-unused-function",
        ]


def program_text(program_dir: Path, main: str = CONN_PROGRAM) -> str:
    """``main`` with every ``#include "x.bpf.h"`` line replaced by that unit of ``program_dir``, once each.

    bcc rewrites only its main file (map method calls, tracepoint arguments, program sections): a unit left
    to clang's own #include would compile without those rewrites. Each unit is spliced between #line markers,
    so compiler messages and line info still name the unit and its line. events.h, plain C shared with user
    space, stays a real #include (found through -I).
    """
    spliced: set[str] = set()

    def splice(path: Path) -> str:
        text = path.read_text()
        out: list[str] = []
        pos = 0
        for m in UNIT_INCLUDE.finditer(text):
            out.append(text[pos:m.start()])
            pos = m.end()
            name = m.group(1)
            if name in spliced:
                continue
            spliced.add(name)
            resume = text.count("\n", 0, m.end()) + 2  # the line after the #include
            unit = splice(program_dir / name)
            out.append(f'#line 1 "{program_dir / name}"\n{unit}')
            if not unit.endswith("\n"):
                out.append("\n")
            out.append(f'#line {resume} "{path}"')
        out.append(text[pos:])
        return "".join(out)

    top = program_dir / main
    return f'#line 1 "{top}"\n' + splice(top)


#: what sockets.bpf.h reads of a struct sock or a struct request_sock (its raw tracepoints:
#: inet_sock_set_state and the tcp ones): -D name -> member of the struct sock_common both start with
SOCK_COMMON_FIELDS = {"SKC_DADDR_OFF": "skc_daddr", "SKC_RCV_SADDR_OFF": "skc_rcv_saddr",
                      "SKC_DPORT_OFF": "skc_dport", "SKC_NUM_OFF": "skc_num", "SKC_FAMILY_OFF": "skc_family",
                      "SKC_STATE_OFF": "skc_state",
                      "SKC_V6_DADDR_OFF": "skc_v6_daddr", "SKC_V6_RCV_SADDR_OFF": "skc_v6_rcv_saddr"}
_FIELD_SIZES = {"SKC_DADDR_OFF": 4, "SKC_RCV_SADDR_OFF": 4, "SKC_DPORT_OFF": 2, "SKC_NUM_OFF": 2,
                "SKC_FAMILY_OFF": 2, "SKC_STATE_OFF": 1, "SKC_V6_DADDR_OFF": 16, "SKC_V6_RCV_SADDR_OFF": 16}


def sock_field_cflags(types: KernelTypes) -> list[str]:
    """The -D flags giving sockets.bpf.h the running kernel's offsets of the struct sock fields it reads
    (struct sock_common is struct sock's first member): one read of SKC_READ bytes covers the sock_common
    ones. The IPv6 addresses are -1 on a kernel without IPv6."""
    offsets: dict[str, int] = {}
    for define, member in SOCK_COMMON_FIELDS.items():
        off = types.member_offset("sock_common", member)
        if off is None:
            if "V6" in define:
                offsets[define] = -1
                continue
            raise BtfError(f"struct sock_common has no {member} in this kernel's BTF")
        offsets[define] = off
    sk_common = types.member_offset("sock", "__sk_common")
    protocol = types.member_offset("sock", "sk_protocol")
    if sk_common != 0 or protocol is None:
        raise BtfError("struct sock is not laid out as expected (__sk_common first, sk_protocol a u16)")
    if types.member_offset("request_sock", "__req_common") != 0:
        raise BtfError("struct request_sock is not laid out as expected (__req_common first)")
    read = max(off + _FIELD_SIZES[d] for d, off in offsets.items() if off >= 0)
    return [*(f"-D{d}={off}" for d, off in offsets.items()), f"-DSKC_READ={(read + 7) // 8 * 8}",
            f"-DSK_PROTOCOL_OFF={protocol}"]


def task_field_cflags(types: KernelTypes) -> list[str]:
    """The -D flags giving sched.bpf.h (its sched_switch / sched_waking raw tracepoints) the running
    kernel's offsets of struct task_struct's pid (the thread id) and comm."""
    pid, comm = types.member_offset("task_struct", "pid"), types.member_offset("task_struct", "comm")
    if pid is None or comm is None:
        raise BtfError("struct task_struct has no pid or comm in this kernel's BTF")
    return [f"-DTASK_PID_OFF={pid}", f"-DTASK_COMM_OFF={comm}"]


class ConnectionProbes(SamplingTables):
    """The loaded connection program: target and port filters, ring buffer, drop counters."""

    def __init__(self, config: ProbeConfig | None = None) -> None:
        self.config = config or ProbeConfig()
        if platform.machine() != "x86_64":
            raise ProbeError(f"{platform.machine()} is not supported yet: the raw syscall probes use x86-64 "
                             "syscall numbers and registers")
        try:
            from bcc import BPF  # Debian's python3-bpfcc
        except ImportError as exc:  # pragma: no cover - environment dependent
            raise ProbeError(f"bcc is not importable ({exc}); install python3-bpfcc") from exc
        try:
            types = KernelTypes.running_kernel()
            field_offsets = sock_field_cflags(types) + task_field_cflags(types)
        except BtfError as exc:
            raise ProbeError(str(exc)) from exc
        try:
            text = program_text(self.config.program_dir)
            self.bpf = BPF(text=text.encode(), cflags=self.config.cflags() + field_offsets)
            if self.config.sampling:
                self._attach_sampling()
            self._attach_uprobes()
        except Exception as exc:
            lines = str(exc).splitlines() or [type(exc).__name__]  # bcc raises some with no message
            raise ProbeError(f"could not load {CONN_PROGRAM}: {lines[-1]}") from exc
        layout = load_layout()
        self._constants = layout.constants
        self.drop_names = {v: k for k, v in layout.enums["drop_reason"].items() if k != "DROP_REASONS"}
        #: enum http_method -> http.request.method (HTTP_METHOD_OTHER -> "_OTHER", as the conventions say)
        self.method_names = {v: ("_OTHER" if k == "HTTP_METHOD_OTHER" else k.removeprefix("HTTP_METHOD_"))
                             for k, v in layout.enums["http_method"].items() if k != "HTTP_METHOD_NONE"}
        #: enum close_reason -> the close reason of the connection metrics
        self.close_reasons = {v: k.removeprefix("CLOSE_").lower()
                              for k, v in layout.enums["close_reason"].items()}
        #: enum tls_outcome -> the outcome of the TLS handshake metrics ("done", "closed")
        self.tls_outcomes = {v: k.removeprefix("TLS_HANDSHAKE_").lower()
                             for k, v in layout.enums["tls_outcome"].items()}
        self._targets = self.bpf[b"targets"]
        self._ports = self.bpf[b"listen_ports"]
        self._drops = self.bpf[b"drops"]
        self._mmap_ring: ringbuf.MmapRingBuffer | None = None
        self._on_record: Callable[[bytes], None] | None = None

    def add_targets(self, tgids: Iterable[int]) -> None:
        """Trace these processes (all their threads)."""
        bits = self.bpf[b"target_bits"]
        for tgid in tgids:
            self._targets[ctypes.c_uint32(tgid)] = ctypes.c_uint8(1)
            bits[ctypes.c_int(tgid % TARGET_BITS)] = ctypes.c_uint8(1)

    def follow_comm(self, comm: str) -> None:
        """A process that execs into ``comm`` (the kernel keeps 15 bytes) becomes a target in the kernel, from
        its first instruction: its startup is traced whole (EV_EXEC tells user space)."""
        value = self.bpf[b"followed_comm"].Leaf()
        raw = comm.encode()[:15]
        ctypes.memmove(ctypes.addressof(value), raw, len(raw))
        self.bpf[b"followed_comm"][ctypes.c_int(0)] = value

    def remove_target(self, tgid: int, tids: Iterable[int] = ()) -> None:
        """Stop tracing ``tgid`` (the kernel drops an exited target itself) and forget its state: its
        connections, bound sockets and sampled listeners, and its threads' (``tids``) state. Its metric
        series stay until :meth:`remove_series` (their last values still to be exported)."""
        with contextlib.suppress(KeyError):
            del self._targets[ctypes.c_uint32(tgid)]
        self._delete(_STATE_BY_TGID, _STATE_BY_TID, tgid, set(tids))

    def adopt_connection(self, tgid: int, fd: int, listen_fd: int, ts_ns: int) -> bool:
        """Track downstream connection ``fd`` of ``tgid``, open before the daemon (envoy/adoption.py), from
        now on, flagged CONN_ADOPTED. False when the kernel already tracks that fd (an accept since the
        programs were attached: that entry is newer) or the table is full."""
        table = self.bpf[b"conns"]
        leaf = table.Leaf()  # zeroed
        leaf.open_ts_ns = ts_ns
        leaf.capture_budget = self._constants["CAPTURE_MSGS_DEFAULT"]
        leaf.role = self._constants["ROLE_DOWNSTREAM"]
        leaf.listen_fd = listen_fd
        leaf.flags = self._constants["CONN_ADOPTED"]
        key = table.Key((tgid << 32) | (fd & 0xFFFFFFFF))
        from bcc.libbcc import lib  # Debian's python3-bpfcc (imported when the programs were loaded)

        return lib.bpf_update_elem(table.map_fd, ctypes.byref(key), ctypes.byref(leaf), BPF_NOEXIST) == 0

    def forget_connection(self, tgid: int, fd: int) -> None:
        """Stop tracking ``fd`` of ``tgid`` (an adopted connection that closed before it was handed over)."""
        table = self.bpf[b"conns"]
        with contextlib.suppress(KeyError):
            del table[table.Key((tgid << 32) | (fd & 0xFFFFFFFF))]

    def remove_series(self, tgid: int, tids: Iterable[int] = ()) -> None:
        """Forget the metric series of process ``tgid`` and its threads (``tids``): once it has exited and
        their last values were exported."""
        self._delete(_SERIES_BY_TGID, _SERIES_BY_TID, tgid, set(tids))

    def entries_of(self, tgid: int, tids: Iterable[int] = ()) -> dict[str, int]:
        """What the kernel's tables still hold of process ``tgid`` and its threads: entries by table."""
        tids = set(tids)
        out: dict[str, int] = {}
        for name, (keys, _table) in self._entries(
                _STATE_BY_TGID + _SERIES_BY_TGID, _STATE_BY_TID + _SERIES_BY_TID, tgid, tids).items():
            if keys:
                out[name] = len(keys)
        return out

    def _entries(self, by_tgid: tuple[tuple[str, str], ...], by_tid: tuple[tuple[str, str], ...], tgid: int,
                 tids: set[int]) -> dict[str, tuple[list[object], object]]:
        """Per table: the keys that belong to the process (a ``tgid << 32`` prefix, or a named field) or
        to one of its threads; tables not in this build are left out."""
        out: dict[str, tuple[list[object], object]] = {}
        for names, match in ((by_tgid, lambda v: v == tgid), (by_tid, lambda v: v in tids)):
            for name, field in names:
                try:
                    table = self.bpf[name.encode()]
                except KeyError:
                    continue
                if field == "prefix":
                    keys = [k for k in table if match(k.value >> 32)]
                elif field == "value":
                    keys = [k for k in table if match(k.value)]
                else:
                    keys = [k for k in table if match(getattr(k, field))]
                out[name] = (keys, table)
        return out

    def _delete(self, by_tgid: tuple[tuple[str, str], ...], by_tid: tuple[tuple[str, str], ...], tgid: int,
                tids: set[int]) -> None:
        for keys, table in self._entries(by_tgid, by_tid, tgid, tids).values():
            for key in keys:
                with contextlib.suppress(KeyError):  # gone since (a close, an LRU eviction)
                    del table[key]  # type: ignore[attr-defined]

    def stop_producing(self) -> None:
        """No more records (the end of a run: after the last drain, what the kernel submitted is what was
        read): the kernel's ``producing_stopped`` flag, which every record's submission checks (programs
        holding state of their own, such as a connection's close, would still emit without it), and every
        target and listening port forgotten, so the programs return early."""
        with contextlib.suppress(KeyError):  # an older bpf/ a benchmark compares has no such flag
            self.bpf[b"producing_stopped"][ctypes.c_int(0)] = ctypes.c_uint32(1)
        for table in (self._targets, self._ports, self.bpf[b"target_bits"], self.bpf[b"followed_comm"]):
            table.clear()

    def set_listen_ports(self, ports: Iterable[int]) -> None:
        """Replace the set of listening ports whose TCP events are traced."""
        wanted = {int(p) for p in ports}
        current = {int(k.value) for k in self._ports}
        for port in current - wanted:
            del self._ports[ctypes.c_uint16(port)]
        for port in wanted - current:
            self._ports[ctypes.c_uint16(port)] = ctypes.c_uint8(1)

    def open_ring_buffer(self, on_record: Callable[[bytes], None]) -> None:
        """Deliver every raw record to ``on_record`` (called from ``poll``, on the polling thread).

        The ring is read through mmap in batches (probes.ringbuf) where that is safe (x86-64); elsewhere
        through bcc's per-record ctypes callback, which costs ~3x more CPU per record.
        """
        self._on_record = on_record
        if ringbuf.SUPPORTED:
            events = self.bpf[b"events"]
            self._mmap_ring = ringbuf.MmapRingBuffer(events.map_fd, self.config.ringbuf_pages * mmap.PAGESIZE)
            return
        string_at = ctypes.string_at

        def _callback(_ctx: object, data: int, size: int) -> int:
            on_record(string_at(data, size))
            return 0

        self.bpf[b"events"].open_ring_buffer(_callback)

    def poll(self, timeout_ms: int = 100) -> int:
        """Drain the ring buffer, waiting up to ``timeout_ms`` for the first record; returns how many records
        were delivered (-1: not known, bcc's reader)."""
        if self._mmap_ring is not None:
            return self._mmap_ring.poll(self._on_record, timeout_ms)  # type: ignore[arg-type]
        self.bpf.ring_buffer_poll(timeout_ms)
        return -1

    def consume(self) -> None:
        """Drain whatever is in the ring buffer without waiting."""
        if self._mmap_ring is not None:
            self._mmap_ring.consume(self._on_record)  # type: ignore[arg-type]
        else:
            self.bpf.ring_buffer_consume()

    def _attach_sampling(self) -> None:
        """front_sys_exit on raw_syscalls:sys_exit, with io_sys_exit, accept_sys_exit, connect_sys_exit and
        setup_sys_exit in its tail-call slots: the front decides (sampling, request metrics) and hands
        io_sys_exit only the transfers to report, the others the exits of accept/accept4, connect, and a
        listener's bind and dup."""
        from bcc import BPF
        from bcc.libbcc import lib

        slots = self.bpf[b"exit_progs"]
        # EXIT_IO, EXIT_ACCEPT, EXIT_CONNECT, EXIT_SETUP, EXIT_TLS_HELLO, EXIT_TLS_STEP, EXIT_QUIET,
        # EXIT_EPOLL_CTL, EXIT_HOLD, EXIT_HS_SUMMARY, EXIT_QUIET_WRITE
        for slot, name in enumerate((b"io_sys_exit", b"accept_sys_exit", b"connect_sys_exit",
                                     b"setup_sys_exit", b"tls_hello_sys_exit", b"tls_step_sys_exit",
                                     b"quiet_sys_exit", b"epoll_ctl_sys_exit", b"hold_hello_sys_exit",
                                     b"hs_summary_sys_exit", b"quiet_write_sys_exit")):
            if lib.bpf_function_start(self.bpf.module, name) is None:  # an older bpf/ a benchmark compares
                continue
            program = self.bpf.load_func(name, BPF.RAW_TRACEPOINT)
            slots[ctypes.c_int(slot)] = ctypes.c_int(program.fd)
        self.bpf.attach_raw_tracepoint(tp=b"sys_exit", fn_name=b"front_sys_exit")

    def _attach_uprobes(self) -> None:
        """The uprobe tier (uprobes.bpf.h): a uprobe, and a uretprobe where it has one, at each site. bcc
        takes the site's ELF virtual address and finds its file offset via the PT_LOAD headers."""
        for site in self.config.uprobes:
            binary = site.binary.encode()
            self.bpf.attach_uprobe(name=binary, addr=site.vaddr, fn_name=site.entry.encode())
            if site.ret is not None:
                self.bpf.attach_uretprobe(name=binary, addr=site.vaddr, fn_name=site.ret.encode())
            log.info("uprobe tier: %s at %#x of %s", site.function, site.vaddr, site.binary)

    def http_request_metrics(self) -> dict[RequestSeries, RequestTotals]:
        """The kernel's exact request metrics (plaintext HTTP/1.x downstream requests, whatever was
        sampled; empty without ``sampling``): one entry per process, listening fd, method and status
        code (0: closed before an answer)."""
        if not self.config.sampling:
            return {}
        out: dict[RequestSeries, RequestTotals] = {}
        for k, v in self.bpf[b"http_metrics"].items():
            method = self.method_names.get(int(k.method), "_OTHER")
            series = RequestSeries(int(k.pid), int(k.listen_fd), method, int(k.status))
            out[series] = RequestTotals.of(v)
        return out

    def connection_metrics(self) -> dict[tuple[int, int, str], RequestTotals]:
        """The kernel's exact connection metrics: every downstream connection closed, traced or not, by
        (process, listening fd, close reason: ``envoy_closed``, ``peer_closed`` or ``reset``, enum
        close_reason): count,
        sum of durations, log2 slots (empty without ``sampling``)."""
        if not self.config.sampling:
            return {}
        out: dict[tuple[int, int, str], RequestTotals] = {}
        for k, v in self.bpf[b"conn_metrics"].items():
            reason = self.close_reasons.get(int(k.close_reason), str(int(k.close_reason)))
            out[(int(k.pid), int(k.listen_fd), reason)] = RequestTotals.of(v)
        return out

    def tls_handshake_metrics(self) -> dict[TlsSeries, RequestTotals]:
        """The kernel's exact TLS handshake metrics (tls_metrics.bpf.h): every downstream TLS handshake,
        traced or not, by process, listening fd, version, resumption and outcome (empty without
        ``sampling``)."""
        if not self.config.sampling:
            return {}
        out: dict[TlsSeries, RequestTotals] = {}
        for k, v in self.bpf[b"tls_metrics"].items():
            outcome = self.tls_outcomes.get(int(k.outcome), str(int(k.outcome)))
            series = TlsSeries(int(k.pid), int(k.listen_fd), int(k.version), bool(k.resumed), outcome)
            out[series] = RequestTotals.of(v)
        return out

    def accept_queue_metrics(self) -> dict[tuple[int, int], RequestTotals]:
        """The kernel's accept-queue waits: every accepted downstream connection whose handshake completion
        was seen, by (process, listening fd), from its ESTABLISHED transition to Envoy's accept: count, sum,
        log2 slots (empty without ``sampling``)."""
        if not self.config.sampling:
            return {}
        out: dict[tuple[int, int], RequestTotals] = {}
        for k, v in self.bpf[b"accept_metrics"].items():
            out[(int(k.pid), int(k.listen_fd))] = RequestTotals.of(v)
        return out

    def accepts_by_thread(self) -> dict[tuple[int, int, int], int]:
        """Every downstream connection accepted since the probes were loaded, traced or not, by (process,
        accepting thread, listening fd) (empty without ``sampling``)."""
        if not self.config.sampling:
            return {}
        return {(int(k.pid), int(k.thread_id), int(k.listen_fd)): int(v.value)
                for k, v in self.bpf[b"accepts_by_thread"].items()}

    def accept_waits_not_seen(self) -> int:
        """Accepts whose handshake completion the kernel did not see (so not in ``accept_queue_metrics``):
        the connection was established before the probes were attached, or the tracepoint was skipped."""
        if not self.config.sampling:
            return 0
        return int(sum(self.bpf[b"accept_wait_unseen"][ctypes.c_int(0)]))

    def records_submitted(self) -> int:
        """Records the programs put in the ring buffer, summed over CPUs."""
        return int(sum(self.bpf[b"records_submitted"][0]))

    def drop_counts(self) -> dict[str, int]:
        """Kernel-side drops by reason, summed over CPUs, and the runs of each program the kernel skipped
        (``recursion_missed.<program>``, :meth:`recursion_misses`)."""
        out: dict[str, int] = {}
        for key, per_cpu in self._drops.items():
            name = self.drop_names.get(key.value, str(key.value)).removeprefix("DROP_").lower()
            out[name] = int(sum(per_cpu))
        for program, missed in self.recursion_misses().items():
            out[f"recursion_missed.{program}"] = missed
        return out

    def recursion_misses(self) -> dict[str, int]:
        """Per loaded program, the runs the kernel skipped because a BPF program was already running on that
        CPU (``recursion_misses`` in the program's fdinfo): classic tracepoint programs share one per-CPU
        guard, so one firing in softirq while a syscall's program runs is not run at all. Nothing else would
        say that its event is missing."""
        out: dict[str, int] = {}
        for name, function in self.bpf.funcs.items():
            try:
                with open(f"/proc/self/fdinfo/{function.fd}") as f:
                    for line in f:
                        if line.startswith("recursion_misses:"):
                            out[name.decode()] = int(line.split()[1])
                            break
            except (OSError, ValueError):
                continue
        return out

    def stack_addresses(self, stack_id: int) -> list[int]:
        """Instruction addresses of a stack the kernel recorded (innermost first; [] when gone)."""
        if stack_id < 0:
            return []
        try:
            return [int(a) for a in self.bpf[b"stacks"].walk(stack_id)]
        except (KeyError, OSError):
            return []

    def stack_ids(self) -> list[int]:
        """The ids the kernel's stack table holds now."""
        return [int(k.value) for k in self.bpf[b"stacks"]]

    def delete_stack(self, stack_id: int) -> None:
        """Remove one stack from the kernel's table (gone already: nothing to do)."""
        with contextlib.suppress(KeyError, OSError):
            del self.bpf[b"stacks"][ctypes.c_int(stack_id)]

    def offcpu_totals(self) -> dict[tuple[int, int], tuple[int, int, int]]:
        """Off-CPU time aggregated in the kernel: (tid, reason) -> (ns, runnable ns, waits)."""
        return {(int(k.tid), int(k.reason)): (int(v.ns), int(v.runnable_ns), int(v.count))
                for k, v in self.bpf[b"offcpu_totals"].items()}

    def round_histograms(self) -> dict[int, dict[int, int]]:
        """Event-loop round durations: tid -> {log2(microseconds) slot: rounds}."""
        out: dict[int, dict[int, int]] = {}
        for k, v in self.bpf[b"threads"].items():
            slots = {i: int(n) for i, n in enumerate(v.round_hist) if n}
            if slots:
                out[int(k.value)] = slots
        return out

    def idle_wakes(self) -> dict[tuple[int, int, int], tuple[int, int, str]]:
        """Idle waits of at least the off-CPU threshold by waker, aggregated in the kernel:
        (tid, waker tgid, waker kernel stack id) -> (ns asleep, wakes, waker comm)."""
        return {(int(k.tid), int(k.waker_tgid), int(k.waker_kstack_id)):
                (int(v.ns), int(v.count), bytes(v.waker_comm).split(b"\0", 1)[0].decode(errors="replace"))
                for k, v in self.bpf[b"idle_wakes"].items()}

    def close(self) -> None:
        """Detach and free everything."""
        if self._mmap_ring is not None:
            self._mmap_ring.close()
            self._mmap_ring = None
        self.bpf.cleanup()

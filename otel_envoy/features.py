"""What this host can trace: the checks behind `otel-envoy doctor` and the daemon's start-up gate."""

from __future__ import annotations

import gzip
import os
import platform
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Check", "FeatureError", "binary_checks", "host_checks", "require_tracing"]

TRACEFS_CANDIDATES = (Path("/sys/kernel/tracing"), Path("/sys/kernel/debug/tracing"))
REQUIRED_TRACEPOINTS = (
    "syscalls/sys_enter_accept4",
    "syscalls/sys_exit_accept4",
    "syscalls/sys_enter_readv",
    "syscalls/sys_enter_close",
    "syscalls/sys_enter_epoll_ctl",
    "syscalls/sys_enter_epoll_wait",
    "raw_syscalls/sys_exit",
    "sock/inet_sock_set_state",
    "tcp/tcp_retransmit_skb",
    "tcp/tcp_send_reset",
    "tcp/tcp_receive_reset",
    "tcp/tcp_retransmit_synack",
    "syscalls/sys_enter_bind",
    "syscalls/sys_enter_dup",
    "sched/sched_process_exec",
    "sched/sched_process_exit",
)


def has_kernel_btf() -> bool:
    """Does the kernel describe its types (BTF)? The off-CPU probes need it (bpf_get_current_task_btf)."""
    return Path("/sys/kernel/btf/vmlinux").exists()


class FeatureError(RuntimeError):
    """Tracing is impossible on this host (message is one line)."""


@dataclass(frozen=True, slots=True)
class Check:
    """One line of the doctor report."""

    name: str
    ok: bool
    detail: str
    required: bool = True


def tracefs() -> Path | None:
    """The mounted tracefs directory, if any."""
    for path in TRACEFS_CANDIDATES:
        if (path / "events").is_dir():
            return path
    return None


def _kernel_config() -> dict[str, str]:
    try:
        with gzip.open("/proc/config.gz", "rt") as f:
            lines = f.read().splitlines()
    except OSError:
        try:
            lines = Path(f"/boot/config-{platform.release()}").read_text().splitlines()
        except OSError:
            return {}
    out = {}
    for line in lines:
        if line.startswith("CONFIG_") and "=" in line:
            key, _, value = line.partition("=")
            out[key] = value
    return out


def host_checks() -> list[Check]:
    """Everything the kernel tier needs, plus what the optional tiers would need."""
    checks = [Check("root", os.geteuid() == 0, "running as root" if os.geteuid() == 0 else
                    "not root: loading BPF needs root (CAP_BPF, CAP_PERFMON, CAP_SYS_ADMIN)")]
    tfs = tracefs()
    checks.append(Check("tracefs", tfs is not None, f"mounted at {tfs}" if tfs else
                        "not mounted: mount -t tracefs nodev /sys/kernel/tracing"))
    if tfs is not None:
        missing = [tp for tp in REQUIRED_TRACEPOINTS if not (tfs / "events" / tp).is_dir()]
        checks.append(Check("tracepoints", not missing, "all required tracepoints exist" if not missing
                            else "missing: " + ", ".join(missing)))
    btf = has_kernel_btf()
    checks.append(Check("btf", btf, "/sys/kernel/btf/vmlinux present" if btf else
                        "no kernel BTF: off-CPU waits and rounds are off (the scheduler probe reads the "
                        "syscall a thread blocks in through BTF)", required=False))
    build = Path(f"/lib/modules/{platform.release()}/build")
    checks.append(Check("kernel-headers", (build / "include").is_dir(),
                        f"{build} -> {os.path.realpath(build)}" if build.exists() else
                        f"{build} missing: bcc needs kernel headers (scripts/setup.sh links Debian's)"))
    try:
        import bcc  # noqa: F401

        checks.append(Check("bcc", True, "python3-bpfcc importable"))
    except ImportError as exc:
        checks.append(Check("bcc", False, f"bcc not importable ({exc}): apt-get install python3-bpfcc"))
    config = _kernel_config()
    kprobes = config.get("CONFIG_KPROBES") == "y" or (tfs is not None and (tfs / "kprobe_events").exists())
    checks.append(Check("kprobes", kprobes, "available" if kprobes else
                        "not available (CONFIG_KPROBES unset): not needed, tracepoints are used",
                        required=False))
    uprobes = config.get("CONFIG_UPROBE_EVENTS") == "y" or (tfs is not None and
                                                            (tfs / "uprobe_events").exists())
    checks.append(Check("uprobes", uprobes, "available (symbol tier possible)" if uprobes else
                        "not available: symbol tier impossible", required=False))
    ringbuf = tuple(int(x) for x in platform.release().split(".")[:2] if x.isdigit()) >= (5, 8)
    checks.append(Check("ringbuf", ringbuf, "BPF ring buffer (kernel >= 5.8)" if ringbuf else
                        "kernel older than 5.8: no BPF ring buffer"))
    return checks


def binary_checks(pid: int, symbols_files: Sequence[str] = ()) -> list[Check]:
    """Facts about a target's binary: build-id, symbols (its own, or a ``symbols_files`` entry with its
    build-id), debug link (stacks/elf.py), and which uprobes the uprobe tier can attach, or why none."""
    from .probes.uprobe_symbols import discover
    from .stacks.elf import NotElfError, read_debuglink, read_elf_facts

    try:
        exe = os.readlink(f"/proc/{pid}/exe")
    except OSError as exc:
        return [Check("target", False, f"pid {pid}: {exc.strerror}")]
    path = f"/proc/{pid}/exe"
    out = [Check("target", True, f"pid {pid}: {exe}")]
    try:
        facts = read_elf_facts(path)
        debuglink = read_debuglink(path)
    except NotElfError as exc:
        out.append(Check("binary", False, str(exc), required=False))
        return out
    except OSError as exc:
        out.append(Check("binary", False, f"{path}: not a readable ELF file ({exc})", required=False))
        return out
    symbols = facts.symtab.count if facts.symtab else 0
    dynamic_symbols = facts.dynsym.count if facts.dynsym else 0
    out.append(Check("build-id", facts.build_id is not None, facts.build_id or "no build-id note",
                     required=False))
    tier = discover(path, symbols_files)
    if symbols:
        sym_detail = f"{symbols} symbols in .symtab"
    elif tier.symbols_from and tier.symbols_from != path:
        sym_detail = (f"stripped (only {dynamic_symbols} .dynsym entries); symbols from --symbols "
                      f"{tier.symbols_from} (same build-id)")
    else:
        sym_detail = (f"stripped (only {dynamic_symbols} .dynsym entries): kernel tier only; "
                      "--symbols FILE or a debug build adds the uprobe tier")
    out.append(Check("symbols", symbols > 0 or tier.symbols_from is not None, sym_detail, required=False))
    if debuglink:
        out.append(Check("debuglink", True, f".gnu_debuglink -> {debuglink}", required=False))
    # which functions were found (SSL_* attached; Envoy's found by demangled pattern), or why not
    out.append(Check("uprobe-tier", tier.available, tier.summary(), required=False))
    return out


def require_tracing() -> None:
    """Raise FeatureError naming the first failed required check."""
    for check in host_checks():
        if check.required and not check.ok:
            raise FeatureError(f"cannot trace: {check.name}: {check.detail}")

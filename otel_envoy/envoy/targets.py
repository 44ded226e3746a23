"""The processes traced now: those named at start, and, with ``--comm``, every process that starts under
that name later (the kernel makes it a target at its exec: bpf/startup.bpf.h) until it exits.

The kernel adds a followed process to its target map itself, before the process's first instruction, so
nothing of its startup is missed; this table learns of it from the EV_EXEC record, checks that it is an
Envoy (else the kernel is told to let it go) and tells the daemon to rescan its listeners. EV_EXIT (its last
thread) removes it, from the kernel's maps too.

Each traced process's resource attributes (process_resource.py: container, pod, service name) are read from
its /proc once, when it becomes traced, and kept here (``resources``) until it exits.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from typing import Any

from .process import PROC, EnvoyProcess, is_envoy
from .process_resource import ResourceValue, process_resource

__all__ = ["TracedProcesses"]

log = logging.getLogger("otel_envoy.targets")


_MAX_TIDS = 65536  # threads remembered per process (its threads' kernel state is dropped at its exit)


class TracedProcesses:
    """The traced processes by pid. ``forget(pid, tids)`` drops a process and its threads from the kernel's
    tables. ``match_exe``: only processes running that executable are taken (``--exe``). ``resource_of``:
    a process's resource attributes (read from /proc: ``process_resource``)."""

    def __init__(self, processes: list[EnvoyProcess], *, follow_comm: str | None, require_envoy: bool,
                 forget: Callable[[int, list[int]], None], match_exe: str | None = None,
                 why: Mapping[int, str] | None = None,
                 resource_of: Callable[[EnvoyProcess], dict[str, ResourceValue]] | None = None) -> None:
        self.by_pid: dict[int, EnvoyProcess] = {p.pid: p for p in processes}
        self._resource_of = resource_of or (lambda p: process_resource(p.pid, p.comm, p.exe))
        self.resources: dict[int, dict[str, ResourceValue]] = {p.pid: self._resource_of(p) for p in processes}
        self.why: dict[int, str] = {p.pid: (why or {}).get(p.pid, "running at start") for p in processes}
        self.follow_comm = follow_comm
        self.require_envoy = require_envoy
        self.match_exe = match_exe
        self._forget = forget
        self.tids: dict[int, set[int]] = {}  # pid -> its threads seen so far (refresh_threads)
        self.gone: dict[int, list[int]] = {}  # exited processes -> their threads (bounded)
        self.started_count = 0  # processes that started under the followed comm and were taken
        self.exited_count = 0

    @property
    def processes(self) -> list[EnvoyProcess]:
        """The traced processes, by pid."""
        return [self.by_pid[p] for p in sorted(self.by_pid)]

    def describe(self) -> str:
        """``"PID (comm), ..."``, or what is awaited when nothing is traced yet."""
        if self.by_pid:
            return ", ".join(f"{p.pid} ({p.comm})" for p in self.processes)
        return f"no process yet: waiting for processes named {self.follow_comm!r}"

    def started(self, pid: int) -> EnvoyProcess | None:
        """A process exec'd into the followed comm (the kernel traces it already): taken when it is an
        Envoy (or any process, without ``require_envoy``); else the kernel lets it go. None when not taken
        (or gone already)."""
        ok, comm, exe = is_envoy(pid)
        if not comm:  # exited before we looked: its EV_EXIT follows
            return None
        if (self.require_envoy and not ok) or (self.match_exe and not _same_file(exe, self.match_exe)):
            log.info("pid %d started as %r (%s) but is not %s: not traced", pid, comm, exe or "?",
                     self.match_exe or "an Envoy")
            self._forget(pid, [])
            return None
        proc = EnvoyProcess(pid, comm, exe)
        self.by_pid[pid] = proc
        self.resources[pid] = self._resource_of(proc)
        self.why[pid] = f"started as {comm!r} (followed{' executable' if self.match_exe else ' name'})"
        self.started_count += 1
        log.info("tracing pid %d (%s, %s) from its start", pid, comm, exe or "?")
        return proc

    def exited(self, pid: int) -> list[int] | None:
        """A traced process's last thread exited: forgotten here and in the kernel (with its threads).
        Returns the threads it was seen with; None when it was not traced."""
        proc = self.by_pid.pop(pid, None)
        self.why.pop(pid, None)
        self.resources.pop(pid, None)
        tids = sorted(self.tids.pop(pid, set()) | {pid})
        self._forget(pid, tids)
        if proc is None:
            return None
        self.exited_count += 1
        if len(self.gone) >= 1024:
            self.gone.clear()
        self.gone[pid] = tids
        log.info("pid %d (%s) exited%s", pid, proc.comm,
                 f"; still waiting for processes named {self.follow_comm!r}" if self.follow_comm else "")
        return tids

    def view(self, entries_of: Callable[[int, list[int]], dict[str, int]]) -> dict[str, Any]:
        """What is traced and why (the status endpoint's /targets), with what the kernel's tables hold of
        each process (``entries_of``), and of the processes that exited last."""
        return {
            "following": {"comm": self.follow_comm, "exe": self.match_exe},
            "processes": [{"pid": p.pid, "comm": p.comm, "exe": p.exe, "why": self.why.get(p.pid, ""),
                           "resource": self.resources.get(p.pid, {}),
                           "threads": len(self.tids.get(p.pid, ())),
                           "kernel_entries": entries_of(p.pid, sorted(self.tids.get(p.pid, set()) | {p.pid}))}
                          for p in self.processes],
            "exited": [{"pid": pid, "left_in_kernel": entries_of(pid, tids)}
                       for pid, tids in list(self.gone.items())[-20:]],
        }

    def refresh_threads(self) -> None:
        """Remember each traced process's threads (/proc/<pid>/task): at its exit their kernel state goes."""
        for pid in self.by_pid:
            try:
                now = {int(t) for t in os.listdir(PROC / str(pid) / "task")}
            except OSError:
                continue
            seen = self.tids.setdefault(pid, set())
            if len(seen) + len(now) > _MAX_TIDS:
                seen.clear()
            seen |= now


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a.removesuffix(" (deleted)"), b)
    except OSError:
        return False

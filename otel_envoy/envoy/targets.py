"""The processes traced now: those named at start, and, with ``--comm``, every process that starts under
that name later (the kernel makes it a target at its exec: bpf/startup.bpf.h) until it exits.

The kernel adds a followed process to its target map itself, before the process's first instruction, so
nothing of its startup is missed; this table learns of it from the EV_EXEC record, checks that it is an
Envoy (else the kernel is told to let it go) and tells the daemon to rescan its listeners. EV_EXIT (its last
thread) removes it, from the kernel's maps too.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from .process import EnvoyProcess, is_envoy

__all__ = ["TracedProcesses"]

log = logging.getLogger("otel_envoy.targets")


class TracedProcesses:
    """The traced processes by pid. ``forget(pid)`` drops a process from the kernel's maps."""

    def __init__(self, processes: list[EnvoyProcess], *, follow_comm: str | None, require_envoy: bool,
                 forget: Callable[[int], None]) -> None:
        self.by_pid: dict[int, EnvoyProcess] = {p.pid: p for p in processes}
        self.follow_comm = follow_comm
        self.require_envoy = require_envoy
        self._forget = forget
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
        if self.require_envoy and not ok:
            log.info("pid %d started as %r (%s) but is not an Envoy: not traced", pid, comm, exe or "?")
            self._forget(pid)
            return None
        proc = EnvoyProcess(pid, comm, exe)
        self.by_pid[pid] = proc
        self.started_count += 1
        log.info("tracing pid %d (%s, %s) from its start", pid, comm, exe or "?")
        return proc

    def exited(self, pid: int) -> bool:
        """A traced process's last thread exited: forgotten here and in the kernel. False when it was
        not traced."""
        proc = self.by_pid.pop(pid, None)
        self._forget(pid)
        if proc is None:
            return False
        self.exited_count += 1
        log.info("pid %d (%s) exited%s", pid, proc.comm,
                 f"; still waiting for processes named {self.follow_comm!r}" if self.follow_comm else "")
        return True

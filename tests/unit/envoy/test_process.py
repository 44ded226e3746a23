"""Listening sockets of a process: ListenerFinder (sock_diag, in the process's network namespace) against
/proc."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import time

import pytest

from otel_envoy.envoy.process import (
    ListenerFinder,
    listening_sockets,
    listening_sockets_from_proc,
    watch_exits,
)
from tests.support.sockets import listening_socket


def test_finder_agrees_with_proc_and_follows_closed_and_new_listeners() -> None:
    finder = ListenerFinder()
    with listening_socket() as a, listening_socket() as b:
        pid = os.getpid()
        assert finder.sockets(pid) == listening_sockets_from_proc(pid)
        assert {s.port for s in finder.sockets(pid).values()} >= {a.getsockname()[1], b.getsockname()[1]}
        port_a = a.getsockname()[1]
        a.close()
        assert port_a not in {s.port for s in finder.sockets(pid).values()}
        with listening_socket() as c:  # likely on the fd a had
            now = finder.sockets(pid)
            assert now == listening_sockets_from_proc(pid)
            assert now[(pid, c.fileno())].port == c.getsockname()[1]


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs root and unshare")
def test_listeners_of_a_process_in_another_network_namespace() -> None:
    code = ("import socket,time; s=socket.socket(); s.bind(('127.0.0.1', 5555)); s.listen(); "
            "print('up', flush=True); time.sleep(30)")
    proc = subprocess.Popen(["unshare", "-n", sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "up"
        deadline = time.monotonic() + 5
        found = {}
        while time.monotonic() < deadline and not found:
            found = listening_sockets(proc.pid)
        assert [(s.address, s.port) for s in found.values()] == [("127.0.0.1", 5555)]
        assert found == listening_sockets_from_proc(proc.pid)
    finally:
        proc.kill()
        proc.wait()


# ------------------------------------------------------------------------------------------------ watch_exits


def _run_until_all_exited(pids: list[int], timeout: float = 10.0) -> bool:
    """Run an event loop until watch_exits reports every pid gone (True) or ``timeout`` passes (False)."""
    loop = asyncio.new_event_loop()
    try:
        done = asyncio.Event()
        unwatch = watch_exits(loop, pids, done.set)
        try:
            loop.run_until_complete(asyncio.wait_for(done.wait(), timeout))
            return True
        except TimeoutError:
            return False
        finally:
            unwatch()
    finally:
        loop.close()


def test_watch_exits_reports_once_every_process_is_gone() -> None:
    short = subprocess.Popen(["sleep", "0.2"])
    longer = subprocess.Popen(["sleep", "0.6"])
    try:
        started = time.monotonic()
        assert _run_until_all_exited([short.pid, longer.pid])
        assert time.monotonic() - started >= 0.5  # not before the second one exited
    finally:
        for p in (short, longer):
            p.kill()
            p.wait()


def test_watch_exits_does_not_report_while_one_process_runs() -> None:
    running = subprocess.Popen(["sleep", "30"])
    try:
        assert not _run_until_all_exited([running.pid], timeout=0.5)
    finally:
        running.kill()
        running.wait()


def test_watch_exits_counts_a_pid_already_gone_as_exited() -> None:
    gone = subprocess.Popen(["true"])
    gone.wait()  # reaped: the pid names no process now
    assert _run_until_all_exited([gone.pid], timeout=2.0)

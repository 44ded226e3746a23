"""Listening sockets of a process: ListenerFinder (sock_diag, in the process's network namespace) against
/proc."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

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


def _fd_receiver() -> tuple[subprocess.Popen[str], socket.socket]:
    """A child process that takes fds over a unix socket (SCM_RIGHTS, as an Envoy hot restart hands its
    listening sockets to the next epoch) and prints the number each one got."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    code = ("import socket,sys; s=socket.socket(fileno=int(sys.argv[1]))\n"
            "while True:\n"
            "    _m, fds, _f, _a = socket.recv_fds(s, 16, 4)\n"
            "    if not fds: break\n"
            "    print(fds[0], flush=True)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(theirs.fileno())], pass_fds=[theirs.fileno()],
                            stdout=subprocess.PIPE, text=True)
    theirs.close()
    return proc, ours


def test_a_listening_socket_handed_over_is_found_once_the_process_is_refreshed() -> None:
    """An Envoy hot restart: the new process receives sockets that already listen (the namespace's set of
    listeners does not change). The finder's cache would not see them; refresh (the daemon calls it at a
    process's exec and each listen()) and the periodic walk do."""
    proc, chan = _fd_receiver()
    try:
        with listening_socket() as listener:
            finder = ListenerFinder()
            assert finder.sockets(proc.pid) == {}  # holds nothing yet: cached as such
            socket.send_fds(chan, [b"x"], [listener.fileno()])
            assert proc.stdout is not None
            their_fd = int(proc.stdout.readline())
            assert finder.sockets(proc.pid) == {}  # the namespace's listeners did not change: cache
            finder.refresh(proc.pid)
            found = finder.sockets(proc.pid)
            assert {fd: (s.address, s.port) for (_pid, fd), s in found.items()} == \
                {their_fd: ("127.0.0.1", listener.getsockname()[1])}
            assert found == listening_sockets_from_proc(proc.pid)
            later = ListenerFinder()
            later.sockets(proc.pid)
            later.WALK_EVERY_S = 0.0  # the walk that catches any other hand-over
            assert later.sockets(proc.pid) == found
    finally:
        chan.close()
        proc.wait(5)


def test_a_process_gone_has_no_listeners_and_one_log_line(caplog) -> None:
    """A process that exits while its sockets are read (a zombie: its namespaces already released; then
    reaped: no /proc entry) gives no listeners and one log line, however often it is looked at."""
    proc = subprocess.Popen(["sleep", "30"])
    finder = ListenerFinder()
    assert finder.sockets(proc.pid) == {}
    proc.kill()
    deadline = time.monotonic() + 5
    while Path(f"/proc/{proc.pid}/ns/net").exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    with caplog.at_level(logging.INFO, logger="otel_envoy.process"):
        assert finder.sockets(proc.pid) == {}  # a zombie
        proc.wait()
        assert finder.sockets(proc.pid) == {}  # reaped
        assert listening_sockets(proc.pid) == {}
    lines = [r.getMessage() for r in caplog.records if "exited while its listening sockets" in r.getMessage()]
    assert len(lines) == 2, lines  # one per finder
    assert str(proc.pid) in lines[0]
    with pytest.raises(ProcessLookupError):
        listening_sockets_from_proc(proc.pid)


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

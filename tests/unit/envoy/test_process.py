"""Listening sockets of a process: ListenerFinder (sock_diag, in the process's network namespace) against
/proc."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import pytest

from otel_envoy.envoy.process import ListenerFinder, listening_sockets, listening_sockets_from_proc
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

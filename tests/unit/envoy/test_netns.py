"""Sockets opened in another process's network namespace."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from otel_envoy.envoy.netns import same_netns, socket_in_netns


def test_a_socket_in_our_own_namespace_is_a_plain_socket() -> None:
    assert same_netns(os.getpid())
    with socket_in_netns(os.getpid(), socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        assert s.getsockname()[1] > 0


def test_a_process_gone_raises_process_lookup_error() -> None:
    gone = subprocess.Popen(["true"])
    gone.wait()
    with pytest.raises(ProcessLookupError):
        same_netns(gone.pid)
    with pytest.raises(ProcessLookupError):
        socket_in_netns(gone.pid, socket.AF_INET, socket.SOCK_STREAM)


@pytest.mark.root
def test_a_socket_opened_in_another_namespace_reaches_what_listens_there() -> None:
    """A server in a namespace of its own (``unshare --net``, loopback up) on a port: a socket opened in its
    namespace connects to it; the caller's own threads stay in their namespace."""
    assert os.geteuid() == 0, "run as root: entering a network namespace needs CAP_SYS_ADMIN"
    code = ("import socket,subprocess; subprocess.run(['ip','link','set','lo','up'],check=True); "
            "s=socket.socket(); s.bind(('127.0.0.1', 0)); s.listen(); print(s.getsockname()[1], flush=True); "
            "c,_=s.accept(); c.sendall(b'inside'); c.close()")
    proc = subprocess.Popen(["unshare", "--net", sys.executable, "-c", code], stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        assert not same_netns(proc.pid)
        with socket_in_netns(proc.pid, socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(("127.0.0.1", port))
            assert s.recv(16) == b"inside"
        assert not same_netns(proc.pid)  # this thread never left its namespace
    finally:
        proc.kill()
        proc.wait()

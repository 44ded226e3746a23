"""lab/namespaced.py: a command in network, PID and mount namespaces of its own, found by its host pid, and
reached through its network namespace (root: unshare and nsenter need it; a missing tool fails)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from otel_envoy.lab import EnvoyLab
from otel_envoy.lab.namespaced import (
    forked_child,
    http_get_in_netns,
    nsenter_command,
    require_tools,
    unshare_command,
)
from tests.support.lab import is_root


def test_unshare_command_brings_loopback_up_adds_addresses_and_execs() -> None:
    cmd = unshare_command(["envoy", "-c", "x y.json"], ["10.199.0.1/24"])
    assert cmd[:6] == ["unshare", "--net", "--pid", "--fork", "--mount-proc", "--kill-child"]
    assert cmd[6:8] == ["sh", "-c"]
    assert cmd[8] == 'ip link set lo up && ip addr add 10.199.0.1/24 dev lo && exec "$@"'
    assert cmd[9:] == ["sh", "envoy", "-c", "x y.json"]  # arguments passed through, never re-split
    assert nsenter_command(42, ["curl", "x"]) == ["nsenter", "--net=/proc/42/ns/net", "--", "curl", "x"]


def test_require_tools_names_what_is_missing() -> None:
    with pytest.raises(RuntimeError, match="no-such-tool-here"):
        require_tools(("sh", "no-such-tool-here"))


@pytest.mark.root
@pytest.mark.skipif(not is_root, reason="unshare needs root")
def test_a_server_in_its_own_namespaces_is_found_and_reached() -> None:
    require_tools()
    code = ("import http.server as h; s=h.HTTPServer(('10.199.0.1', 8099), h.SimpleHTTPRequestHandler); "
            "s.serve_forever()")
    proc = subprocess.Popen(unshare_command([sys.executable, "-c", code], ["10.199.0.1/24"]),
                            cwd=Path(__file__).parent)
    try:
        pid = forked_child(proc.pid, Path(sys.executable).name[:15], 10, alive=lambda: proc.poll() is None)
        nspid = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                     if line.startswith("NSpid:")).split()
        assert nspid[1:] == [str(pid), "1"]  # pid 1 of its PID namespace
        body = ""
        for _ in range(100):
            try:
                body = http_get_in_netns(pid, "10.199.0.1", 8099, "/", timeout=2)
                break
            except ConnectionRefusedError:
                time.sleep(0.05)
        assert "test_namespaced.py" in body  # the directory listing it serves
        with pytest.raises(OSError, match="404"):
            http_get_in_netns(pid, "10.199.0.1", 8099, "/no-such-file", timeout=2)
        seen = subprocess.run(nsenter_command(pid, ["ip", "-o", "addr", "show", "dev", "lo"]),
                              capture_output=True, text=True, check=True).stdout
        assert "10.199.0.1/24" in seen
    finally:
        proc.kill()  # unshare: --kill-child takes the server with it
        proc.wait(10)


@pytest.mark.root
@pytest.mark.skipif(not is_root, reason="unshare needs root")
def test_an_envoy_that_fails_in_its_namespaces_reports_its_log(tmp_path: Path) -> None:
    fake = tmp_path / "fake-envoy"
    fake.write_text("#!/bin/sh\necho 'fake envoy: cannot load bootstrap: kaboom' >&2\nexit 3\n")
    fake.chmod(0o755)
    lab = EnvoyLab(envoy_binary=fake, netns=True, startup_timeout=10)
    with pytest.raises(RuntimeError, match=r"(?s)(own namespaces did not start|exited with 3).*kaboom"):
        lab.start()
    assert lab.workdir is not None and not lab.workdir.exists()
    assert not lab.running

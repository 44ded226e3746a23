"""Runs h2load (HTTP/1.1) as an end-to-end test's load and checks every request of it succeeded."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Sequence

__all__ = ["h2load"]


def h2load(url: str, requests: int, connections: int, headers: Sequence[str] = (),
           all_succeeded: bool = False) -> None:
    """``requests`` requests over ``connections`` connections to ``url``; fails the test unless all of
    them were done (answered, whatever the status) and, with ``all_succeeded``, all succeeded (h2load's
    count of successful answers). h2load missing fails too (a root test whose tool is missing must not
    pass)."""
    exe = shutil.which("h2load")
    assert exe, "h2load (nghttp2-client) is needed"
    cmd = [exe, "--h1", "-c", str(connections), "-n", str(requests)]
    for h in headers:
        cmd += ["-H", h]
    proc = subprocess.run([*cmd, url], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and f"{requests} done" in proc.stdout, proc.stdout + proc.stderr
    assert not all_succeeded or f"{requests} succeeded" in proc.stdout, proc.stdout

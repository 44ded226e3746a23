"""Runs the real `otel-envoy` daemon as a subprocess for end-to-end tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["DaemonProcess", "running_daemons"]


_RUNNING: set[DaemonProcess] = set()


def running_daemons() -> set[DaemonProcess]:
    """The daemons started and not stopped yet (tests/e2e/conftest.py stops those a failed test left)."""
    return {d for d in _RUNNING if d.proc is not None and d.proc.poll() is None}


class DaemonProcess:
    """`otel-envoy run ...` started with a ready file; ``stop()`` sends SIGTERM and returns the exit code."""

    def __init__(
        self, args: list[str], workdir: Path, env: dict[str, str] | None = None, command: str = "run"
    ) -> None:
        if command == "run" and not any(a.startswith("--request-detail") for a in args):
            # most tests check what only parsing a request's bytes gives (body sizes, response headers);
            # tests of the default's one record per request say "--request-detail", "summary"
            args = [*args, "--request-detail", "full"]
        self.ready_file = workdir / f"ready-{time.monotonic_ns()}"
        self.stderr_path = workdir / f"daemon-{time.monotonic_ns()}.stderr"
        self.cmd = [
            sys.executable,
            "-m",
            "otel_envoy.cli",
            command,
            *args,
            "--ready-file",
            str(self.ready_file),
        ]
        # every request traced unless a test says otherwise (the default samples 1 % of root requests)
        self.env = {"OTEL_TRACES_SAMPLER": "always_on", **os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self.returncode: int | None = None

    def start(self, timeout: float = 180.0) -> DaemonProcess:
        """Start and wait until the probes are attached."""
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(self.cmd, stdout=subprocess.DEVNULL, stderr=err, env=self.env)
        _RUNNING.add(self)
        deadline = time.monotonic() + timeout
        while not self.ready_file.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited {self.proc.returncode}: {self.stderr()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"daemon not ready after {timeout}s: {self.stderr()}")
            time.sleep(0.1)
        return self

    def stderr(self) -> str:
        """What the daemon printed on stderr so far."""
        try:
            return self.stderr_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM, wait for the flush, return the exit code (SIGKILL after ``timeout``)."""
        if self.proc is None:
            return -1
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.returncode = self.proc.returncode
        _RUNNING.discard(self)
        return self.returncode

    def __enter__(self) -> DaemonProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

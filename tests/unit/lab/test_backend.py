"""The lab backend (lab/backend.py), run standalone."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.error
import urllib.request

from otel_envoy.lab.envoy_config import free_ports


def test_backend_standalone() -> None:
    (port,) = free_ports(1)
    proc = subprocess.Popen([sys.executable, "-m", "otel_envoy.lab.backend", "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)  # fmt: skip
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"

        def get(path: str) -> tuple[int, bytes]:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
                    return r.status, r.read()
            except urllib.error.HTTPError as e:
                return e.code, e.read()

        assert get("/") == (200, b"hello from backend\n")
        status, body = get("/bytes/12345")
        assert status == 200 and len(body) == 12345
        assert get("/status/503")[0] == 503
        assert get("/status/204") == (204, b"")
        t0 = time.monotonic()
        assert get("/delay/200") == (200, b"ok\n")
        assert time.monotonic() - t0 >= 0.19
        assert get("/bytes/nope")[0] == 400
        assert get("/nothing-here")[0] == 404
    finally:
        proc.terminate()
        assert proc.wait(timeout=5) == 0

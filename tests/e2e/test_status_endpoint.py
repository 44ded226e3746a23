"""The daemon's HTTP endpoint (--listen): /healthz, /metrics (parsed by prometheus_client's own parser),
/targets; /healthz turns unhealthy when the ring stops draining; bad --listen values."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from otel_envoy.lab.envoy_config import free_ports
from otel_envoy.lab.lab import EnvoyLab
from tests.support.daemon import DaemonProcess
from tests.support.h2load import h2load

pytestmark = pytest.mark.root
ROOT = Path(__file__).resolve().parents[2]


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _wait_status(url: str, code: int, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        got, body = _get(url)
        if got == code:
            return json.loads(body)
        assert time.monotonic() < deadline, (got, body)
        time.sleep(0.2)


def test_healthz_metrics_and_targets(tmp_path) -> None:
    """Healthy while tracing; /metrics parses and counts what Envoy served; /targets says what is traced,
    why, and what the kernel holds of it."""
    port = free_ports(1)[0]
    base = f"http://127.0.0.1:{port}"
    with EnvoyLab(concurrency=2, direct_response=True) as lab:
        pid, http_port = lab.pid, lab.http_port
        daemon = DaemonProcess(["--pid", str(lab.pid), "--listen", str(port), "--output",
                                str(tmp_path / "spans.jsonl")], tmp_path).start()
        try:
            h2load(f"http://127.0.0.1:{lab.http_port}/", 200, 4, ["Connection: close"])
            health = _wait_status(f"{base}/healthz", 200, 10)
            assert health["status"] == "ok" and health["reasons"] == []
            time.sleep(1.0)
            code, text = _get(f"{base}/metrics")
            assert code == 200
            families = {f.name: f for f in text_string_to_metric_families(text.decode())}
            code, body = _get(f"{base}/targets")
            targets = json.loads(body)
            tasks = Path(f"/proc/{daemon.proc.pid}/task")
            thread_names = {(t / "comm").read_text().strip() for t in tasks.iterdir()}
        finally:
            assert daemon.stop() == 0, daemon.stderr()
    # the daemon's threads, named for top -H and ps -L (otel_envoy/thread_names.py)
    assert {"oe-ring", "oe-export", "oe-sink-jsonl", "oe-rounds"} <= thread_names, thread_names
    accepted = sum(s.value for s in families["otel_envoy_connections_accepted"].samples
                   if s.labels["port"] == str(http_port))
    assert accepted == 200
    counts = [s for s in families["otel_envoy_http_server_request_duration_seconds"].samples
              if s.name.endswith("_count") and s.labels["port"] == str(http_port)]
    assert sum(s.value for s in counts) == 200 and {s.labels["status"] for s in counts} == {"200"}
    received = families["otel_envoy_records_received"].samples[0].value
    assert received > 0 and families["otel_envoy_cpu_seconds"].samples[0].value > 0
    [proc] = targets["processes"]
    assert proc["pid"] == pid and proc["why"] == "--pid"
    assert proc["kernel_entries"].get("accepts_by_thread", 0) >= 2  # both workers took connections
    assert proc["kernel_entries"].get("threads", 0) >= 2


def test_healthz_turns_unhealthy_when_the_ring_stops_draining(tmp_path) -> None:
    """The recording goes to a pipe nobody reads: once it is full the ring thread blocks writing to it and
    the ring is no longer drained: /healthz answers 503 with the reason; reading the pipe again heals it."""
    port = free_ports(1)[0]
    fifo = tmp_path / "events.fifo"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # so the daemon's open for writing returns
    draining = threading.Event()
    stop = threading.Event()

    def drain() -> None:
        draining.wait()
        while not stop.is_set():
            try:
                if not os.read(reader, 1 << 16):
                    time.sleep(0.01)
            except BlockingIOError:
                time.sleep(0.01)

    drainer = threading.Thread(target=drain, daemon=True)
    drainer.start()
    try:
        with EnvoyLab(direct_response=True) as lab:
            daemon = DaemonProcess(["--pid", str(lab.pid), "--listen", f"127.0.0.1:{port}", "--output",
                                    str(tmp_path / "spans.jsonl"), "--record", str(fifo)], tmp_path).start()
            try:
                _wait_status(f"http://127.0.0.1:{port}/healthz", 200, 10)
                h2load(f"http://127.0.0.1:{lab.http_port}/", 2000, 4)  # far more than a pipe holds
                sick = _wait_status(f"http://127.0.0.1:{port}/healthz", 503, 30)
                assert sick["status"] == "unhealthy"
                assert any(r.startswith("ring not drained") for r in sick["reasons"]), sick
                draining.set()
                healed = _wait_status(f"http://127.0.0.1:{port}/healthz", 200, 30)
                assert healed["status"] == "ok"
            finally:
                draining.set()
                assert daemon.stop() == 0, daemon.stderr()
    finally:
        stop.set()
        drainer.join(5)
        os.close(reader)


@pytest.mark.parametrize("listen, says", [("example.com:9999", "is not an IP address"),
                                          ("127.0.0.1:70000", "the port must be 1-65535"),
                                          ("in-use", "address already in use")])
def test_bad_listen_values_exit_2_with_one_line(tmp_path, listen: str, says: str) -> None:
    with EnvoyLab(direct_response=True) as lab, socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        if listen == "in-use":
            listen = f"127.0.0.1:{taken.getsockname()[1]}"
        proc = subprocess.run([sys.executable, "-m", "otel_envoy.cli", "run", "--pid", str(lab.pid),
                               "--listen", listen, "--duration", "5", "--output", str(tmp_path / "s.jsonl")],
                              cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and says in lines[0] and "Traceback" not in proc.stderr, proc.stderr

"""Envoys that come and go under one daemon (``--comm envoy``): each new process is traced from its start,
each exited one leaves nothing in the kernel's tables, and the daemon goes on."""

from __future__ import annotations

import json
import os
import signal
import socket
import time

import pytest

from otel_envoy.lab.lab import EnvoyLab
from tests.support.daemon import DaemonProcess
from tests.support.otlp_receiver import OtlpReceiver

pytestmark = pytest.mark.root


def _request(port: int, keep_open: bool = False) -> socket.socket | None:
    """One HTTP/1.1 request answered by Envoy; the socket left open when ``keep_open``."""
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n" + (b"" if keep_open else b"Connection: close\r\n") + b"\r\n")
    head = s.recv(65536)
    assert head.startswith(b"HTTP/1.1 200"), head[:100]
    if keep_open:
        return s
    s.close()
    return None


def test_envoy_stopped_and_started_three_times(tmp_path) -> None:
    """Three Envoys one after the other under one daemon: each is traced within 2 s of its start (its
    connection's span carries its pid), the third is killed with a connection open (the span ends with
    envoy.connection.end_reason=process_exited), nothing of any of them is left in the kernel's tables
    after it exited, and the daemon never exits on its own."""
    summary = tmp_path / "summary.json"
    receiver = OtlpReceiver().start()
    daemon = DaemonProcess(["--comm", "envoy", "--otlp-endpoint", receiver.grpc_endpoint,
                            "--otlp-protocol", "grpc", "--metrics-interval", "1",
                            "--summary-json", str(summary)], tmp_path).start()
    pids: list[int] = []
    delays: list[float] = []
    held = None
    try:
        for cycle in range(3):
            lab = EnvoyLab(concurrency=2, direct_response=True)
            try:
                lab.start()
                pid = lab.pid
                pids.append(pid)
                ready = time.monotonic()
                _request(lab.http_port)
                receiver.wait_for(lambda s, pid=pid: any(
                    x.name == "envoy.downstream.connection" and x.attributes.get("process.pid") == pid
                    for x in s), timeout=15)
                delays.append(time.monotonic() - ready)
                if cycle == 2:  # killed: the kernel closes its connections, Envoy never does
                    held = _request(lab.http_port, keep_open=True)
                    os.kill(pid, signal.SIGKILL)
                    time.sleep(0.5)
            finally:
                lab.stop()
            assert daemon.proc.poll() is None, daemon.stderr()  # still running without any Envoy
        time.sleep(4.0)  # past the metric series' grace (one metrics interval + 2 s)
        receiver.wait_for(lambda s: any(x.attributes.get("envoy.connection.end_reason") == "process_exited"
                                        for x in s), timeout=15)
    finally:
        if held is not None:
            held.close()
        code = daemon.stop()
        receiver.stop()
    assert code == 0, daemon.stderr()
    assert len(set(pids)) == 3
    assert all(d < 2.0 for d in delays), delays
    spans = receiver.spans()
    for pid in pids:  # each process's own startup trace
        assert any(s.name == "envoy.startup" and s.attributes.get("process.pid") == pid for s in spans)
    ended = [s for s in spans if s.attributes.get("envoy.connection.end_reason") == "process_exited"
             and s.attributes.get("process.pid") in pids]
    assert ended and all(s.attributes["process.pid"] == pids[2] for s in ended)
    # (other Envoys of the machine, if any, are traced too: only ours are looked at)
    # the daemon's own counters went out over OTLP too
    records = {p.attributes.get("otel_envoy.stage"): p.value
               for p in receiver.latest_metric_points("otel_envoy.records").values()}
    assert records.get("submitted", 0) > 0 and records.get("received", 0) > 0, records
    processes = json.loads(summary.read_text())["processes"]
    assert processes["started"] >= 3 and processes["exited"] >= 3, processes
    assert not set(pids) & set(processes["traced"])
    left = processes["left_in_kernel"]
    assert {str(p) for p in pids} <= set(left)
    assert all(not left[str(p)] for p in pids), left

"""The `otel-envoy` command line against a real Envoy: bad input, doctor, export failures, record/replay.

Bad input must end with exactly one stderr line starting with "otel-envoy: ", no traceback and a non-zero
exit code. Needs root (the daemon loads real BPF programs).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from otel_envoy.export.otlp_json_decode import decode_request_json
from otel_envoy.lab import clients
from otel_envoy.lab.lab import EnvoyLab
from otel_envoy.spans.model import SpanRecord
from tests.support.daemon import DaemonProcess
from tests.support.h2load import h2load
from tests.support.otlp_receiver import OtlpReceiver
from tests.support.traces import connection_traces

pytestmark = pytest.mark.root

ROOT = Path(__file__).resolve().parents[2]
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def cli(*args: str | Path, prefix: list[str] | None = None, timeout: float = 120
        ) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    cmd = [*(prefix or []), sys.executable, "-m", "otel_envoy.cli", *map(str, args)]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
                          check=False)


def assert_one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("otel-envoy: "), proc.stderr
    assert proc.returncode != 0, proc.stderr
    return lines[0]


def read_jsonl(path: Path) -> list[SpanRecord]:
    return [s for line in path.read_text().splitlines() if line.strip()
            for s in decode_request_json(json.loads(line))]


def wait_until(predicate, timeout: float, what: str) -> None:
    """Poll ``predicate`` (a condition, not a timing assertion); fail with ``what`` if it never holds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"gave up waiting: {what}")
        time.sleep(0.1)


@pytest.fixture
def sleeper() -> Iterator[int]:
    proc = subprocess.Popen(["sleep", "300"])
    try:
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A port that refuses connections: bound (so nobody else takes it) but not listening."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    try:
        yield s.getsockname()[1]
    finally:
        s.close()


# ---------------------------------------------------------------------------------------------- bad input


def test_run_nonexistent_pid() -> None:
    pid = 4_000_000  # above pid_max's hard limit (2^22): can never exist
    line = assert_one_line_error(cli("run", "--pid", pid, "--output", "/dev/null"))
    assert f"pid {pid} does not exist" in line


def test_run_pid_that_is_not_envoy(sleeper: int) -> None:
    line = assert_one_line_error(cli("run", "--pid", sleeper, "--output", "/dev/null"))
    assert f"pid {sleeper} is not an Envoy process" in line and "sleep" in line


def test_run_without_target_traces_every_running_envoy(lab, tmp_path: Path) -> None:
    """No --pid, --comm or --exe: the lab's Envoy (already running) is found by its name and traced."""
    summary = tmp_path / "summary.json"
    proc = cli("run", "--output", "/dev/null", "--duration", "4", "--summary-json", summary)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert int(lab.pid) in json.loads(summary.read_text())["processes"]["traced"], summary.read_text()


def test_run_with_unreachable_otlp_endpoint(lab, closed_port: int) -> None:
    endpoint = f"http://127.0.0.1:{closed_port}"
    line = assert_one_line_error(cli("run", "--pid", lab.pid, "--otlp-endpoint", endpoint,
                                     "--otlp-protocol", "grpc", "--duration", "5"))
    assert str(closed_port) in line and "unreachable" in line


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="setpriv (util-linux) not installed")
def test_run_as_non_root(lab) -> None:
    proc = cli("run", "--pid", lab.pid, "--output", "/dev/null", "--duration", "5", prefix=NOBODY)
    line = assert_one_line_error(proc)
    assert "must run as root" in line


def test_show_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.jsonl"
    line = assert_one_line_error(cli("show", missing))
    assert str(missing) in line and "No such file" in line


def test_show_file_with_a_garbage_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"resourceSpans": []}\nthis is not json\n')
    line = assert_one_line_error(cli("show", bad))
    assert "line 2" in line


def test_replay_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.events"
    line = assert_one_line_error(cli("replay", missing, "--output", tmp_path / "out.jsonl"))
    assert str(missing) in line
    assert not (tmp_path / "out.jsonl").exists() or (tmp_path / "out.jsonl").read_text() == ""


# ---------------------------------------------------------------------------------------------- doctor


def test_doctor_says_tracing_is_possible() -> None:
    proc = cli("doctor")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "tracing: possible" in proc.stdout
    assert re.search(r"^ok\s+root\b", proc.stdout, re.M)
    assert "Traceback" not in proc.stderr


def test_doctor_inspects_the_envoy_binary(lab) -> None:
    proc = cli("doctor", "--pid", lab.pid)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "tracing: possible" in out
    exe = os.readlink(f"/proc/{lab.pid}/exe")
    assert re.search(rf"^ok\s+target\s+pid {lab.pid}: {re.escape(exe)}$", out, re.M), out
    symbols = re.search(r"^\S+\s+symbols\s+(.*)$", out, re.M)
    assert symbols and "stripped" in symbols.group(1), out
    m = re.search(r"^ok\s+build-id\s+([0-9a-f]{16,})$", out, re.M)
    assert m, out
    if shutil.which("readelf"):  # cross-check with binutils
        notes = subprocess.run(["readelf", "-n", exe], capture_output=True, text=True, check=True).stdout
        assert f"Build ID: {m.group(1)}" in notes


# -------------------------------------------------------------------------------------------- export failures


def test_a_6_s_collector_outage_loses_nothing(lab, tmp_path: Path) -> None:
    """The collector stops (its port closed) for 6 s while 10 connections are made: the file output gets
    them meanwhile, and once the collector is back on the same port it gets every one of them."""
    out, summary = tmp_path / "traces.jsonl", tmp_path / "summary.json"
    rx = OtlpReceiver().start()
    daemon = DaemonProcess(["--pid", str(lab.pid), "--otlp-endpoint", rx.grpc_endpoint,
                            "--otlp-protocol", "grpc", "--output", str(out), "--summary-json", str(summary)],
                           tmp_path).start()
    try:
        first = clients.curl_plain(lab.http_port)
        assert first.http_code == 200 and first.local_port
        rx.wait_for(lambda s: first.local_port in connection_traces(s, lab.http_port), 15)

        rx.stop()
        down_at = time.monotonic()
        during = []
        for _ in range(10):
            res = clients.curl_plain(lab.http_port)
            assert res.http_code == 200 and res.local_port
            during.append(res.local_port)
            time.sleep(0.4)
        # the file output is not held up by the collector being down
        wait_until(lambda: set(during) <= set(connection_traces(read_jsonl(out), lab.http_port)),
                   max(0.5, 6.0 - (time.monotonic() - down_at)), "the output file to get the connections")
        assert not set(during) & set(connection_traces(rx.spans(), lab.http_port))
        time.sleep(max(0.0, 6.0 - (time.monotonic() - down_at)))
        rx.start(same_ports=True)
        rx.wait_for(lambda s: set(during) <= set(connection_traces(s, lab.http_port)), 40)
        assert daemon.proc is not None and daemon.proc.poll() is None, daemon.stderr()
    finally:
        code = daemon.stop()
        rx.stop()
    assert code == 0, daemon.stderr()
    assert "Traceback" not in daemon.stderr()
    stats = json.loads(summary.read_text())
    assert not {k: v for k, v in stats["drops"].items() if k.startswith("export.")}, stats["drops"]
    otlp = stats["export"]["sinks"]["otlp-grpc"]
    assert otlp["retries"] >= 1 and otlp["buffered"] == 0, otlp
    assert otlp["handed"] == otlp["sent"] == stats["export"]["exported"]["jsonl"], stats["export"]
    received = connection_traces(rx.spans(), lab.http_port)
    for port in [first.local_port, *during]:
        received[port].assert_nested()


def test_a_long_outage_keeps_the_buffer_within_its_bound(lab, tmp_path: Path) -> None:
    """A collector that stays down (a 10-minute outage, made short by a 256 KiB bound): the buffer never
    holds more than its bound, what it let go is counted, and every span is accounted for."""
    summary = tmp_path / "summary.json"
    rx = OtlpReceiver().start()
    bound = 256 << 10
    daemon = DaemonProcess(["--pid", str(lab.pid), "--otlp-endpoint", rx.grpc_endpoint, "--otlp-protocol",
                            "grpc", "--sampler", "always_on", "--cpu-budget", "0",
                            "--export-buffer-mb", str(bound / (1 << 20)),
                            "--summary-json", str(summary)], tmp_path).start()
    try:
        rx.stop()
        for _ in range(8):  # ~500 B per span: 4 000 requests' spans are far more than 256 KiB
            h2load(f"http://127.0.0.1:{lab.http_port}/", 500, 4)
            time.sleep(0.5)
        time.sleep(1.0)
    finally:
        code = daemon.stop()
        rx.stop()
    assert code == 0, daemon.stderr()
    stats = json.loads(summary.read_text())
    otlp = stats["export"]["sinks"]["otlp-grpc"]
    assert otlp["max_bytes"] == bound and 0 < otlp["peak_buffered_bytes"] <= bound, otlp
    assert otlp["sent"] == 0 and otlp["buffer_full"] > 0, otlp
    assert otlp["handed"] == otlp["buffer_full"] + otlp["unsent"] + otlp["failed"] + otlp["buffered"], otlp
    assert stats["drops"]["export.export_buffer_full:otlp-grpc"] == otlp["buffer_full"]
    assert stats["counts"]["spans"] >= 4000


def test_the_daemon_s_own_admin_calls_are_not_traced(lab, tmp_path: Path) -> None:
    """--envoy-admin polls Envoy's admin API every 5 s, through a listener the daemon traces: those
    connections make no span (counted), while another client's admin call still does."""
    out, summary = tmp_path / "traces.jsonl", tmp_path / "summary.json"
    daemon = DaemonProcess(["--pid", str(lab.pid), "--envoy-admin", lab.admin_url, "--sampler", "always_on",
                            "--output", str(out), "--summary-json", str(summary)], tmp_path).start()
    try:
        theirs = clients.curl_plain(lab.admin_port, "/ready")
        assert theirs.http_code == 200 and theirs.local_port
        time.sleep(11.5)  # two polls
    finally:
        code = daemon.stop()
    assert code == 0, daemon.stderr()
    stats = json.loads(summary.read_text())
    assert stats["counts"].get("own_connections_left_out", 0) >= 2, stats["counts"]
    on_admin = connection_traces(read_jsonl(out), lab.admin_port)
    assert set(on_admin) == {theirs.local_port}, sorted(on_admin)
    on_admin[theirs.local_port].assert_nested()


# -------------------------------------------------------------------------------------------- record / replay


def test_record_then_replay_live_traffic(lab, tmp_path: Path) -> None:
    events = tmp_path / "live.events"
    daemon = DaemonProcess(["--pid", str(lab.pid), "--events", str(events)], tmp_path,
                           command="record").start()
    try:
        plain = clients.curl_plain(lab.http_port)
        tls = clients.curl_tls(lab.tls_port, "a.example.com", alpn="h2", tls_version="1.3", ca=lab.ca_path)
    finally:
        code = daemon.stop()
    assert code == 0, daemon.stderr()
    assert plain.http_code == 200 and plain.local_port, plain.stderr
    assert tls.http_code == 200 and tls.local_port, tls.stderr
    assert events.stat().st_size > 1000

    out = tmp_path / "replayed.jsonl"
    proc = cli("replay", events, "--output", out)
    assert proc.returncode == 0, proc.stderr
    spans = read_jsonl(out)
    plain_traces = connection_traces(spans, lab.http_port)
    tls_traces = connection_traces(spans, lab.tls_port)
    assert plain.local_port in plain_traces, sorted(plain_traces)
    assert tls.local_port in tls_traces, sorted(tls_traces)
    p = plain_traces[plain.local_port]
    p.assert_nested()
    assert p.root.attributes["process.pid"] == lab.pid
    assert p.root.attributes["network.peer.port"] == plain.local_port
    t = tls_traces[tls.local_port]
    t.assert_nested()
    assert t.root.attributes["network.peer.port"] == tls.local_port
    assert t.child("tls.handshake").attributes["tls.client.server_name"] == "a.example.com"


# -------------------------------------------------------------------------------------------- targets exit


def test_the_daemon_stops_when_every_traced_envoy_has_exited(tmp_path: Path) -> None:
    """An Envoy that exits (a restarted pod, a crashed proxy) takes its daemon with it: the daemon flushes
    what it traced and exits 0, saying why, instead of staying attached with its programs on every
    syscall of the machine."""
    out, summary = tmp_path / "traces.jsonl", tmp_path / "summary.json"
    with EnvoyLab(concurrency=1) as own:
        daemon = DaemonProcess(["--pid", str(own.pid), "--output", str(out), "--summary-json", str(summary)],
                               tmp_path).start()
        try:
            res = clients.curl_plain(own.http_port)
            assert res.http_code == 200 and res.local_port, res.stderr
            port = own.http_port
        except BaseException:
            daemon.stop()
            raise
    try:
        assert daemon.proc is not None
        daemon.proc.wait(timeout=30)
    finally:
        code = daemon.stop()
    assert code == 0, daemon.stderr()
    assert "every traced process has exited" in daemon.stderr(), daemon.stderr()
    assert "Traceback" not in daemon.stderr()
    assert summary.exists()
    traces = connection_traces(read_jsonl(out), port)
    assert res.local_port in traces, sorted(traces)
    traces[res.local_port].assert_nested()

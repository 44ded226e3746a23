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


@pytest.fixture
def receiver_ok(receiver):
    receiver.set_failing(False)
    receiver.clear()
    yield receiver
    receiver.set_failing(False)


# ---------------------------------------------------------------------------------------------- bad input


def test_run_nonexistent_pid() -> None:
    pid = 4_000_000  # above pid_max's hard limit (2^22): can never exist
    line = assert_one_line_error(cli("run", "--pid", pid, "--output", "/dev/null"))
    assert f"pid {pid} does not exist" in line


def test_run_pid_that_is_not_envoy(sleeper: int) -> None:
    line = assert_one_line_error(cli("run", "--pid", sleeper, "--output", "/dev/null"))
    assert f"pid {sleeper} is not an Envoy process" in line and "sleep" in line


def test_run_without_target() -> None:
    line = assert_one_line_error(cli("run", "--output", "/dev/null"))
    assert "--pid" in line


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


def test_receiver_failing_after_start_does_not_stop_the_daemon(lab, receiver_ok, tmp_path: Path) -> None:
    out, summary = tmp_path / "traces.jsonl", tmp_path / "summary.json"
    daemon = DaemonProcess(["--pid", str(lab.pid), "--otlp-endpoint", receiver_ok.grpc_endpoint,
                            "--otlp-protocol", "grpc", "--output", str(out), "--summary-json", str(summary)],
                           tmp_path).start()
    try:
        first = clients.curl_plain(lab.http_port)
        assert first.http_code == 200 and first.local_port
        receiver_ok.wait_for(lambda s: first.local_port in connection_traces(s, lab.http_port), 15)

        receiver_ok.set_failing(True)
        second = clients.curl_plain(lab.http_port)
        assert second.http_code == 200 and second.local_port
        wait_until(lambda: receiver_ok.rejected["grpc"] > 0, 30, "the daemon to hit the failing receiver")
        third = clients.curl_plain(lab.http_port)  # tracing goes on while exports fail
        assert third.http_code == 200 and third.local_port
        wait_until(lambda: third.local_port in connection_traces(read_jsonl(out), lab.http_port), 30,
                   "the connection after the failure to reach the output file")
        assert daemon.proc is not None and daemon.proc.poll() is None, daemon.stderr()
    finally:
        code = daemon.stop()
    assert code == 0, daemon.stderr()
    assert "Traceback" not in daemon.stderr()
    stats = json.loads(summary.read_text())
    failed = stats["drops"].get("export.export_failed:otlp-grpc", 0)
    assert failed > 0, stats
    assert stats["counts"]["connections"] >= 3
    file_traces = connection_traces(read_jsonl(out), lab.http_port)
    for res in (first, second, third):
        file_traces[res.local_port].assert_nested()
    received = connection_traces(receiver_ok.spans(), lab.http_port)
    assert second.local_port not in received and third.local_port not in received


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

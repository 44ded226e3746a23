"""EnvoyLab (lab/lab.py): finding Envoy, start-up failures, stopping, and (as root) real labs: the ``lab``
fixture of conftest.py, a second lab beside it, RSA certificates without session resumption."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from otel_envoy.lab import EnvoyLab, find_envoy_binary
from otel_envoy.lab.clients import curl_plain, curl_tls
from otel_envoy.lab.lab import ENVOY_BINARY_ENV, terminate_process
from tests.support.lab import root

# ------------------------------------------------------------------ no Envoy process needed


def test_find_envoy_binary_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    not_exec = tmp_path / "envoy"
    not_exec.write_text("")
    monkeypatch.setenv(ENVOY_BINARY_ENV, str(not_exec))
    with pytest.raises(RuntimeError, match=ENVOY_BINARY_ENV):
        find_envoy_binary()
    not_exec.chmod(0o755)
    assert find_envoy_binary() == not_exec


def test_startup_failure_reports_stderr(tmp_path: Path) -> None:
    fake = tmp_path / "fake-envoy"
    fake.write_text("#!/bin/sh\necho 'fake envoy: cannot load bootstrap: kaboom' >&2\nexit 3\n")
    fake.chmod(0o755)
    lab = EnvoyLab(envoy_binary=fake, startup_timeout=10)
    with pytest.raises(RuntimeError, match=r"(?s)exited with 3.*kaboom"):
        lab.start()
    # nothing left behind: backend stopped, workdir removed
    assert lab.workdir is not None and not lab.workdir.exists()
    assert not lab.running


def test_terminate_escalates_to_sigkill() -> None:
    code = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "print('up', flush=True); time.sleep(60)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "up"
    t0 = time.monotonic()
    terminate_process(proc, grace=0.5)
    assert proc.returncode == -9
    assert 0.4 <= time.monotonic() - t0 < 5
    proc.stdout.close()


# ------------------------------------------------------------------ real Envoy (root)


@root
def test_lab_is_up(lab: EnvoyLab) -> None:
    assert lab.running
    assert Path(f"/proc/{lab.pid}/exe").resolve() == lab.envoy_binary.resolve()
    assert lab.admin_get("/ready").strip() == "LIVE"
    assert lab.admin_url == f"http://127.0.0.1:{lab.admin_port}"
    assert lab.ca_path.is_file() and lab.workdir is not None and lab.workdir.is_dir()
    ids = lab.worker_thread_ids()
    assert len(ids) == 2
    assert all(Path(f"/proc/{lab.pid}/task/{tid}").exists() for tid in ids)
    assert set(lab.worker_threads()) == {"wrk:worker_0", "wrk:worker_1"}


@root
def test_second_lab_direct_response_pinned_and_stopped(lab: EnvoyLab) -> None:
    """A second Envoy coexists with the first; direct_response skips the backend; stop cleans up."""
    cpu = min(os.sched_getaffinity(0))
    other = EnvoyLab(concurrency=1, direct_response=True, cpu=cpu)
    with other:
        assert other.pid != lab.pid and other.base_id != lab.base_id
        assert os.sched_getaffinity(other.pid) == {cpu}
        assert all(os.sched_getaffinity(tid) == {cpu} for tid in other.worker_thread_ids())
        r = curl_plain(other.http_port)
        assert r.ok and r.body == "ok"
        t = curl_tls(other.tls_port, "b.example.com", "http/1.1", "1.2", other.ca_path)
        assert t.ok and t.body == "ok"
        upstream = other.stats(r"^cluster\.backend\.upstream_rq_total$")
        assert upstream.get("cluster.backend.upstream_rq_total") == 0
        pids, workdir = (other.pid, other.backend_pid), other.workdir
    assert workdir is not None and not workdir.exists()
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
    assert lab.running and curl_plain(lab.http_port).ok


def _tls12_resumed(port: int, session_file: Path) -> tuple[bool, str]:
    """Two TLS 1.2 handshakes with openssl s_client, the second offering the first one's session:
    (was it resumed, the second handshake's output). When the server offered neither a session id nor a
    ticket, s_client saves no session: (False, the first handshake's output)."""
    outputs = []
    for flag in ("-sess_out", "-sess_in"):
        if flag == "-sess_in" and not session_file.exists():
            return False, outputs[0]
        proc = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername",
                               "a.example.com", "-tls1_2", flag, str(session_file)],
                              input="", capture_output=True, text=True, timeout=20, check=False)  # fmt: skip
        assert "Cipher is" in proc.stdout, proc.stdout + proc.stderr
        outputs.append(proc.stdout)
    return "Reused, TLSv1.2" in outputs[1], outputs[1]


@root
def test_lab_rsa_without_session_resumption(lab: EnvoyLab, tmp_path: Path) -> None:
    """key_type="rsa" serves RSA 2048 certificates; session_resumption=False makes every handshake full
    (the module's lab, with the defaults, resumes)."""
    resumed, out = _tls12_resumed(lab.tls_port, tmp_path / "default.session")
    assert resumed, out
    with EnvoyLab(concurrency=1, direct_response=True, key_type="rsa", session_resumption=False) as other:
        resumed, out = _tls12_resumed(other.tls_port, tmp_path / "full.session")
        assert not resumed and "New, TLSv1.2" in out and "TLS session ticket:" not in out, out
        assert "Server public key is 2048 bit" in out
        t = curl_tls(other.tls_port, "b.example.com", "h2", "1.3", other.ca_path)
        assert t.ok and t.body == "ok"


@root
def test_bad_envoy_flag_gives_clear_error() -> None:
    bad = EnvoyLab(extra_args=["--no-such-flag"], startup_timeout=20)
    with pytest.raises(RuntimeError, match=r"(?s)Envoy exited.*no-such-flag"):
        bad.start()
    assert not bad.running

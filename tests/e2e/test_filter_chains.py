"""envoy.filter_chain.name on downstream connections, checked against Envoy's own access log.

A real Envoy with one listener on two ports whose six filter chains are chosen by SNI (exact and wildcard),
destination port, ALPN and transport protocol, plus a default chain; its listeners come from a file (LDS),
so the test can change them while the daemon runs. Every chain is a tcp_proxy whose access log writes the
connection's source port and ``%FILTER_CHAIN_NAME%``: the span of each connection must name the same chain.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from otel_envoy.lab.certs import generate_certs
from otel_envoy.lab.lab import find_envoy_binary, terminate_process
from tests.support.daemon import DaemonProcess
from tests.support.otlp_receiver import OtlpReceiver
from tests.support.replay import cli, read_jsonl
from tests.support.traces import connection_traces

pytestmark = pytest.mark.root

_LISTENER = "type.googleapis.com/envoy.config.listener.v3.Listener"
_TCP_PROXY = "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy"
_FILE_LOG = "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog"
_TLS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"
_LOG_LINE = "%DOWNSTREAM_LOCAL_PORT% %DOWNSTREAM_REMOTE_PORT% %FILTER_CHAIN_NAME%\n"
_INPUT = "type.googleapis.com/envoy.extensions.matching.common_inputs.network.v3."
_TLS_INSPECTOR = "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _addr(port: int) -> dict[str, Any]:
    return {"socket_address": {"address": "127.0.0.1", "port_value": port}}


class ChainLab:
    """Envoy with the listener ``fc_lab`` (ports ``port`` and ``port2``) from an LDS file."""

    def __init__(self, workdir: Path, matcher: bool = False) -> None:
        self.workdir = workdir
        self.matcher = matcher  # chains chosen by a filter_chain_matcher instead of filter_chain_match
        self.certs = generate_certs(workdir / "certs")
        self.admin_port, self.port, self.port2 = _free_port(), _free_port(), _free_port()
        self.access_log = workdir / "access.log"
        self.lds = workdir / "lds.json"
        self.version = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def _chain(self, name: str, match: dict[str, Any] | None, tls: bool = True) -> dict[str, Any]:
        chain: dict[str, Any] = {"name": name}
        if match:
            chain["filter_chain_match"] = match
        chain["filters"] = [{"name": "envoy.filters.network.tcp_proxy", "typed_config": {
            "@type": _TCP_PROXY, "stat_prefix": name, "cluster": "sink",
            "access_log": [{"name": "envoy.access_loggers.file", "typed_config": {
                "@type": _FILE_LOG, "path": str(self.access_log),
                "log_format": {"text_format_source": {"inline_string": _LOG_LINE}}}}]}}]
        if tls:
            cert = self.certs.a
            chain["transport_socket"] = {"name": "envoy.transport_sockets.tls", "typed_config": {
                "@type": _TLS, "common_tls_context": {"tls_certificates": [{
                    "certificate_chain": {"filename": str(cert.cert_path)},
                    "private_key": {"filename": str(cert.key_path)}}]}}}
        return chain

    def _matcher(self, exact_name: str, exact_sni: str) -> dict[str, Any]:
        def chain(name: str) -> dict[str, Any]:
            return {"action": {"name": name, "typed_config": {
                "@type": "type.googleapis.com/google.protobuf.StringValue", "value": name}}}

        def rule(input_name: str, value_match: dict[str, str], then: str) -> dict[str, Any]:
            return {"predicate": {"single_predicate": {
                "input": {"name": input_name, "typed_config": {"@type": _INPUT + input_name}},
                "value_match": value_match}}, "on_match": chain(then)}

        by_name = {"matcher_tree": {
            "input": {"name": "sni", "typed_config": {"@type": _INPUT + "ServerNameInput"}},
            "exact_match_map": {"map": {exact_sni: chain(exact_name)}}},
            "on_no_match": {"matcher": {"matcher_list": {"matchers": [
                rule("ServerNameInput", {"suffix": ".example.com"}, "chain_wild"),
                rule("ApplicationProtocolInput", {"contains": "'h2'"}, "chain_h2"),
                rule("TransportProtocolInput", {"exact": "raw_buffer"}, "chain_plain"),
            ]}}}}
        return {"matcher_tree": {
            "input": {"name": "port", "typed_config": {"@type": _INPUT + "DestinationPortInput"}},
            "exact_match_map": {"map": {str(self.port2): chain("chain_port2")}}},
            "on_no_match": {"matcher": by_name}}

    def write_listener(self, exact_name: str, exact_sni: str) -> None:
        """(Re)write the LDS file: Envoy picks it up when it is moved into place."""
        self.version += 1
        listener = {
            "@type": _LISTENER,
            "name": "fc_lab",
            "address": _addr(self.port),
            "additional_addresses": [{"address": _addr(self.port2)}],
            "listener_filters": [{"name": "envoy.filters.listener.tls_inspector",
                                  "typed_config": {"@type": _TLS_INSPECTOR}}],
            "filter_chains": [
                self._chain(exact_name, {"server_names": [exact_sni]}),
                self._chain("chain_wild", {"server_names": ["*.example.com"]}),
                self._chain("chain_h2", {"application_protocols": ["h2"]}),
                self._chain("chain_port2", {"destination_port": self.port2}),
                self._chain("chain_plain", {"transport_protocol": "raw_buffer"}, tls=False),
            ],
            "default_filter_chain": self._chain("chain_default", None),
        }
        if self.matcher:  # the same choices as a matcher tree (Envoy then ignores filter_chain_match)
            listener["filter_chain_matcher"] = self._matcher(exact_name, exact_sni)
        tmp = self.workdir / "lds.json.tmp"
        tmp.write_text(json.dumps({"version_info": str(self.version), "resources": [listener]}))
        tmp.rename(self.lds)

    def active_chains(self) -> list[str]:
        """The names of the active listener's filter chains, from Envoy's configuration dump (its
        version_info stays at the first version across in-place filter-chain updates)."""
        with urllib.request.urlopen(self.admin_url + "/config_dump?resource=dynamic_listeners",
                                    timeout=2) as resp:
            body = json.load(resp)
        return [chain.get("name", "") for c in body.get("configs", [])
                for chain in c.get("active_state", {}).get("listener", {}).get("filter_chains", [])]

    def start(self) -> ChainLab:
        self.write_listener("chain_exact", "alpha.example.com")
        bootstrap = {
            "node": {"id": "fc-lab", "cluster": "fc-lab"},
            "admin": {"address": _addr(self.admin_port)},
            "dynamic_resources": {"lds_config": {"path_config_source": {
                "path": str(self.lds), "watched_directory": {"path": str(self.workdir)}},
                                                 "resource_api_version": "V3"}},
            "static_resources": {"clusters": [{
                "name": "sink", "type": "STATIC", "connect_timeout": "1s",
                "load_assignment": {"cluster_name": "sink", "endpoints": [{"lb_endpoints": [
                    {"endpoint": {"address": _addr(self.admin_port)}}]}]}}]},
        }
        config = self.workdir / "envoy.json"
        config.write_text(json.dumps(bootstrap))
        log = (self.workdir / "envoy.log").open("wb")
        self.proc = subprocess.Popen(
            [str(find_envoy_binary()), "-c", str(config), "--concurrency", "1", "-l", "warn",
             "--base-id", str(40000 + os.getpid() % 20000)], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if "chain_exact" in self.active_chains() and _listening(self.port) and _listening(self.port2):
                    return self
            except OSError:
                pass
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        raise RuntimeError((self.workdir / "envoy.log").read_text()[-3000:])

    def stop(self) -> None:
        terminate_process(self.proc)

    def logged_chains(self) -> dict[tuple[int, int], str]:
        """(Envoy's port, the client's port) -> %FILTER_CHAIN_NAME% from the access log."""
        out = {}
        for line in self.access_log.read_text().splitlines():
            local, remote, name = line.split(" ", 2)
            out[(int(local), int(remote))] = name
        return out


_SOURCE_PORTS = iter(range(20000 + os.getpid() % 5000, 32000))  # below the kernel's ephemeral range


def _connect(port: int) -> socket.socket:
    """A connection from a source port no other connection of this test used (the test tells connections
    apart by their ports; the kernel's own choice may reuse a port on loopback)."""
    for source_port in _SOURCE_PORTS:
        s = socket.socket()
        try:
            s.bind(("127.0.0.1", source_port))
        except OSError:  # taken by someone else
            s.close()
            continue
        s.settimeout(5)
        s.connect(("127.0.0.1", port))
        return s
    raise RuntimeError("no source port left")


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _tls_connection(port: int, sni: str | None, alpn: list[str]) -> tuple[int, int]:
    """A TLS handshake (SNI and ALPN as given, or none), then close; returns (Envoy's port, the client's)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if alpn:
        ctx.set_alpn_protocols(alpn)
    raw = _connect(port)
    local_port = raw.getsockname()[1]
    with ctx.wrap_socket(raw, server_hostname=sni) as tls:
        tls.do_handshake()
    return port, local_port


def _plain_connection(port: int) -> tuple[int, int]:
    with _connect(port) as s:
        local_port = s.getsockname()[1]
        s.sendall(b"hello\r\n")
        time.sleep(0.01)
    return port, local_port


#: (what the client does, the chain Envoy's matching order gives on the first configuration)
KINDS: list[tuple[str, Any, str]] = [
    ("exact SNI", lambda lab: _tls_connection(lab.port, "alpha.example.com", ["http/1.1"]), "chain_exact"),
    ("wildcard SNI", lambda lab: _tls_connection(lab.port, "beta.example.com", ["h2"]), "chain_wild"),
    ("deep wildcard SNI", lambda lab: _tls_connection(lab.port, "a.b.example.com", []), "chain_wild"),
    ("ALPN h2, other SNI", lambda lab: _tls_connection(lab.port, "other.test", ["h2", "http/1.1"]),
     "chain_h2"),
    ("no SNI, ALPN http/1.1", lambda lab: _tls_connection(lab.port, None, ["http/1.1"]), "chain_default"),
    ("second port", lambda lab: _tls_connection(lab.port2, "alpha.example.com", ["h2"]), "chain_port2"),
    ("plaintext", lambda lab: _plain_connection(lab.port), "chain_plain"),
]


def _chains_of(spans: list, port: int) -> dict[tuple[int, int], dict[str, Any]]:
    """(Envoy's port, the client's port) -> the connection span's attributes."""
    return {(port, peer): trace.root.attributes for peer, trace in connection_traces(spans, port).items()}


@pytest.mark.parametrize("matcher", [False, True], ids=["filter_chain_match", "filter_chain_matcher"])
def test_filter_chain_names_equal_envoy_s_access_log(tmp_path: Path, matcher: bool) -> None:
    """210 connections of seven kinds, then 40 after the listener changed: the span a real OTLP/gRPC
    receiver got names the chain Envoy's access log names, every time."""
    lab = ChainLab(tmp_path, matcher=matcher).start()
    summary, events = tmp_path / "summary.json", tmp_path / "run.events"
    daemon = None
    receiver = OtlpReceiver().start()
    try:
        daemon = DaemonProcess(["--pid", str(lab.proc.pid), "--envoy-admin", lab.admin_url,  # type: ignore[union-attr]
                                "--cpu-budget", "0", "--otlp-endpoint", receiver.grpc_endpoint,
                                "--otlp-protocol", "grpc", "--summary-json", str(summary),
                                "--record", str(events)],
                               tmp_path).start()
        expected: dict[tuple[int, int], str] = {}
        for i in range(210):  # 30 of each kind
            _what, connect, chain = KINDS[i % len(KINDS)]
            expected[connect(lab)] = chain

        # the listener changes: the exact chain is renamed and matches another name; alpha.example.com
        # now falls to the wildcard chain
        lab.write_listener("chain_exact_v2", "gamma.example.com")
        deadline = time.monotonic() + 15
        while "chain_exact_v2" not in lab.active_chains():
            assert time.monotonic() < deadline, "Envoy did not load the new listener"
            time.sleep(0.2)
        time.sleep(6.5)  # the daemon reads the configuration dump every 5 s
        after: dict[tuple[int, int], str] = {}
        for _ in range(20):
            after[_tls_connection(lab.port, "alpha.example.com", [])] = "chain_wild"
            after[_tls_connection(lab.port, "gamma.example.com", [])] = "chain_exact_v2"
        time.sleep(1.0)
    finally:
        code = daemon.stop() if daemon is not None else None  # flushes every span to the receiver
        lab.stop()
        receiver.stop()
    assert code == 0, daemon.stderr() if daemon else ""

    logged = lab.logged_chains()
    assert len(expected) == 210 and len(after) == 40
    for port, chain in {**expected, **after}.items():  # our reading of Envoy's rules, checked by Envoy
        assert logged.get(port) == chain, (port, chain, logged.get(port))

    spans = receiver.spans()
    attrs = {**_chains_of(spans, lab.port), **_chains_of(spans, lab.port2)}
    wrong = {port: (logged[port], attrs.get(port, {}).get("envoy.filter_chain.name"),
                    attrs.get(port, {}).get("envoy.filter_chain.not_inferred_reason"))
             for port in expected if attrs.get(port, {}).get("envoy.filter_chain.name") != logged[port]}
    assert not wrong, f"{len(wrong)} of {len(expected)} connections: {dict(list(wrong.items())[:10])}"
    assert all(attrs[p]["envoy.filter_chain.inferred"] is True for p in expected)
    defaults = [p for p in expected if attrs[p].get("envoy.filter_chain.default")]
    assert len(defaults) == 30, [(p, attrs[p]) for p in expected
                                 if expected[p] == "chain_default" and p not in defaults]

    wrong_after = {port: (logged[port], attrs.get(port, {}).get("envoy.filter_chain.name"))
                   for port in after if attrs.get(port, {}).get("envoy.filter_chain.name") != logged[port]}
    assert not wrong_after, wrong_after

    # a replay of the run's recording decides the same chains (the configurations travel in it)
    replayed = tmp_path / "replayed.jsonl"
    proc = cli("replay", events, "--output", replayed)
    assert proc.returncode == 0, proc.stderr
    again = read_jsonl(replayed)
    attrs_again = {**_chains_of(again, lab.port), **_chains_of(again, lab.port2)}
    name = "envoy.filter_chain.name"
    differ = [p for p in {**expected, **after} if attrs_again.get(p, {}).get(name) != attrs[p].get(name)]
    assert not differ, differ[:10]

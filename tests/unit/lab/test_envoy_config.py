"""The lab's Envoy configuration (lab/envoy_config.py): its structure, and Envoy's own validation."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from otel_envoy.lab import LabPorts, generate_certs, render_envoy_config
from otel_envoy.lab.envoy_config import (
    CHAIN_SERVER_NAMES,
    free_ports,
    otel_collector_cluster,
    otel_tracing,
    write_envoy_config,
)
from tests.support.lab import ENVOY, needs_envoy


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

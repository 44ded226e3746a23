"""Envoy bootstrap configuration for the lab.

Two listeners on 127.0.0.1 (or the ``address`` given):

* ``plain_http``: a plain HTTP connection manager (codec AUTO: HTTP/1.1 and h2c prior knowledge);
* ``tls_sni``: ``envoy.filters.listener.tls_inspector`` picks a filter chain by SNI: ``chain_a``
  (``a.example.com``), ``chain_b`` (``b.example.com``) or ``chain_default`` (no/unknown SNI, certificate a).
  Every chain terminates TLS 1.2-1.3 with ALPN ``h2``/``http/1.1``; its HCM has ``stat_prefix`` equal to the
  chain name, so ``http.chain_a.downstream_rq_total`` etc. tell which chain served a request.

Every HCM routes to the cluster ``backend`` (127.0.0.1:backend_port), or answers ``200 ok`` directly with
``direct_response=True`` (to measure Envoy alone).

Envoy's own OpenTelemetry tracer: :func:`otel_tracing` (the HCM ``tracing`` block),
:func:`otel_collector_cluster` (the OTLP/gRPC cluster it exports to) and :data:`OTEL_FAST_FLUSH_RUNTIME` (a
runtime layer making it export every finished span within ~100 ms instead of batching for 5 s).
"""

from __future__ import annotations

import copy
import json
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from otel_envoy.lab.certs import LabCerts, ServerCert

PLAIN_LISTENER = "plain_http"
TLS_LISTENER = "tls_sni"
CHAIN_A = "chain_a"
CHAIN_B = "chain_b"
CHAIN_DEFAULT = "chain_default"
BACKEND_CLUSTER = "backend"
OTEL_COLLECTOR_CLUSTER = "otel_collector"
LISTENER_NAMES: tuple[str, ...] = (PLAIN_LISTENER, TLS_LISTENER)
#: chain name -> SNI it matches (None: the default chain)
CHAIN_SERVER_NAMES: dict[str, str | None] = {
    CHAIN_A: "a.example.com",
    CHAIN_B: "b.example.com",
    CHAIN_DEFAULT: None,
}

_HCM_TYPE = (
    "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
)
_ROUTER_TYPE = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
_TLS_INSPECTOR_TYPE = "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector"
_DOWNSTREAM_TLS_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"
_HTTP_PROTOCOL_OPTIONS_TYPE = "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
_OTEL_TRACER_TYPE = "type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig"
#: runtime keys of Envoy's OpenTelemetry tracer: flush every 100 ms, or as soon as one span is finished
#: (Envoy's defaults: 5000 ms, 5 spans)
OTEL_FAST_FLUSH_RUNTIME: dict[str, Any] = {
    "tracing.opentelemetry.flush_interval_ms": 100,
    "tracing.opentelemetry.min_flush_spans": 1,
}


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """Return ``n`` distinct TCP ports free on ``host`` a moment ago (bound together, then closed)."""
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass(frozen=True)
class LabPorts:
    """The three ports Envoy listens on (all on 127.0.0.1)."""

    admin_port: int
    http_port: int
    tls_port: int

    @classmethod
    def pick(cls) -> LabPorts:
        """Pick three distinct free ports on 127.0.0.1."""
        admin, http, tls = free_ports(3)
        return cls(admin_port=admin, http_port=http, tls_port=tls)


def _addr(port: int, host: str = "127.0.0.1") -> dict[str, Any]:
    return {"socket_address": {"address": host, "port_value": port}}


def _hcm(stat_prefix: str, direct_response: bool, tracing: dict[str, Any] | None) -> dict[str, Any]:
    if direct_response:
        route: dict[str, Any] = {
            "match": {"prefix": "/"},
            "direct_response": {"status": 200, "body": {"inline_string": "ok"}},
        }
    else:
        route = {"match": {"prefix": "/"}, "route": {"cluster": BACKEND_CLUSTER}}
    cfg: dict[str, Any] = {
        "@type": _HCM_TYPE,
        "stat_prefix": stat_prefix,
        "codec_type": "AUTO",
        "route_config": {
            "name": f"{stat_prefix}_routes",
            "virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [route]}],
        },
        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {"@type": _ROUTER_TYPE}}],
    }
    if tracing is not None:
        cfg["tracing"] = copy.deepcopy(tracing)
    return {"name": "envoy.filters.network.http_connection_manager", "typed_config": cfg}


def _tls_socket(cert: ServerCert, session_resumption: bool = True) -> dict[str, Any]:
    resumption = {} if session_resumption else {
        "disable_stateless_session_resumption": True,  # no session tickets (TLS 1.2 tickets, TLS 1.3 PSKs)
        "disable_stateful_session_resumption": True,  # no session-id cache (TLS 1.2)
    }
    return {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": _DOWNSTREAM_TLS_TYPE,
            **resumption,
            "common_tls_context": {
                "tls_params": {
                    "tls_minimum_protocol_version": "TLSv1_2",
                    "tls_maximum_protocol_version": "TLSv1_3",
                },
                "alpn_protocols": ["h2", "http/1.1"],
                "tls_certificates": [
                    {
                        "certificate_chain": {"filename": str(cert.cert_path)},
                        "private_key": {"filename": str(cert.key_path)},
                    }
                ],
            },
        },
    }


def _tls_chain(name: str, cert: ServerCert, server_name: str | None, direct_response: bool,
               tracing: dict[str, Any] | None, session_resumption: bool = True) -> dict[str, Any]:
    chain: dict[str, Any] = {"name": name}
    if server_name is not None:
        chain["filter_chain_match"] = {"server_names": [server_name]}
    chain["filters"] = [_hcm(name, direct_response, tracing)]
    chain["transport_socket"] = _tls_socket(cert, session_resumption)
    return chain


def render_envoy_config(
    ports: LabPorts,
    certs: LabCerts,
    backend_port: int,
    concurrency: int = 1,
    direct_response: bool = False,
    tracing: dict[str, Any] | None = None,
    extra_clusters: list[dict[str, Any]] | None = None,
    runtime: dict[str, Any] | None = None,
    session_resumption: bool = True,
    extra_listeners: list[dict[str, Any]] | None = None,
    tls_reuse_port: bool = True,
    address: str = "127.0.0.1",
) -> dict[str, Any]:
    """Return the lab's Envoy bootstrap as a dict (dump it as YAML/JSON for ``envoy -c``).

    ``session_resumption=False`` turns off TLS session resumption on every TLS filter chain (tickets and
    the session cache), so each TLS connection makes a full handshake: clients such as wrk otherwise resume
    the session of their first connection on every later one.

    ``tracing`` is copied verbatim into every HCM's ``tracing`` field (see :func:`otel_tracing`); clusters
    it needs (e.g. :func:`otel_collector_cluster`) go in ``extra_clusters``; ``extra_listeners`` are added
    as given (e.g. :func:`tcp_proxy_listener`). ``runtime`` becomes a static
    runtime layer (e.g. :data:`OTEL_FAST_FLUSH_RUNTIME`); without it the bootstrap has no ``layered_runtime``.
    ``tls_reuse_port=False``: the TLS listener has one socket, duplicated for each worker, instead of one
    ``SO_REUSEPORT`` socket per worker (``enable_reuse_port``).
    ``address``: where the listeners and the admin API listen (the backend stays on 127.0.0.1).
    ``concurrency`` is not part of the bootstrap (it is Envoy's ``--concurrency`` flag); it is recorded in
    the node metadata.
    """
    clusters: list[dict[str, Any]] = [static_cluster(BACKEND_CLUSTER, backend_port)]
    clusters.extend(copy.deepcopy(extra_clusters or []))
    config: dict[str, Any] = {
        "node": {
            "id": "otel-envoy-lab",
            "cluster": "otel-envoy-lab",
            "metadata": {"concurrency": concurrency, "direct_response": direct_response},
        },
        "admin": {"address": _addr(ports.admin_port, address)},
        "static_resources": {
            "listeners": [
                {
                    "name": PLAIN_LISTENER,
                    "stat_prefix": PLAIN_LISTENER,
                    "address": _addr(ports.http_port, address),
                    "filter_chains": [{"filters": [_hcm(PLAIN_LISTENER, direct_response, tracing)]}],
                },
                {
                    "name": TLS_LISTENER,
                    "stat_prefix": TLS_LISTENER,
                    "address": _addr(ports.tls_port, address),
                    "enable_reuse_port": tls_reuse_port,
                    "listener_filters": [
                        {
                            "name": "envoy.filters.listener.tls_inspector",
                            "typed_config": {"@type": _TLS_INSPECTOR_TYPE},
                        }
                    ],
                    "filter_chains": [
                        _tls_chain(CHAIN_A, certs.a, CHAIN_SERVER_NAMES[CHAIN_A], direct_response, tracing,
                                   session_resumption),
                        _tls_chain(CHAIN_B, certs.b, CHAIN_SERVER_NAMES[CHAIN_B], direct_response, tracing,
                                   session_resumption),
                    ],
                    "default_filter_chain": _tls_chain(
                        CHAIN_DEFAULT, certs.a, None, direct_response, tracing, session_resumption
                    ),
                },
            ],
            "clusters": clusters,
        },
    }
    config["static_resources"]["listeners"].extend(copy.deepcopy(extra_listeners or []))
    if runtime:
        config["layered_runtime"] = {"layers": [{"name": "static", "static_layer": copy.deepcopy(runtime)}]}
    return config


_TCP_PROXY_TYPE = "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy"


def tcp_proxy_listener(name: str, port: int, cluster: str, host: str = "127.0.0.1") -> dict[str, Any]:
    """A listener on ``host:port`` whose connections Envoy's ``tcp_proxy`` relays, bytes as they are, to
    ``cluster`` (a database or broker behind Envoy, as a mesh sidecar carries it)."""
    return {
        "name": name,
        "stat_prefix": name,
        "address": _addr(port, host),
        "filter_chains": [{"filters": [{
            "name": "envoy.filters.network.tcp_proxy",
            "typed_config": {"@type": _TCP_PROXY_TYPE, "stat_prefix": name, "cluster": cluster},
        }]}],
    }


def static_cluster(name: str, port: int, host: str = "127.0.0.1") -> dict[str, Any]:
    """A cluster of one endpoint, ``host:port``."""
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {"cluster_name": name,
                            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _addr(port, host)}}]}]},
    }


def otel_collector_cluster(port: int, host: str = "127.0.0.1") -> dict[str, Any]:
    """An HTTP/2 cluster ``otel_collector`` pointing at an OTLP/gRPC collector (for :func:`otel_tracing`)."""
    return {
        "name": OTEL_COLLECTOR_CLUSTER,
        "type": "STATIC" if host.replace(".", "").isdigit() else "STRICT_DNS",
        "connect_timeout": "1s",
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": _HTTP_PROTOCOL_OPTIONS_TYPE,
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        },
        "load_assignment": {
            "cluster_name": OTEL_COLLECTOR_CLUSTER,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _addr(port, host)}}]}],
        },
    }


def otel_tracing(service_name: str = "envoy-lab", sampling_percent: float = 100.0) -> dict[str, Any]:
    """An HCM ``tracing`` block using Envoy's OpenTelemetry tracer over the ``otel_collector`` cluster."""
    return {
        "random_sampling": {"value": sampling_percent},
        "provider": {
            "name": "envoy.tracers.opentelemetry",
            "typed_config": {
                "@type": _OTEL_TRACER_TYPE,
                "grpc_service": {"envoy_grpc": {"cluster_name": OTEL_COLLECTOR_CLUSTER}, "timeout": "1s"},
                "service_name": service_name,
            },
        },
    }


def write_envoy_config(config: dict[str, Any], path: str | Path) -> Path:
    """Write ``config`` to ``path`` as YAML (``.yaml``/``.yml``) or JSON (anything else); return the path."""
    p = Path(path)
    if p.suffix in (".yaml", ".yml"):
        import yaml  # pyyaml is a test extra, not a runtime dependency: JSON needs nothing

        p.write_text(yaml.safe_dump(config, sort_keys=False))
    else:
        p.write_text(json.dumps(config, indent=2))
    return p

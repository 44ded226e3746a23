"""A local lab for otel-envoy: a real Envoy with a plain HTTP and an SNI-routed TLS listener, a backend,
self-signed certificates and real clients. Used by the demo, the integration tests and the benchmark."""

from otel_envoy.lab.certs import LabCerts, ServerCert, generate_certs
from otel_envoy.lab.envoy_config import LabPorts, render_envoy_config, write_envoy_config
from otel_envoy.lab.lab import EnvoyLab, find_envoy_binary

__all__ = [
    "EnvoyLab",
    "LabCerts",
    "LabPorts",
    "ServerCert",
    "find_envoy_binary",
    "generate_certs",
    "render_envoy_config",
    "write_envoy_config",
]

"""OTLP endpoint settings: CLI flags and the standard ``OTEL_EXPORTER_OTLP_*`` variables.

Precedence follows the OpenTelemetry exporter specification, with the command line on top:

* endpoint: ``--otlp-endpoint`` > ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` > ``OTEL_EXPORTER_OTLP_ENDPOINT``
* protocol: ``--otlp-protocol`` > ``OTEL_EXPORTER_OTLP_TRACES_PROTOCOL`` > ``OTEL_EXPORTER_OTLP_PROTOCOL``
  > ``http/protobuf`` (the specification's default).

For ``http/protobuf`` the signal-specific variable is used as-is (it is the full URL), while a base
endpoint (CLI or ``OTEL_EXPORTER_OTLP_ENDPOINT``) gets ``/v1/traces`` appended.

Headers, timeouts, certificates and compression come from the usual variables too, read by the OTLP
senders (:mod:`otel_envoy.export.otlp_grpc`, :mod:`otel_envoy.export.otlp_http`) as the SDK's span
exporters read them: the ``OTEL_EXPORTER_OTLP_TRACES_*`` variable first, then ``OTEL_EXPORTER_OTLP_*``
(:func:`otlp_env`, :func:`otlp_headers`, :func:`otlp_timeout`, :func:`credential_provider`).
"""

from __future__ import annotations

import errno
import logging
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any
from urllib.parse import urlsplit

from opentelemetry.util.re import parse_env_headers

__all__ = [
    "DEFAULT_PORTS",
    "DEFAULT_TIMEOUT_S",
    "PROTOCOLS",
    "TRACES_PATH",
    "OtlpSettings",
    "check_reachable",
    "credential_provider",
    "endpoint_host_port",
    "otlp_env",
    "otlp_headers",
    "otlp_timeout",
    "resolve_otlp_settings",
    "traces_url",
]

log = logging.getLogger("otel_envoy.export.otlp")

PROTOCOLS = ("grpc", "http/protobuf")
TRACES_PATH = "/v1/traces"
#: Default OTLP ports, used when an endpoint names neither a port nor an http(s) scheme.
DEFAULT_PORTS = {"grpc": 4317, "http/protobuf": 4318}

_ENDPOINT = "OTEL_EXPORTER_OTLP_ENDPOINT"
_TRACES_ENDPOINT = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
_PROTOCOL = "OTEL_EXPORTER_OTLP_PROTOCOL"
_TRACES_PROTOCOL = "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"
#: Seconds one export may take (retries included) when neither the caller nor the environment says.
DEFAULT_TIMEOUT_S = 10.0
_CREDENTIAL_PROVIDERS = "opentelemetry_otlp_credential_provider"  # the SDK's entry-point group


@dataclass(frozen=True, slots=True)
class OtlpSettings:
    """Where and how to send spans over OTLP.

    ``endpoint`` is the endpoint as configured (for messages); ``export_endpoint`` is the exact
    value to hand the SDK exporter (for ``http/protobuf`` the full ``.../v1/traces`` URL).
    ``source`` says where the endpoint came from (``"cli"`` or the environment variable name).
    """

    endpoint: str
    protocol: str
    export_endpoint: str
    source: str

    @property
    def display(self) -> str:
        """A short human description, e.g. ``"http/protobuf http://127.0.0.1:4318/v1/traces"``."""
        return f"{self.protocol} {self.export_endpoint}"


def _normalise_protocol(value: str, origin: str) -> str:
    proto = value.strip().lower()
    if proto in PROTOCOLS:
        return proto
    if proto == "http/json":
        raise ValueError(f"{origin}: OTLP protocol 'http/json' is not supported (use grpc or http/protobuf)")
    raise ValueError(f"{origin}: unknown OTLP protocol {value!r} (expected grpc or http/protobuf)")


def traces_url(base: str) -> str:
    """Append ``/v1/traces`` to a base OTLP/HTTP endpoint unless it already ends with it."""
    trimmed = base.rstrip("/")
    if trimmed.endswith(TRACES_PATH):
        return trimmed
    return trimmed + TRACES_PATH


def resolve_otlp_settings(
    cli_endpoint: str | None,
    cli_protocol: str | None,
    env: Mapping[str, str] = os.environ,
) -> OtlpSettings | None:
    """Combine CLI flags and ``OTEL_EXPORTER_OTLP_*`` variables; ``None`` when no endpoint is set.

    Raises ``ValueError`` with a one-line message for an unsupported protocol.
    """

    def get(name: str) -> str | None:
        value = env.get(name)
        return value.strip() if value and value.strip() else None

    if cli_protocol and cli_protocol.strip():
        protocol = _normalise_protocol(cli_protocol, "--otlp-protocol")
    elif (p := get(_TRACES_PROTOCOL)) is not None:
        protocol = _normalise_protocol(p, _TRACES_PROTOCOL)
    elif (p := get(_PROTOCOL)) is not None:
        protocol = _normalise_protocol(p, _PROTOCOL)
    else:
        protocol = "http/protobuf"

    if cli_endpoint and cli_endpoint.strip():
        endpoint, source, full_url = cli_endpoint.strip(), "cli", False
    elif (e := get(_TRACES_ENDPOINT)) is not None:
        endpoint, source, full_url = e, _TRACES_ENDPOINT, True
    elif (e := get(_ENDPOINT)) is not None:
        endpoint, source, full_url = e, _ENDPOINT, False
    else:
        return None

    if protocol == "http/protobuf":
        export_endpoint = endpoint if full_url else traces_url(endpoint)
    else:
        export_endpoint = endpoint
    return OtlpSettings(endpoint=endpoint, protocol=protocol, export_endpoint=export_endpoint, source=source)


def endpoint_host_port(endpoint: str, protocol: str) -> tuple[str, int]:
    """The ``(host, port)`` an exporter for ``endpoint`` connects to.

    An explicit port wins; otherwise ``http://`` means 80 and ``https://`` 443 (what the exporters
    themselves use); a bare ``host`` falls back to the OTLP default port of ``protocol``.
    """
    text = endpoint.strip()
    parts = urlsplit(text if "://" in text else "//" + text)
    host = parts.hostname
    if not host:
        raise ValueError(f"OTLP endpoint {endpoint!r} has no host")
    try:
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"OTLP endpoint {endpoint!r} has an invalid port") from exc
    if port is None:
        scheme = parts.scheme.lower()
        if scheme == "https":
            port = 443
        elif scheme == "http":
            port = 80
        else:
            port = DEFAULT_PORTS.get(protocol, 4318)
    return host, port


def check_reachable(settings: OtlpSettings, timeout: float = 2.0) -> str | None:
    """TCP-connect to the OTLP endpoint; a one-line error message, or ``None`` if it answered.

    Example message: ``OTLP endpoint http://127.0.0.1:4317 is unreachable: Connection refused``.
    """
    prefix = f"OTLP endpoint {settings.endpoint}"
    try:
        host, port = endpoint_host_port(settings.endpoint, settings.protocol)
    except ValueError as exc:
        return f"{prefix} is invalid: {exc}"
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except socket.gaierror as exc:
        return f"{prefix} is unreachable: cannot resolve host {host!r}: {exc.strerror or exc}"
    except TimeoutError:
        return f"{prefix} is unreachable: no answer from {host}:{port} within {timeout:g} s"
    except OSError as exc:
        reason = exc.strerror or (errno.errorcode.get(exc.errno or 0) if exc.errno else None) or str(exc)
        return f"{prefix} is unreachable: {reason}"


# --------------------------------------------------------------------------------------------- transport


def otlp_env(name: str, env: Mapping[str, str] = os.environ) -> str | None:
    """``OTEL_EXPORTER_OTLP_TRACES_<name>``, else ``OTEL_EXPORTER_OTLP_<name>``; ``None`` when both are
    unset or empty."""
    return env.get(f"OTEL_EXPORTER_OTLP_TRACES_{name}") or env.get(f"OTEL_EXPORTER_OTLP_{name}") or None


def otlp_headers(explicit: Mapping[str, str] | None, env: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The headers of every export: ``OTEL_EXPORTER_OTLP_(TRACES_)HEADERS`` (W3C baggage format, parsed
    leniently as the SDK does), with ``explicit`` ones merged over them; keys lower-cased."""
    parsed = parse_env_headers(otlp_env("HEADERS", env) or "", liberal=True)
    merged = {k.lower(): v for k, v in parsed.items()}
    if explicit:
        merged.update({k.lower(): v for k, v in explicit.items()})
    return merged


def otlp_timeout(env: Mapping[str, str] = os.environ) -> float:
    """``OTEL_EXPORTER_OTLP_(TRACES_)TIMEOUT`` in seconds, else :data:`DEFAULT_TIMEOUT_S` (also for a
    value that is not a number, with a warning)."""
    raw = otlp_env("TIMEOUT", env)
    if raw is None:
        return DEFAULT_TIMEOUT_S
    try:
        return float(raw)
    except ValueError:
        log.warning("Invalid timeout value %r, using default of %s seconds", raw, DEFAULT_TIMEOUT_S)
        return DEFAULT_TIMEOUT_S


def credential_provider(variable: str, expected: type, env: Mapping[str, str] = os.environ) -> Any | None:
    """The object the credential provider named by ``variable`` makes, ``None`` when it is unset.

    The SDK exporters' extension point: the variable names an entry point of the group
    ``opentelemetry_otlp_credential_provider`` whose callable returns ``grpc.ChannelCredentials`` (gRPC)
    or a ``requests.Session`` (HTTP).  Raises ``RuntimeError`` for an unknown name or a wrong type.
    """
    name = env.get(variable)
    if not name:
        return None
    found = entry_points(group=_CREDENTIAL_PROVIDERS, name=name)
    if not found:
        raise RuntimeError(f"Requested component '{name}' not found in entry point '{_CREDENTIAL_PROVIDERS}'")
    made = next(iter(found)).load()()
    if not isinstance(made, expected):
        raise RuntimeError(f"Requested component '{name}' is of type {type(made)} must be of type "
                           f"`{expected.__module__}.{expected.__name__}`.")
    return made

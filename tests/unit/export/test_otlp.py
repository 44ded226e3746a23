"""OTLP settings: endpoint and protocol from the CLI and the environment, reachability, transport
variables."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from otel_envoy.export.otlp import (
    OtlpSettings,
    check_reachable,
    credential_provider,
    endpoint_host_port,
    otlp_env,
    otlp_headers,
    otlp_timeout,
    resolve_otlp_settings,
)
from tests.support.otlp_receiver import OtlpReceiver


@pytest.fixture(scope="module")
def rx() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as receiver:
        yield receiver


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_resolve_settings_precedence() -> None:
    assert resolve_otlp_settings(None, None, env={}) is None
    assert resolve_otlp_settings(None, "grpc", env={}) is None

    s = resolve_otlp_settings("http://c:4318", None, env={})
    assert s == OtlpSettings("http://c:4318", "http/protobuf", "http://c:4318/v1/traces", "cli")

    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://base:4318",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
    }
    s = resolve_otlp_settings(None, None, env=env)
    assert s is not None
    assert (s.endpoint, s.protocol, s.export_endpoint, s.source) == (
        "http://base:4318",
        "grpc",
        "http://base:4318",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
    )

    env["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"] = "http://traces:4318/custom/path"
    env["OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"] = "http/protobuf"
    s = resolve_otlp_settings(None, None, env=env)
    assert s is not None
    # The signal-specific endpoint is a full URL: used as-is.
    assert (s.endpoint, s.protocol, s.export_endpoint) == (
        "http://traces:4318/custom/path",
        "http/protobuf",
        "http://traces:4318/custom/path",
    )

    # CLI beats everything.
    s = resolve_otlp_settings("http://cli:4317", "grpc", env=env)
    assert s is not None and (s.endpoint, s.protocol, s.source) == ("http://cli:4317", "grpc", "cli")

    # Empty values count as unset.
    s = resolve_otlp_settings("", " ", env={"OTEL_EXPORTER_OTLP_ENDPOINT": "http://e:4318"})
    assert s is not None and s.protocol == "http/protobuf" and s.export_endpoint == "http://e:4318/v1/traces"


def test_resolve_settings_rejects_unknown_protocol() -> None:
    with pytest.raises(ValueError, match="http/json"):
        resolve_otlp_settings("http://c:4318", "http/json", env={})
    with pytest.raises(ValueError, match="OTEL_EXPORTER_OTLP_PROTOCOL"):
        resolve_otlp_settings("http://c:4318", None, env={"OTEL_EXPORTER_OTLP_PROTOCOL": "carrier-pigeon"})


def test_endpoint_host_port() -> None:
    assert endpoint_host_port("http://127.0.0.1:4317", "grpc") == ("127.0.0.1", 4317)
    assert endpoint_host_port("https://collector.example", "http/protobuf") == ("collector.example", 443)
    assert endpoint_host_port("http://collector", "http/protobuf") == ("collector", 80)
    assert endpoint_host_port("collector", "grpc") == ("collector", 4317)
    assert endpoint_host_port("collector:9999", "grpc") == ("collector", 9999)
    assert endpoint_host_port("http://[::1]:4318/v1/traces", "http/protobuf") == ("::1", 4318)


def test_check_reachable(rx: OtlpReceiver) -> None:
    ok = resolve_otlp_settings(rx.grpc_endpoint, "grpc", env={})
    assert ok is not None and check_reachable(ok) is None
    ok_http = resolve_otlp_settings(rx.http_endpoint, None, env={})
    assert ok_http is not None and check_reachable(ok_http) is None

    endpoint = f"http://127.0.0.1:{_closed_port()}"
    bad = resolve_otlp_settings(endpoint, "grpc", env={})
    assert bad is not None
    message = check_reachable(bad, timeout=2.0)
    assert message == f"OTLP endpoint {endpoint} is unreachable: Connection refused"
    assert "\n" not in message

    unresolvable = resolve_otlp_settings("http://no-such-host.invalid:4317", "grpc", env={})
    assert unresolvable is not None
    message = check_reachable(unresolvable, timeout=2.0)
    assert message is not None and message.startswith(
        "OTLP endpoint http://no-such-host.invalid:4317 is unreachable"
    )


def test_transport_variables_prefer_the_traces_ones() -> None:
    env = {"OTEL_EXPORTER_OTLP_TIMEOUT": "7", "OTEL_EXPORTER_OTLP_HEADERS": "A=1,b=2",
           "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION": "gzip", "OTEL_EXPORTER_OTLP_COMPRESSION": "deflate"}
    assert otlp_env("COMPRESSION", env) == "gzip"
    assert otlp_env("CERTIFICATE", env) is None
    assert otlp_timeout(env) == 7.0
    assert otlp_timeout({}) == 10.0
    assert otlp_timeout({"OTEL_EXPORTER_OTLP_TRACES_TIMEOUT": "soon"}) == 10.0
    assert otlp_headers({"B": "3", "C": "4"}, env) == {"a": "1", "b": "3", "c": "4"}
    env["OTEL_EXPORTER_OTLP_TRACES_HEADERS"] = "x=%20y"
    assert otlp_headers(None, env) == {"x": "y"}  # the traces variable replaces the general one


def test_credential_providers_are_named_entry_points() -> None:
    assert credential_provider("OTEL_PYTHON_EXPORTER_OTLP_GRPC_CREDENTIAL_PROVIDER", object, {}) is None
    with pytest.raises(RuntimeError, match="not found"):
        credential_provider("V", object, {"V": "no-such-provider"})

"""OTLP/gRPC trace sender: serialised ``ExportTraceServiceRequest`` bytes to ``TraceService/Export``.

The request is already encoded (:func:`otel_envoy.export.otlp_proto.encode_request_proto`), so the call is a
plain gRPC unary call whose request serialiser passes the bytes through.  Only grpcio's public API is used.

Settings and retries are those of the SDK's gRPC span exporter (``OTLPSpanExporter`` of
``opentelemetry-exporter-otlp-proto-grpc``), reimplemented here:

* target: the endpoint's ``host:port`` (``OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT`` or
  ``http://localhost:4317`` when none is given); plaintext for ``http://`` (or
  ``OTEL_EXPORTER_OTLP_(TRACES_)INSECURE=true``), TLS otherwise, with the root certificate and client
  key pair of ``OTEL_EXPORTER_OTLP_(TRACES_)CERTIFICATE`` / ``CLIENT_KEY`` / ``CLIENT_CERTIFICATE``, or
  the credentials of the SDK's credential-provider variables;
* metadata: ``OTEL_EXPORTER_OTLP_(TRACES_)HEADERS`` with the explicit headers over them; compression:
  ``OTEL_EXPORTER_OTLP_(TRACES_)COMPRESSION`` (``gzip`` or none); the SDK's user agent;
* retries: up to 6 attempts within ``timeout`` seconds (the deadline of each call is what is left of it).
  A failure with a retryable status (CANCELLED, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, ABORTED,
  OUT_OF_RANGE, UNAVAILABLE, DATA_LOSS) is retried after an exponential backoff of 2^n seconds +-20%
  (or the delay the server's ``google.rpc.RetryInfo`` asks for), unless that backoff would pass the
  deadline; the first UNAVAILABLE also builds a new channel (a fresh connection).  :meth:`shutdown` ends
  a backoff at once.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlparse

import grpc
from google.rpc.error_details_pb2 import RetryInfo
from opentelemetry.exporter.otlp.proto.grpc.version import __version__ as _sdk_exporter_version

from otel_envoy.export.otlp import credential_provider, otlp_env, otlp_headers, otlp_timeout
from otel_envoy.export.retry import RetryWindow, backoff_s

__all__ = ["EXPORT_METHOD", "RETRYABLE_CODES", "GrpcTraceSender"]

log = logging.getLogger("otel_envoy.export.otlp")

#: The OTLP trace service's method.
EXPORT_METHOD = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
#: Status codes worth another attempt.
RETRYABLE_CODES = frozenset({
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DATA_LOSS,
})
_RETRYABLE_CODES_VARIABLE = "OTEL_PYTHON_EXPORTER_OTLP_GRPC_RETRYABLE_ERROR_CODES"  # the SDK's override
_DEFAULT_ENDPOINT = "http://localhost:4317"
_CHANNEL_OPTIONS = (("grpc.primary_user_agent", f"OTel-OTLP-Exporter-Python/{_sdk_exporter_version}"),)
_COMPRESSION = {None: grpc.Compression.NoCompression, "none": grpc.Compression.NoCompression,
                "gzip": grpc.Compression.Gzip}


def _identity(payload: bytes) -> bytes:
    """Request serialiser: the request is already serialised."""
    return payload


class GrpcTraceSender:
    """Sends serialised trace requests to one OTLP/gRPC endpoint, with retries (see the module docs).

    ``endpoint=None`` takes the endpoint from the environment; ``insecure=None`` decides plaintext or TLS
    from the endpoint's scheme and ``OTEL_EXPORTER_OTLP_(TRACES_)INSECURE``.  No connection is made before
    the first :meth:`send`.
    """

    def __init__(self, endpoint: str | None, insecure: bool | None = None,
                 headers: Mapping[str, str] | None = None, timeout: float | None = None,
                 env: Mapping[str, str] = os.environ) -> None:
        """Resolve the settings and create the channel."""
        traces_insecure = env.get("OTEL_EXPORTER_OTLP_TRACES_INSECURE")
        if insecure is None and traces_insecure is not None:
            insecure = traces_insecure.lower() == "true"
        endpoint = endpoint or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") \
            or env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or _DEFAULT_ENDPOINT
        parsed = urlparse(endpoint)
        if parsed.scheme == "https":
            insecure = False
        if insecure is None:
            any_insecure = env.get("OTEL_EXPORTER_OTLP_INSECURE")
            insecure = any_insecure.lower() == "true" if any_insecure is not None else parsed.scheme == "http"
        self.target = parsed.netloc or endpoint
        self.insecure = insecure
        self.metadata = tuple(otlp_headers(headers, env).items())
        self.timeout = timeout or otlp_timeout(env)
        compression = otlp_env("COMPRESSION", env)
        key = compression.lower().strip() if compression is not None else None
        if key not in _COMPRESSION:
            raise ValueError(f'Invalid value "{compression}" for OTEL_EXPORTER_OTLP_(TRACES_)COMPRESSION')
        self.compression = _COMPRESSION[key]
        codes = env.get(_RETRYABLE_CODES_VARIABLE)
        self.retryable = RETRYABLE_CODES if not codes else frozenset(
            grpc.StatusCode[c.strip().upper()] for c in codes.split(",") if c.strip())
        self._credentials = None if insecure else _channel_credentials(env)
        #: Channels built after the first one (reconnections after UNAVAILABLE).
        self.reconnects = 0
        self._shutdown = threading.Event()
        #: Whether the last failed :meth:`send` failed in a way that may pass (unreachable, overloaded, a
        #: timeout): worth sending the same request again later.
        self.last_failure_retryable = False
        self._channel: grpc.Channel | None = None
        self._export: Any = None
        self._connect()

    def _connect(self) -> None:
        if self._credentials is None:
            channel = grpc.insecure_channel(self.target, options=_CHANNEL_OPTIONS,
                                            compression=self.compression)
        else:
            channel = grpc.secure_channel(self.target, self._credentials, options=_CHANNEL_OPTIONS,
                                          compression=self.compression)
        self._channel = channel
        self._export = channel.unary_unary(EXPORT_METHOD, request_serializer=_identity,
                                           response_deserializer=None)

    def _reconnect(self) -> None:
        try:
            if self._channel is not None:
                self._channel.close()
        except Exception as exc:  # a broken channel must not stop the retry
            log.debug("closing the gRPC channel to %s failed: %s", self.target, exc)
        self._connect()
        self.reconnects += 1

    def send(self, payload: bytes) -> bool:
        """Export one serialised request; ``True`` once the collector accepted it.  Blocks through the
        retries (up to ``timeout`` seconds, or until :meth:`shutdown`)."""
        if self._shutdown.is_set():
            log.warning("Exporter already shutdown, ignoring batch")
            self.last_failure_retryable = False
            return False
        window = RetryWindow(self.timeout, self._shutdown)
        for attempt in window.attempts():
            try:
                self._export(payload, metadata=self.metadata, timeout=window.left_s())
                return True
            except grpc.RpcError as error:
                code, details = error.code(), error.details()  # type: ignore[attr-defined]
                backoff = backoff_s(attempt)
                retry_info = dict(error.trailing_metadata() or ()).get("google.rpc.retryinfo-bin")  # type: ignore[attr-defined]
                if retry_info is not None:
                    delay = RetryInfo.FromString(retry_info).retry_delay
                    backoff = delay.seconds + delay.nanos / 1e9
                if code == grpc.StatusCode.UNAVAILABLE and attempt == 0:
                    self._reconnect()
                if code not in self.retryable or not window.may_retry(attempt, backoff):
                    self.last_failure_retryable = code in self.retryable
                    log.error("Failed to export traces to %s, error code: %s, error details: %s",
                              self.target, code, details, exc_info=code == grpc.StatusCode.UNKNOWN)
                    return False
                log.warning("Transient error %s encountered while exporting traces to %s, retrying in %.2fs. "
                            "Error details: %s", code, self.target, backoff, details)
            if not window.wait(backoff):
                self.last_failure_retryable = False  # shutting down
                return False
        self.last_failure_retryable = True
        return False

    def shutdown(self) -> None:
        """Stop: a backoff in progress ends, later sends fail, the channel closes.  Idempotent."""
        if self._shutdown.is_set():
            return
        self._shutdown.set()
        if self._channel is not None:
            self._channel.close()


def _read(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError as exc:
        log.exception("Failed to read file: %s. Please check if the file exists and is accessible.",
                      exc.filename)
        return None


def _channel_credentials(env: Mapping[str, str]) -> grpc.ChannelCredentials:
    """TLS credentials as the SDK's gRPC span exporter finds them: from the traces variables when
    ``OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE`` is set, else from the general ones; a credential provider
    first, then the certificate files, else the system's root certificates."""
    if env.get("OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE") is not None:
        provider = "OTEL_PYTHON_EXPORTER_OTLP_GRPC_TRACES_CREDENTIAL_PROVIDER"
        prefix = "OTEL_EXPORTER_OTLP_TRACES_"
    else:
        provider = "OTEL_PYTHON_EXPORTER_OTLP_GRPC_CREDENTIAL_PROVIDER"
        prefix = "OTEL_EXPORTER_OTLP_"
    made = credential_provider(provider, grpc.ChannelCredentials, env)
    if made is not None:
        return made
    certificate = env.get(f"{prefix}CERTIFICATE")
    if certificate:
        key, chain = env.get(f"{prefix}CLIENT_KEY"), env.get(f"{prefix}CLIENT_CERTIFICATE")
        return grpc.ssl_channel_credentials(
            root_certificates=_read(certificate), private_key=_read(key) if key else None,
            certificate_chain=_read(chain) if chain else None)
    return grpc.ssl_channel_credentials()

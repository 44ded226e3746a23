"""OTLP/HTTP trace sender: serialised ``ExportTraceServiceRequest`` bytes, POSTed as protobuf.

The request is already encoded (:func:`otel_envoy.export.otlp_proto.encode_request_proto`); this module
only sends it, with ``requests`` (public API only).

Settings and retries are those of the SDK's HTTP/protobuf span exporter (``OTLPSpanExporter`` of
``opentelemetry-exporter-otlp-proto-http``), reimplemented here:

* URL: the endpoint given, else ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` as-is, else
  ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or ``http://localhost:4318``) plus ``/v1/traces``;
* headers: ``Content-Type: application/x-protobuf`` and the SDK's user agent, then
  ``OTEL_EXPORTER_OTLP_(TRACES_)HEADERS``, then the explicit headers; compression:
  ``OTEL_EXPORTER_OTLP_(TRACES_)COMPRESSION`` (``gzip``, ``deflate`` or none, with ``Content-Encoding``);
  TLS: ``OTEL_EXPORTER_OTLP_(TRACES_)CERTIFICATE`` / ``CLIENT_KEY`` / ``CLIENT_CERTIFICATE``, or the
  session of the SDK's credential-provider variables; requests over 64 MiB are dropped before sending;
* retries: up to 6 attempts within ``timeout`` seconds (each request's timeout is what is left of it).
  Statuses 200-399 are success.  429, 502, 503 and 504, and connection errors (refused, reset, timed out,
  TLS), are retried after an exponential backoff of 2^n seconds +-20% (or the server's ``Retry-After``),
  unless that backoff would pass the deadline; a connection error is first retried once at once (a stale
  pooled connection).  Other statuses and errors fail the export.  :meth:`shutdown` ends a backoff at once.
"""

from __future__ import annotations

import gzip
import logging
import math
import os
import threading
import time
import zlib
from collections.abc import Mapping
from datetime import UTC
from email.utils import parsedate_to_datetime

import requests
from opentelemetry.exporter.otlp.proto.http.version import __version__ as _sdk_exporter_version

from otel_envoy.export.otlp import TRACES_PATH, credential_provider, otlp_env, otlp_headers, otlp_timeout
from otel_envoy.export.retry import RetryWindow, backoff_s

__all__ = ["MAX_REQUEST_BYTES", "RETRYABLE_STATUSES", "HttpTraceSender"]

log = logging.getLogger("otel_envoy.export.otlp")

#: HTTP statuses worth another attempt.
RETRYABLE_STATUSES = frozenset({429, 502, 503, 504})
#: Serialised requests larger than this (before compression) are dropped, as the SDK does by default.
MAX_REQUEST_BYTES = 64 * 1024 * 1024
_DEFAULT_BASE = "http://localhost:4318"
_BASE_HEADERS = {"content-type": "application/x-protobuf",
                 "user-agent": f"OTel-OTLP-Exporter-Python/{_sdk_exporter_version}"}
_CONNECTION_ERRORS = (requests.exceptions.ConnectionError, requests.exceptions.Timeout)
_COMPRESSIONS = ("none", "deflate", "gzip")


class HttpTraceSender:
    """Posts serialised trace requests to one OTLP/HTTP URL, with retries (see the module docs).

    ``endpoint`` is the full URL (``.../v1/traces``); ``None`` takes it from the environment.
    """

    def __init__(self, endpoint: str | None, headers: Mapping[str, str] | None = None,
                 timeout: float | None = None, env: Mapping[str, str] = os.environ) -> None:
        """Resolve the settings and create the HTTP session (no connection yet)."""
        if not endpoint:
            endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or \
                (env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or _DEFAULT_BASE).removesuffix("/") + TRACES_PATH
        self.url = endpoint
        self.timeout = timeout if timeout is not None else otlp_timeout(env)
        compression = (otlp_env("COMPRESSION", env) or "none").lower().strip()
        if compression not in _COMPRESSIONS:
            log.warning("Unsupported compression type: %s", compression)
            compression = "none"
        self.compression = compression
        self.headers = {**_BASE_HEADERS, **otlp_headers(headers, env)}
        if compression != "none" and not any(k.lower() == "content-encoding" for k in self.headers):
            self.headers["Content-Encoding"] = compression
        self._session = _session(env)
        self._shutdown = threading.Event()
        #: Whether the last failed :meth:`send` failed in a way that may pass (unreachable, overloaded, a
        #: timeout): worth sending the same request again later.
        self.last_failure_retryable = False

    def _post(self, data: bytes, timeout: float) -> tuple[requests.Response | None, Exception | None]:
        """One POST, and one immediate second try after a connection error if time is left."""
        deadline = time.time() + timeout
        response, error = self._request(data, timeout)
        if isinstance(error, _CONNECTION_ERRORS) and (remaining := deadline - time.time()) > 0:
            response, error = self._request(data, remaining)
        return response, error

    def _request(self, data: bytes, timeout: float) -> tuple[requests.Response | None, Exception | None]:
        try:
            return self._session.post(self.url, data=data, headers=self.headers, timeout=timeout,
                                      allow_redirects=False), None
        except Exception as error:  # every failure to send is an answer: retried or not, never raised
            return None, error

    def send(self, payload: bytes) -> bool:
        """Export one serialised request; ``True`` once the collector accepted it.  Blocks through the
        retries (up to ``timeout`` seconds, or until :meth:`shutdown`)."""
        if self._shutdown.is_set():
            log.warning("Exporter already shutdown, ignoring batch")
            self.last_failure_retryable = False
            return False
        if len(payload) > MAX_REQUEST_BYTES:
            log.warning("Dropping span batch: serialized size %d bytes exceeds max_request_size %d bytes.",
                        len(payload), MAX_REQUEST_BYTES)
            self.last_failure_retryable = False
            return False
        data = _compress(payload, self.compression)
        window = RetryWindow(self.timeout, self._shutdown)
        for attempt in window.attempts():
            backoff = backoff_s(attempt)
            response, error = self._post(data, window.left_s())
            status = response.status_code if response is not None else None
            reason = response.reason if response is not None else None
            if status is not None and 200 <= status < 400:
                return True
            retryable = status in RETRYABLE_STATUSES if status else isinstance(error, _CONNECTION_ERRORS)
            if retryable and response is not None:
                after = _retry_after(response)
                if after is not None:
                    backoff = after
            self.last_failure_retryable = retryable
            if not retryable:
                log.error("Failed to export spans batch code: %s, reason: %s", status,
                          reason or error or "unknown")
                return False
            if not window.may_retry(attempt, backoff):
                log.error("Failed to export spans batch due to timeout, max retries or shutdown.")
                return False
            log.warning("Transient error %s encountered while exporting spans batch, retrying in %.2fs.",
                        reason or error, backoff)
            if not window.wait(backoff):
                self.last_failure_retryable = False  # shutting down
                return False
        return False

    def shutdown(self) -> None:
        """Stop: a backoff in progress ends, later sends fail, the session closes.  Idempotent."""
        if self._shutdown.is_set():
            return
        self._shutdown.set()
        self._session.close()


def _session(env: Mapping[str, str]) -> requests.Session:
    """The session of a credential provider, or a new one; with the certificates of the environment."""
    variable = "OTEL_PYTHON_EXPORTER_OTLP_HTTP_CREDENTIAL_PROVIDER"
    if not env.get(variable):
        variable = "OTEL_PYTHON_EXPORTER_OTLP_HTTP_TRACES_CREDENTIAL_PROVIDER"
    session = credential_provider(variable, requests.Session, env) or requests.Session()
    session.verify = otlp_env("CERTIFICATE", env) or True
    key, chain = otlp_env("CLIENT_KEY", env), otlp_env("CLIENT_CERTIFICATE", env)
    cert = (chain, key) if chain and key else chain
    if cert is not None:
        session.cert = cert
    return session


def _compress(data: bytes, compression: str) -> bytes:
    if compression == "gzip":
        return gzip.compress(data)
    if compression == "deflate":
        return zlib.compress(data)
    return data


def _retry_after(response: requests.Response) -> float | None:
    """The ``Retry-After`` header in seconds (delay-seconds or HTTP-date), ``None`` when absent or invalid."""
    value = response.headers.get("retry-after")
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return max(seconds, 0.0) if math.isfinite(seconds) else None
    try:
        retry_at = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if retry_at.tzinfo is None:
        retry_at = retry_at.replace(tzinfo=UTC)
    return max(retry_at.timestamp() - time.time(), 0.0)

"""Where batches of finished spans go: a JSON-lines file, an OTLP collector (gRPC or HTTP/protobuf).

A sink does two things: :meth:`SpanSink.encode` turns a batch into the sink's own encoding (called by the
export thread), :meth:`SpanSink.send` delivers one encoding (called by the sink's own
:class:`otel_envoy.export.sink_worker.SinkWorker`, which keeps and retries what a sink could not take yet).

Both sinks encode records with otel-envoy's own encoders: OTLP/JSON text for the file
(:mod:`otel_envoy.export.otlp_json`), and the protobuf request for OTLP
(:mod:`otel_envoy.export.otlp_proto`), which :class:`OtlpSink` hands to an OTLP sender
(:mod:`otel_envoy.export.otlp_grpc`, :mod:`otel_envoy.export.otlp_http`: the SDK exporters' settings,
retries, backoff, timeouts, compression and headers).

One bad span never costs a batch (or, in the file, a line): a span whose ids are not what OTLP requires
(:func:`span_ids_valid`) is left out before encoding, and when encoding a batch still fails, each span is
encoded alone and those that fail are left out. Either way the span is counted (:attr:`SpanSink.rejected`,
``drops["invalid_span:<sink>"]``) and the rest of the batch goes out.
"""

from __future__ import annotations

import abc
import binascii
import logging
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TextIO, TypeVar
from urllib.parse import urlsplit

from otel_envoy.export.log_limiter import ExporterLogFilter, install_log_filter
from otel_envoy.export.otlp import PROTOCOLS, OtlpSettings, traces_url
from otel_envoy.export.otlp_grpc import GrpcTraceSender
from otel_envoy.export.otlp_http import HttpTraceSender
from otel_envoy.export.otlp_json import encode_request_json
from otel_envoy.export.otlp_proto import encode_request_proto
from otel_envoy.export.sink_worker import Delivery, Encoded
from otel_envoy.spans.model import SpanRecord, TemplatedSpan

__all__ = ["EncodingSink", "JsonLinesFileSink", "OtlpSink", "SpanSink", "encode_leaving_out_bad",
           "span_ids_valid", "spans_with_valid_ids"]

log = logging.getLogger("otel_envoy.export")
_T = TypeVar("_T")
_ZERO_TRACE, _ZERO_SPAN = "0" * 32, "0" * 16


def span_ids_valid(r: SpanRecord | TemplatedSpan) -> bool:
    """Whether the span's trace, span, parent and link ids are what OTLP requires: lower-case hex of 32 or 16
    digits, not all zero (the link ids: of their lengths). Every span of every batch is checked: lengths,
    then one strict hex decoding of the ids together and a case check (a third of three regular
    expressions' cost)."""
    if type(r) is TemplatedSpan:  # its trace, parent and links are its template's: checked once; its own
        template = r.template  # span id comes from the correlator's id source (IdSource), which makes only
        shared = template.encoded.get("ids_valid")  # valid ones: its length is checked
        if shared is None:
            shared = template.encoded["ids_valid"] = _ids_valid(template.prototype)
        return shared and len(r.span_id) == 16
    return _ids_valid(r)


def _ids_valid(r: SpanRecord) -> bool:
    texts = _id_texts(r)
    return texts is not None and _lower_hex("".join(texts))


def _id_texts(r: SpanRecord) -> list[str] | None:
    """The ids of ``r`` left to check as hex digits, when each has its length and none but a link's is all
    zero; else None. Every id has an even number of digits, so ids decode together exactly when each one
    decodes."""
    trace_id, span_id, parent = r.trace_id, r.span_id, r.parent_span_id
    if len(trace_id) != 32 or len(span_id) != 16 or trace_id == _ZERO_TRACE or span_id == _ZERO_SPAN:
        return None
    texts = [trace_id, span_id]
    if parent:
        if len(parent) != 16 or parent == _ZERO_SPAN:
            return None
        texts.append(parent)
    for t, s, _attrs in r.links:
        if len(t) != 32 or len(s) != 16:
            return None
        texts.append(t)
        texts.append(s)
    return texts


def spans_with_valid_ids(spans: Sequence[SpanRecord | TemplatedSpan]) -> list[SpanRecord | TemplatedSpan]:
    """The spans of a batch for which :func:`span_ids_valid` holds, in order. A batch whose spans all pass
    (the usual one: the builders make valid ids) costs the lengths per span and one hex decoding and one
    case check of all its ids together; otherwise each span is checked alone."""
    texts: list[str] = []
    for r in spans:
        if type(r) is TemplatedSpan:
            if not span_ids_valid(r):
                break
            continue
        own = _id_texts(r)
        if own is None:
            break
        texts += own
    else:
        if _lower_hex("".join(texts)):
            return list(spans)
    return [s for s in spans if span_ids_valid(s)]


def _lower_hex(text: str) -> bool:
    """Only the digits 0-9 and a-f (an even number of them)."""
    try:
        binascii.unhexlify(text)  # strict: no signs, spaces or prefixes; either case
    except (binascii.Error, ValueError):  # ValueError: a character beyond ASCII
        return False
    return text == text.lower()


def encode_leaving_out_bad(encode: Callable[[Sequence[SpanRecord]], _T], spans: Sequence[SpanRecord]
                           ) -> tuple[_T | None, int]:
    """``encode`` of the spans with valid ids; when that raises, of those that encode alone. Returns the
    encoding (``None`` when no span is left) and how many spans were left out."""
    good = spans_with_valid_ids(spans)
    try:
        return (encode(good) if good else None), len(spans) - len(good)
    except Exception:  # a value the encoder cannot take: find the spans that carry one
        kept = []
        for r in good:
            try:
                encode([r])
            except Exception as exc:
                log.warning("span %r left out of its batch: it cannot be encoded (%s: %s)", r.name,
                            type(exc).__name__, exc)
            else:
                kept.append(r)
        return (encode(kept) if kept else None), len(spans) - len(kept)

#: The senders' per-batch error and retry lines: one per message template per 30 s when the collector is down.
_SENDER_LOG_FILTER = ExporterLogFilter()


class SpanSink(abc.ABC):
    """Somewhere a batch of finished spans goes.

    Subclasses implement :meth:`export` (encode and deliver at once); then :meth:`encode` passes the spans
    themselves and :meth:`send` calls :meth:`export`. The sinks here are each an :class:`EncodingSink`: they
    encode and deliver separately, so that what could not be delivered is kept encoded and tried again.
    """

    #: Short name used in stats and drop reasons (``export_failed:<name>``).
    name: str = "sink"
    #: Spans left out of their batches so far because they could not be encoded (see the module's text).
    rejected: int = 0
    #: The size :meth:`encode` assumes per span when the payload is the spans themselves.
    SPAN_SIZE_GUESS = 1024

    @abc.abstractmethod
    def export(self, spans: Sequence[SpanRecord]) -> bool:
        """Export one batch; ``True`` on success.  May raise; the pipeline counts that as a failure."""

    def encode(self, spans: Sequence[SpanRecord]) -> Encoded | None:
        """``spans`` in this sink's encoding (``None``: nothing to send); called by the export thread."""
        return Encoded(list(spans), len(spans), self.SPAN_SIZE_GUESS * len(spans)) if spans else None

    def send(self, payload: Any) -> Delivery:
        """Deliver one :meth:`encode` payload; called by the sink's worker thread. May raise (counted as a
        failure)."""
        return Delivery.SENT if self.export(payload) else Delivery.FAILED

    def shutdown(self) -> None:  # noqa: B027 - optional hook, default does nothing
        """Release resources; called once, after the last :meth:`send`."""


class EncodingSink(SpanSink):
    """A sink that encodes a batch (:meth:`encode`) and delivers the encoding (:meth:`send`): both its own;
    :meth:`export` is the two at once."""

    @abc.abstractmethod
    def encode(self, spans: Sequence[SpanRecord]) -> Encoded | None:
        """``spans`` in this sink's encoding (``None``: nothing to send)."""

    @abc.abstractmethod
    def send(self, payload: Any) -> Delivery:
        """Deliver one :meth:`encode` payload."""

    def export(self, spans: Sequence[SpanRecord]) -> bool:
        """Encode and deliver one batch at once (blocking); ``True`` when delivered or nothing was left."""
        encoded = self.encode(spans)
        return encoded is None or self.send(encoded.payload) is Delivery.SENT


class JsonLinesFileSink(EncodingSink):
    """Writes one OTLP/JSON ``ExportTraceServiceRequest`` per line, one line per batch.

    The file is truncated when the sink is created and flushed after every batch, so ``show`` (or
    ``tail -f``) sees complete lines.
    """

    def __init__(self, path: str | os.PathLike[str], name: str = "jsonl") -> None:
        """Create (truncate) ``path`` for writing."""
        self.path = os.fspath(path)
        self.name = name
        self._lock = threading.Lock()
        self._file: TextIO | None = open(self.path, "w", encoding="utf-8")  # noqa: SIM115 - long-lived

    def encode(self, spans: Sequence[SpanRecord]) -> Encoded | None:
        """One OTLP/JSON line for the spans that encode (``None`` when none is left)."""
        if not spans:
            return None
        line, left_out = encode_leaving_out_bad(encode_request_json, spans)  # ~1 MB: not copied again
        self.rejected += left_out
        return None if line is None else Encoded(line, len(spans) - left_out, len(line))

    def send(self, payload: Any) -> Delivery:
        """Append ``payload`` as a line and flush (an ``OSError`` propagates: counted as a failure)."""
        with self._lock:
            if self._file is None:
                return Delivery.FAILED
            self._file.write(payload)
            self._file.write("\n")
            self._file.flush()
        return Delivery.SENT

    def shutdown(self) -> None:
        """Close the file."""
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None


class OtlpSink(EncodingSink):
    """Sends batches to an OTLP collector over gRPC or HTTP/protobuf.

    Batches are serialised by :func:`otel_envoy.export.otlp_proto.encode_request_proto` (byte-identical
    to the SDK's encoding, several times faster) and sent by :class:`GrpcTraceSender` or
    :class:`HttpTraceSender`, with the SDK exporters' retries.

    ``endpoint=None`` reads ``OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT``, as the SDK exporters do.  An
    explicit HTTP endpoint is treated as a base URL and gets ``/v1/traces`` appended (unless it already
    ends with it, or ``append_traces_path=False``).  For gRPC, an ``http://`` endpoint means plaintext and
    ``https://`` TLS.  ``headers`` are merged over ``OTEL_EXPORTER_OTLP_(TRACES_)HEADERS`` (keys
    lower-cased); ``timeout`` (seconds) bounds one export including the retries.
    """

    def __init__(
        self,
        protocol: str = "http/protobuf",
        endpoint: str | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: float = 5.0,
        *,
        append_traces_path: bool = True,
        name: str | None = None,
    ) -> None:
        """Build the sender (no connection is made until the first export)."""
        if protocol not in PROTOCOLS:
            raise ValueError(f"unknown OTLP protocol {protocol!r} (expected grpc or http/protobuf)")
        self.protocol = protocol
        self.name = name or ("otlp-grpc" if protocol == "grpc" else "otlp-http")
        self._closed = False
        self._lock = threading.Lock()
        install_log_filter(_SENDER_LOG_FILTER, ("otel_envoy.export.otlp",))
        self.sender: GrpcTraceSender | HttpTraceSender
        if protocol == "grpc":
            insecure: bool | None = None
            if endpoint is not None:
                scheme = urlsplit(endpoint).scheme.lower()
                if scheme == "http":
                    insecure = True
                elif scheme == "https":
                    insecure = False
            self.endpoint = endpoint
            self.sender = GrpcTraceSender(endpoint, insecure, headers, timeout)
        else:
            if endpoint is not None and append_traces_path:
                endpoint = traces_url(endpoint)
            self.endpoint = endpoint
            self.sender = HttpTraceSender(endpoint, headers, timeout)

    @classmethod
    def from_settings(
        cls, settings: OtlpSettings, headers: Mapping[str, str] | None = None, timeout: float = 5.0
    ) -> OtlpSink:
        """Build a sink from :func:`otel_envoy.export.otlp.resolve_otlp_settings` output."""
        return cls(
            settings.protocol,
            settings.export_endpoint,
            headers=headers,
            timeout=timeout,
            append_traces_path=False,
        )

    def encode(self, spans: Sequence[SpanRecord]) -> Encoded | None:
        """The protobuf ``ExportTraceServiceRequest`` of the spans that encode (``None``: none left)."""
        body, left_out = encode_leaving_out_bad(encode_request_proto, spans)
        self.rejected += left_out
        return None if body is None else Encoded(body, len(spans) - left_out, len(body))

    def send(self, payload: Any) -> Delivery:
        """Send one request through the sender's own retries; :attr:`Delivery.RETRY` when it failed in a
        way that may pass (unreachable, overloaded, timed out), :attr:`Delivery.FAILED` when refused."""
        if self._closed:
            return Delivery.FAILED
        if self.sender.send(payload):
            return Delivery.SENT
        # shut down during the send: the batch was not refused, only not sent (its worker counts it unsent)
        return Delivery.RETRY if self.sender.last_failure_retryable or self._closed else Delivery.FAILED

    def shutdown(self) -> None:
        """Shut the sender down; aborts a retry sleep in progress.  Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self.sender.shutdown()

"""Passive TLS handshake observation from captured, possibly truncated, per-connection byte streams.

The daemon sees, per TCP connection, what Envoy read from the client (``on_client_data``, including
``MSG_PEEK`` reads done by the ``tls_inspector`` listener filter) and what it wrote to the client
(``on_server_data``).  Each captured message is ``(timestamp_ns, data, total_len)`` where ``data`` may be
only the first bytes of a ``total_len``-byte message (capture truncation); records can be split anywhere
across messages.

Layers, bottom-up, one module each:

* :mod:`.names`: version, cipher-suite and alert names, GREASE values.
* :mod:`.record_layer`: :class:`TlsRecordReader` reassembles the records of one direction (a capture gap
  inside a record body keeps it in sync; a gap covering a record header desynchronises it), and
  :class:`HandshakeReassembler` turns handshake-record fragments into handshake messages.
* :mod:`.hello`: :func:`parse_client_hello` / :func:`parse_server_hello` decode the only two messages sent
  in clear that matter here, plus JA3 / JA4 / JA3S fingerprints.
* :mod:`.handshake`: :class:`TlsHandshakeTracker` drives both directions and decides when the handshake
  completed.

Nothing raises out of the public tracker API: malformed or truncated input is recorded as strings
(``error``, ``warnings``).  Memory is bounded: one record per direction (<= 18432 bytes) and one handshake
message per direction (<= 64 KiB).

This package re-exports the public names of its modules; code inside ``otel_envoy`` imports them from the
module that defines them.
"""

from __future__ import annotations

from .handshake import TlsHandshakeTracker
from .hello import HRR_RANDOM, ClientHello, ServerHello, TlsParseError, parse_client_hello, parse_server_hello
from .names import ALERT_DESCRIPTIONS, alert_description_name, cipher_suite_name, is_grease, tls_version_name
from .record_layer import (
    MAX_HANDSHAKE_MESSAGE,
    MAX_RECORD_LEN,
    HandshakeReassembler,
    TlsRecord,
    TlsRecordReader,
)

__all__ = [
    "ALERT_DESCRIPTIONS",
    "HRR_RANDOM",
    "MAX_HANDSHAKE_MESSAGE",
    "MAX_RECORD_LEN",
    "ClientHello",
    "HandshakeReassembler",
    "ServerHello",
    "TlsHandshakeTracker",
    "TlsParseError",
    "TlsRecord",
    "TlsRecordReader",
    "alert_description_name",
    "cipher_suite_name",
    "is_grease",
    "parse_client_hello",
    "parse_server_hello",
    "tls_version_name",
]

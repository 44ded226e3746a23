"""Passive TLS handshake observation from captured, possibly truncated, per-connection byte streams.

The daemon sees, per TCP connection, what Envoy read from the client (``on_client_data``, including
``MSG_PEEK`` reads done by the ``tls_inspector`` listener filter) and what it wrote to the client
(``on_server_data``).  Each captured message is ``(timestamp_ns, data, total_len)`` where ``data`` may be
only the first bytes of a ``total_len``-byte message (capture truncation); records can be split anywhere
across messages.

Layers, bottom-up:

* :class:`TlsRecordReader` reassembles the records of one direction.  A capture gap inside a record body
  keeps the reader in sync (the record length is known); a gap covering a record header desynchronises it.
* :class:`HandshakeReassembler` turns handshake-record fragments into handshake messages.
* :func:`parse_client_hello` / :func:`parse_server_hello` decode the only two messages sent in clear that
  matter here (plus JA3 / JA4 fingerprints).
* :class:`TlsHandshakeTracker` drives both directions and decides when the handshake completed.

Nothing here raises out of the public tracker API: malformed or truncated input is recorded as strings
(``error``, ``warnings``).  Memory is bounded: one record per direction (<= 18432 bytes) and one handshake
message per direction (<= 64 KiB).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field

__all__ = [
    "ALERT_DESCRIPTIONS",
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

# --------------------------------------------------------------------------------------------------
# Constants
# --------------------------------------------------------------------------------------------------

MAX_RECORD_LEN = 2**14 + 2048  # largest legal TLSCiphertext.length (RFC 5246 6.2.3): 18432
MAX_HANDSHAKE_MESSAGE = 65536  # handshake-reassembly buffer bound (header + body)

CT_CHANGE_CIPHER_SPEC = 20
CT_ALERT = 21
CT_HANDSHAKE = 22
CT_APPLICATION_DATA = 23
CT_HEARTBEAT = 24

HS_CLIENT_HELLO = 1
HS_SERVER_HELLO = 2

EXT_SERVER_NAME = 0
EXT_SUPPORTED_GROUPS = 10
EXT_EC_POINT_FORMATS = 11
EXT_SIGNATURE_ALGORITHMS = 13
EXT_ALPN = 16
EXT_SESSION_TICKET = 35
EXT_PRE_SHARED_KEY = 41
EXT_EARLY_DATA = 42
EXT_SUPPORTED_VERSIONS = 43

GREASE_VALUES = frozenset(0x0A0A + 0x1010 * i for i in range(16))  # RFC 8701: 0x0a0a, 0x1a1a .. 0xfafa

# SHA-256("HelloRetryRequest"): the ServerHello.random of a HelloRetryRequest (RFC 8446 4.1.3).
HRR_RANDOM = bytes.fromhex("cf21ad74e59a6111be1d8c021e65b891c2a211167abb8c5e079e09e2c8a8339c")

# Smallest possible TLS 1.3 encrypted Finished record: 32-byte verify_data + inner content type + 8-byte
# tag (CCM_8).  An encrypted alert is 2 + 1 + 16 (or 8) bytes: a lone smaller record is taken for an alert.
_MIN_TLS13_FINISHED_RECORD = 32 + 1 + 8
_MAX_TLS13_ALERT_RECORD = 2 + 1 + 16  # an unpadded encrypted alert with a 16-byte AEAD tag

_TLS_VERSION_NAMES = {0x0304: "1.3", 0x0303: "1.2", 0x0302: "1.1", 0x0301: "1.0", 0x0300: "3.0"}
_JA4_VERSIONS = {0x0304: "13", 0x0303: "12", 0x0302: "11", 0x0301: "10", 0x0300: "s3", 0x0002: "s2"}

_CIPHER_SUITE_NAMES = {
    # TLS 1.3 (RFC 8446)
    0x1301: "TLS_AES_128_GCM_SHA256",
    0x1302: "TLS_AES_256_GCM_SHA384",
    0x1303: "TLS_CHACHA20_POLY1305_SHA256",
    0x1304: "TLS_AES_128_CCM_SHA256",
    0x1305: "TLS_AES_128_CCM_8_SHA256",
    # ECDHE AEAD
    0xC02B: "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256",
    0xC02C: "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384",
    0xC02F: "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256",
    0xC030: "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384",
    0xCCA8: "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256",
    0xCCA9: "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256",
    0xCCAA: "TLS_DHE_RSA_WITH_CHACHA20_POLY1305_SHA256",
    0xC0AC: "TLS_ECDHE_ECDSA_WITH_AES_128_CCM",
    0xC0AD: "TLS_ECDHE_ECDSA_WITH_AES_256_CCM",
    0xC0AE: "TLS_ECDHE_ECDSA_WITH_AES_128_CCM_8",
    0xC0AF: "TLS_ECDHE_ECDSA_WITH_AES_256_CCM_8",
    # ECDHE CBC
    0xC009: "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA",
    0xC00A: "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA",
    0xC013: "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA",
    0xC014: "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA",
    0xC023: "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA256",
    0xC024: "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA384",
    0xC027: "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA256",
    0xC028: "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA384",
    # DHE
    0x0033: "TLS_DHE_RSA_WITH_AES_128_CBC_SHA",
    0x0039: "TLS_DHE_RSA_WITH_AES_256_CBC_SHA",
    0x0067: "TLS_DHE_RSA_WITH_AES_128_CBC_SHA256",
    0x006B: "TLS_DHE_RSA_WITH_AES_256_CBC_SHA256",
    0x009E: "TLS_DHE_RSA_WITH_AES_128_GCM_SHA256",
    0x009F: "TLS_DHE_RSA_WITH_AES_256_GCM_SHA384",
    # static RSA
    0x000A: "TLS_RSA_WITH_3DES_EDE_CBC_SHA",
    0x002F: "TLS_RSA_WITH_AES_128_CBC_SHA",
    0x0035: "TLS_RSA_WITH_AES_256_CBC_SHA",
    0x003C: "TLS_RSA_WITH_AES_128_CBC_SHA256",
    0x003D: "TLS_RSA_WITH_AES_256_CBC_SHA256",
    0x009C: "TLS_RSA_WITH_AES_128_GCM_SHA256",
    0x009D: "TLS_RSA_WITH_AES_256_GCM_SHA384",
    # signalling values
    0x00FF: "TLS_EMPTY_RENEGOTIATION_INFO_SCSV",
    0x5600: "TLS_FALLBACK_SCSV",
}

ALERT_DESCRIPTIONS = {
    0: "close_notify",
    10: "unexpected_message",
    20: "bad_record_mac",
    22: "record_overflow",
    40: "handshake_failure",
    42: "bad_certificate",
    43: "unsupported_certificate",
    44: "certificate_revoked",
    45: "certificate_expired",
    46: "certificate_unknown",
    47: "illegal_parameter",
    48: "unknown_ca",
    49: "access_denied",
    50: "decode_error",
    51: "decrypt_error",
    70: "protocol_version",
    71: "insufficient_security",
    80: "internal_error",
    86: "inappropriate_fallback",
    90: "user_canceled",
    100: "no_renegotiation",
    109: "missing_extension",
    110: "unsupported_extension",
    112: "unrecognized_name",
    113: "bad_certificate_status_response",
    115: "unknown_psk_identity",
    116: "certificate_required",
    120: "no_application_protocol",
}
_ALERT_LEVELS = {1: "warning", 2: "fatal"}
_CLOSURE_ALERTS = (0, 90)  # close_notify, user_canceled: end the connection whatever their level

_MAX_ALERTS = 8
_MAX_WARNINGS = 8


def is_grease(value: int) -> bool:
    """True for the 16 reserved GREASE code points (RFC 8701)."""
    return value in GREASE_VALUES


def tls_version_name(code: int) -> str:
    """``0x0304`` -> ``"1.3"`` ... ``0x0300`` -> ``"3.0"``; anything else as ``"0x%04X"``."""
    return _TLS_VERSION_NAMES.get(code) or f"0x{code:04X}"


def cipher_suite_name(code: int) -> str:
    """IANA name of a common TLS 1.2 / 1.3 cipher suite, else ``"0x%04X"``."""
    return _CIPHER_SUITE_NAMES.get(code) or f"0x{code:04X}"


def alert_description_name(code: int) -> str:
    """RFC name of an alert description (``40`` -> ``"handshake_failure"``), else the decimal number."""
    return ALERT_DESCRIPTIONS.get(code) or str(code)


# --------------------------------------------------------------------------------------------------
# Hello parsing
# --------------------------------------------------------------------------------------------------


class TlsParseError(ValueError):
    """A handshake message is malformed or truncated."""


class _Cursor:
    """Bounds-checked big-endian reader over ``buf[pos:end]`` (no copies until ``take``)."""

    __slots__ = ("buf", "end", "pos")

    def __init__(self, buf: bytes, pos: int = 0, end: int | None = None) -> None:
        self.buf = buf
        self.pos = pos
        self.end = len(buf) if end is None else end

    def remaining(self) -> int:
        return self.end - self.pos

    def _need(self, n: int, what: str) -> int:
        p = self.pos
        if p + n > self.end:
            raise TlsParseError(f"truncated {what}: need {n} bytes, {self.end - p} left")
        self.pos = p + n
        return p

    def u8(self, what: str) -> int:
        return self.buf[self._need(1, what)]

    def u16(self, what: str) -> int:
        p = self._need(2, what)
        return (self.buf[p] << 8) | self.buf[p + 1]

    def take(self, n: int, what: str) -> bytes:
        p = self._need(n, what)
        return self.buf[p : p + n]

    def sub(self, len_bytes: int, what: str) -> _Cursor:
        """A cursor over the next length-prefixed (1 or 2 byte length) vector."""
        n = self.u8(what) if len_bytes == 1 else self.u16(what)
        p = self._need(n, what)
        return _Cursor(self.buf, p, p + n)

    def u16_list(self, what: str) -> list[int]:
        """The rest of this cursor as big-endian uint16 values."""
        n = self.end - self.pos
        if n & 1:
            raise TlsParseError(f"odd length {n} for {what}")
        vals = struct.unpack_from(f">{n >> 1}H", self.buf, self.pos)
        self.pos = self.end
        return list(vals)


def _no_grease(values: Iterable[int]) -> list[int]:
    return [v for v in values if v not in GREASE_VALUES]


def _decode_text(raw: bytes) -> str:
    return raw.decode("utf-8", "replace")


def _hash12(text: str) -> str:
    return hashlib.sha256(text.encode("ascii")).hexdigest()[:12] if text else "000000000000"


def _is_alnum_byte(b: int) -> bool:
    return 0x30 <= b <= 0x39 or 0x41 <= b <= 0x5A or 0x61 <= b <= 0x7A


def _ja4_alpn(first: bytes | None) -> str:
    """JA4 ALPN chars: first and last byte of the first value, or of its hex form if either isn't alnum."""
    if not first:
        return "00"
    a, z = first[0], first[-1]
    if _is_alnum_byte(a) and _is_alnum_byte(z):
        return chr(a) + chr(z)
    hx = first.hex()
    return hx[0] + hx[-1]


@dataclass(slots=True)
class ClientHello:
    """The fields of a ClientHello that fingerprints and spans use.  GREASE values are removed."""

    legacy_version: int = 0
    supported_versions: list[int] = field(default_factory=list)
    server_name: str | None = None
    alpn: list[str] = field(default_factory=list)
    cipher_suites: list[int] = field(default_factory=list)
    extensions: list[int] = field(default_factory=list)  # wire order
    supported_groups: list[int] = field(default_factory=list)
    ec_point_formats: list[int] = field(default_factory=list)
    signature_algorithms: list[int] = field(default_factory=list)  # wire order
    session_id: bytes = b""
    offers_psk: bool = False
    has_session_ticket: bool = False
    alpn_raw: list[bytes] = field(default_factory=list, repr=False)  # ALPN ids as sent (JA4 needs bytes)

    def max_version(self) -> int:
        """Highest version offered: from supported_versions when present, else legacy_version."""
        return max(self.supported_versions) if self.supported_versions else self.legacy_version

    def offers_early_data(self) -> bool:
        """The client announced 0-RTT data (early_data extension)."""
        return EXT_EARLY_DATA in self.extensions

    def ja3_string(self) -> str:
        """``SSLVersion,Ciphers,Extensions,EllipticCurves,EcPointFormats`` (decimal, '-'-joined)."""
        return ",".join((
            str(self.legacy_version),
            "-".join(map(str, self.cipher_suites)),
            "-".join(map(str, self.extensions)),
            "-".join(map(str, self.supported_groups)),
            "-".join(map(str, self.ec_point_formats)),
        ))

    def ja3(self) -> str:
        """JA3 fingerprint: md5 hex digest of :meth:`ja3_string`."""
        return hashlib.md5(self.ja3_string().encode("ascii"), usedforsecurity=False).hexdigest()

    def ja4(self) -> str:
        """FoxIO JA4 fingerprint (TLS over TCP), e.g. ``t13d1516h2_8daaf6152771_e5627efa2ab1``."""
        if self.supported_versions:
            version = _JA4_VERSIONS.get(max(self.supported_versions), "00")
        else:
            version = _JA4_VERSIONS.get(self.legacy_version, "00")
        sni = "d" if EXT_SERVER_NAME in self.extensions else "i"
        part_a = (f"t{version}{sni}{min(len(self.cipher_suites), 99):02d}"
                  f"{min(len(self.extensions), 99):02d}"
                  f"{_ja4_alpn(self.alpn_raw[0] if self.alpn_raw else None)}")
        ciphers = ",".join(f"{c:04x}" for c in sorted(self.cipher_suites))
        exts = ",".join(f"{e:04x}" for e in sorted(self.extensions)
                        if e != EXT_SERVER_NAME and e != EXT_ALPN)
        if exts and self.signature_algorithms:
            exts += "_" + ",".join(f"{s:04x}" for s in self.signature_algorithms)
        return f"{part_a}_{_hash12(ciphers)}_{_hash12(exts)}"


@dataclass(slots=True)
class ServerHello:
    """The fields of a ServerHello (or HelloRetryRequest) that the tracker uses."""

    legacy_version: int = 0
    selected_version: int = 0
    cipher_suite: int = 0
    session_id: bytes = b""
    alpn: str | None = None
    is_hello_retry_request: bool = False
    psk_accepted: bool = False
    extensions: list[int] = field(default_factory=list)  # wire order

    def ja3s_string(self) -> str:
        """``SSLVersion,Cipher,Extensions`` (decimal)."""
        return f"{self.legacy_version},{self.cipher_suite},{'-'.join(map(str, self.extensions))}"

    def ja3s(self) -> str:
        """JA3S fingerprint: md5 hex digest of :meth:`ja3s_string`."""
        return hashlib.md5(self.ja3s_string().encode("ascii"), usedforsecurity=False).hexdigest()


def parse_client_hello(handshake_body: bytes) -> ClientHello:
    """Decode a ClientHello handshake body (after the 4-byte handshake header).

    Raises :class:`TlsParseError` when it is malformed or truncated.
    """
    buf = bytes(handshake_body)
    c = _Cursor(buf)
    ch = ClientHello(legacy_version=c.u16("client_version"))
    c.take(32, "random")
    sid = c.sub(1, "session_id")
    if sid.remaining() > 32:
        raise TlsParseError(f"session_id of {sid.remaining()} bytes")
    ch.session_id = buf[sid.pos : sid.end]
    ch.cipher_suites = _no_grease(c.sub(2, "cipher_suites").u16_list("cipher_suites"))
    c.sub(1, "compression_methods")
    if c.remaining() == 0:  # no extensions block at all (legal before TLS 1.3)
        return ch
    exts = c.sub(2, "extensions")
    extensions = ch.extensions
    while exts.remaining():
        etype = exts.u16("extension type")
        data = exts.sub(2, "extension data")
        if etype in GREASE_VALUES:
            continue
        extensions.append(etype)
        if etype == EXT_SERVER_NAME:
            names = data.sub(2, "server_name_list")
            while names.remaining():
                name_type = names.u8("server name type")
                name = names.sub(2, "server name")
                if name_type == 0 and ch.server_name is None:
                    ch.server_name = _decode_text(buf[name.pos : name.end])
        elif etype == EXT_ALPN:
            protos = data.sub(2, "alpn list")
            while protos.remaining():
                p = protos.sub(1, "alpn protocol")
                raw = buf[p.pos : p.end]
                ch.alpn_raw.append(raw)
                ch.alpn.append(_decode_text(raw))
        elif etype == EXT_SUPPORTED_GROUPS:
            ch.supported_groups = _no_grease(data.sub(2, "supported_groups").u16_list("supported_groups"))
        elif etype == EXT_EC_POINT_FORMATS:
            pf = data.sub(1, "ec_point_formats")
            ch.ec_point_formats = list(buf[pf.pos : pf.end])
        elif etype == EXT_SIGNATURE_ALGORITHMS:
            ch.signature_algorithms = _no_grease(
                data.sub(2, "signature_algorithms").u16_list("signature_algorithms"))
        elif etype == EXT_SUPPORTED_VERSIONS:
            ch.supported_versions = _no_grease(
                data.sub(1, "supported_versions").u16_list("supported_versions"))
        elif etype == EXT_PRE_SHARED_KEY:
            ch.offers_psk = True
        elif etype == EXT_SESSION_TICKET:
            ch.has_session_ticket = data.remaining() > 0
    return ch


def parse_server_hello(handshake_body: bytes) -> ServerHello:
    """Decode a ServerHello / HelloRetryRequest handshake body (after the 4-byte handshake header).

    Raises :class:`TlsParseError` when it is malformed or truncated.
    """
    buf = bytes(handshake_body)
    c = _Cursor(buf)
    legacy = c.u16("server_version")
    sh = ServerHello(legacy_version=legacy, selected_version=legacy)
    sh.is_hello_retry_request = c.take(32, "random") == HRR_RANDOM
    sid = c.sub(1, "session_id")
    if sid.remaining() > 32:
        raise TlsParseError(f"session_id of {sid.remaining()} bytes")
    sh.session_id = buf[sid.pos : sid.end]
    sh.cipher_suite = c.u16("cipher_suite")
    c.u8("compression_method")
    if c.remaining() == 0:
        return sh
    exts = c.sub(2, "extensions")
    while exts.remaining():
        etype = exts.u16("extension type")
        data = exts.sub(2, "extension data")
        sh.extensions.append(etype)
        if etype == EXT_SUPPORTED_VERSIONS:
            sh.selected_version = data.u16("selected_version")
        elif etype == EXT_ALPN:
            protos = data.sub(2, "alpn list")
            p = protos.sub(1, "alpn protocol")
            sh.alpn = _decode_text(buf[p.pos : p.end])
        elif etype == EXT_PRE_SHARED_KEY:
            sh.psk_accepted = True
    return sh


# --------------------------------------------------------------------------------------------------
# Record layer
# --------------------------------------------------------------------------------------------------


@dataclass(slots=True)
class TlsRecord:
    """One record whose header was seen and whose body was fully accounted for (captured or missing).

    ``fragment`` holds the captured body prefix: shorter than ``length`` when capture gaps hit the body
    (``complete`` is then False), or empty when the reader was told not to collect this content type.
    """

    content_type: int
    version: int
    length: int
    fragment: bytes
    complete: bool


def _plausible_header(data: bytes | bytearray | memoryview) -> bool:
    """Strict check that ``data`` starts with a record header (used to resynchronise after a gap)."""
    return (len(data) >= 5 and CT_CHANGE_CIPHER_SPEC <= data[0] <= CT_APPLICATION_DATA and data[1] == 3
            and data[2] <= 4 and ((data[3] << 8) | data[4]) <= MAX_RECORD_LEN)


class TlsRecordReader:
    """Reassembles the TLS records of ONE direction from captured messages.

    ``feed(data, total_len)`` returns the records completed by this message.  ``total_len > len(data)``
    means the message's tail was not captured: inside a record body that is harmless (the record is
    returned with ``complete=False`` and the reader stays in sync); over a record header the reader is
    desynchronised: ``error`` is set and no more records come out, unless ``resync=True`` and a later
    message starts with a plausible record header (writes usually start on a record boundary).
    Invalid content types or lengths set ``error`` ("not a TLS record: ...") for good.

    ``collect_types`` limits which content types keep their fragments (None = all); others are skipped
    without copying.  At most one record is buffered (<= :data:`MAX_RECORD_LEN` bytes).
    """

    __slots__ = (
        "_append", "_frag", "_gapped", "_hdr", "_in_record", "_keep", "_len", "_need", "_resync",
        "_type", "_ver", "bytes", "collect_types", "desynced", "error", "missing_bytes", "records",
        "resyncs",
    )

    def __init__(self, *, collect_types: Iterable[int] | None = None, resync: bool = False) -> None:
        self.collect_types: frozenset[int] | None = (
            None if collect_types is None else frozenset(collect_types))
        self.error: str | None = None
        self.desynced = False  # error is a capture-gap desync (recoverable with resync=True)
        self.records: dict[int, int] = {}  # content type -> records seen
        self.bytes = 0  # stream bytes accounted for, captured or not
        self.missing_bytes = 0  # of which not captured
        self.resyncs = 0
        self._resync = resync
        self._hdr = bytearray()
        self._frag = bytearray()
        self._in_record = False
        self._type = 0
        self._ver = 0
        self._len = 0
        self._need = 0
        self._keep = False  # this record's fragment is returned
        self._append = False  # bytes are still appended to it (False after a gap)
        self._gapped = False

    @property
    def buffered_bytes(self) -> int:
        """Bytes held for a partially received record (header and body)."""
        return len(self._hdr) + len(self._frag)

    @property
    def total_records(self) -> int:
        """Records seen, all content types."""
        return sum(self.records.values())

    def partial_header(self) -> tuple[int, int] | None:
        """(content type, length) of the record whose header was read but whose body is still due."""
        return (self._type, self._len) if self._in_record else None

    def feed(self, data: bytes | bytearray | memoryview, total_len: int | None = None) -> list[TlsRecord]:
        """Consume one captured message; return the records it completed, in stream order."""
        mv = memoryview(data)
        if mv.format != "B" or mv.ndim != 1:
            mv = mv.cast("B")
        n = len(mv)
        total = n if total_len is None or total_len < n else total_len
        self.bytes += total
        gap = total - n
        if self.error is not None:
            if not (self.desynced and self._resync and _plausible_header(mv)):
                self.missing_bytes += gap
                return []
            self.error = None
            self.desynced = False
            self.resyncs += 1
        out: list[TlsRecord] = []
        collect = self.collect_types
        pos = 0
        while pos < n:
            if self._in_record:  # continue a record body
                take = self._need if self._need <= n - pos else n - pos
                if self._append:
                    self._frag += mv[pos : pos + take]
                pos += take
                self._need -= take
                if self._need == 0:
                    out.append(self._finish())
                continue
            hdr = self._hdr
            if hdr or n - pos < 5:  # header split across messages
                take = min(5 - len(hdr), n - pos)
                hdr += mv[pos : pos + take]
                pos += take
                if len(hdr) < 5:
                    break
                ct, major, minor, length = hdr[0], hdr[1], hdr[2], (hdr[3] << 8) | hdr[4]
                hdr.clear()
            else:
                ct, major, minor, length = mv[pos], mv[pos + 1], mv[pos + 2], (mv[pos + 3] << 8) | mv[pos + 4]
                pos += 5
            if not CT_CHANGE_CIPHER_SPEC <= ct <= CT_HEARTBEAT or major != 3 or minor > 4 \
                    or length > MAX_RECORD_LEN:
                self._fail(f"not a TLS record: header {ct:02x} {major:02x}{minor:02x} length {length}")
                return out
            keep = collect is None or ct in collect
            version = (major << 8) | minor
            if pos + length <= n:  # fast path: whole body in this message
                frag = bytes(mv[pos : pos + length]) if keep else b""
                pos += length
                self.records[ct] = self.records.get(ct, 0) + 1
                out.append(TlsRecord(ct, version, length, frag, True))
                continue
            self._in_record = True
            self._type, self._ver, self._len, self._need = ct, version, length, length
            self._keep = self._append = keep
            self._gapped = False
        if gap:
            self._apply_gap(gap, out)
        return out

    def _apply_gap(self, gap: int, out: list[TlsRecord]) -> None:
        self.missing_bytes += gap
        if self._in_record:
            self._gapped = True
            self._append = False
            if gap <= self._need:  # the hole is inside this body: still in sync
                self._need -= gap
                if self._need == 0:
                    out.append(self._finish())
                return
            self._need = 0  # the hole runs past this record: hand out what we have, then desync
            out.append(self._finish())
        self._desync(f"desynchronised: capture gap of {gap} bytes covers a record header")

    def _finish(self) -> TlsRecord:
        frag = bytes(self._frag) if self._keep else b""
        self._frag.clear()
        ct = self._type
        self.records[ct] = self.records.get(ct, 0) + 1
        self._in_record = False
        return TlsRecord(ct, self._ver, self._len, frag, not self._gapped)

    def _reset_partial(self) -> None:
        self._hdr.clear()
        self._frag = bytearray()
        self._in_record = False
        self._need = 0

    def _desync(self, msg: str) -> None:
        self._reset_partial()
        self.error = msg
        self.desynced = True

    def _fail(self, msg: str) -> None:
        self._reset_partial()
        self.error = msg
        self.desynced = False


class HandshakeReassembler:
    """Turns the fragments of handshake records (one direction) into ``(msg_type, body)`` messages.

    Messages may span records and records may hold several messages.  ``feed(fragment, missing)`` takes
    a record's captured fragment and the number of its bytes that were not captured: the reassembler
    stays in sync when the hole falls inside a message whose header was seen (that message is dropped
    and counted in ``lost``); otherwise ``error`` is set and nothing more is produced.  Messages larger
    than ``max_message`` bytes are skipped without buffering (counted in ``skipped``) so the buffer
    never exceeds ``max_message`` bytes.
    """

    __slots__ = ("_buf", "_max", "_skip", "error", "lost", "messages", "skipped")

    def __init__(self, max_message: int = MAX_HANDSHAKE_MESSAGE) -> None:
        self._buf = bytearray()
        self._max = max_message
        self._skip = 0  # bytes still to drop (rest of a skipped or lost message)
        self.error: str | None = None
        self.messages = 0
        self.skipped = 0
        self.lost = 0

    @property
    def buffered_bytes(self) -> int:
        """Bytes held for a partially received message."""
        return len(self._buf)

    def feed(self, fragment: bytes | bytearray | memoryview, missing: int = 0) -> list[tuple[int, bytes]]:
        """Consume one handshake-record fragment (+ ``missing`` uncaptured bytes after it)."""
        if self.error is not None:
            return []
        out: list[tuple[int, bytes]] = []
        data = memoryview(fragment)
        if self._skip:
            k = min(self._skip, len(data))
            data = data[k:]
            self._skip -= k
        buf = self._buf
        if len(data):
            buf += data
        off, blen = 0, len(buf)
        while blen - off >= 4:
            total = 4 + ((buf[off + 1] << 16) | (buf[off + 2] << 8) | buf[off + 3])
            if total > self._max:  # too big to buffer (and never one we parse): skip it
                self.skipped += 1
                if blen - off >= total:
                    off += total
                    continue
                self._skip = total - (blen - off)
                off = blen
                break
            if blen - off < total:
                break
            out.append((buf[off], bytes(buf[off + 4 : off + total])))
            off += total
        if off:
            del buf[:off]
        self.messages += len(out)
        if missing > 0:
            self._apply_gap(missing)
        return out

    def _apply_gap(self, missing: int) -> None:
        buf = self._buf
        if self._skip:
            remaining = self._skip
        elif len(buf) >= 4:
            remaining = 4 + ((buf[1] << 16) | (buf[2] << 8) | buf[3]) - len(buf)
            self.lost += 1
        else:
            remaining = -1  # the hole starts at (or inside) a message header
        buf.clear()
        if missing <= remaining:
            self._skip = remaining - missing
        else:
            self._skip = 0
            self.error = "handshake stream desynchronised by a capture gap"


# --------------------------------------------------------------------------------------------------
# Per-connection tracker
# --------------------------------------------------------------------------------------------------

_COLLECT_HELLO = frozenset((CT_ALERT, CT_HANDSHAKE))
_COLLECT_ALERTS = frozenset((CT_ALERT,))
_COLLECT_NOTHING: frozenset[int] = frozenset()


class TlsHandshakeTracker:
    """Follows one downstream connection's TLS handshake from both directions of captured bytes.

    Feed ``on_client_data`` (bytes Envoy read from the client; ``peek=True`` for ``MSG_PEEK``) and
    ``on_server_data`` (bytes Envoy wrote to the client) in capture order, then read the attributes or
    :meth:`summary`.  Public methods never raise; problems are recorded in ``error`` (the handshake
    failed or could not be followed) and ``warnings`` (capture imperfections that were survived).

    Completion (``completed_ns`` = timestamp of the message that completed it):

    * TLS 1.3: the first client message after the ServerHello holding an application-data record
      (the encrypted client Finished; a CCS alone doesn't count).  A lone record too short to be a
      Finished is taken for an encrypted alert (``error`` "tls alert (encrypted)") unless more client
      records follow.  If the server's first record after completion is a lone alert-sized encrypted
      record (it rejected the client's flight, e.g. a missing client certificate), the completion is
      withdrawn and ``error`` is "tls alert (encrypted) from the server after the client Finished".
      ``resumed`` = the server accepted a PSK.
    * TLS 1.2 full: the server message holding its ChangeCipherSpec after the client sent its own.
    * TLS 1.2 abbreviated (``resumed``): the server's first flight holds its CCS; completion is the next
      client message holding the client's CCS.
    * An alert before completion ends the handshake (except non-closure warnings in TLS <= 1.2).

    After completion only record counts are kept (``app_records_in/out``), cheaply.
    """

    __slots__ = (
        "_abbreviated", "_pending_counted", "_ch_done", "_check_server_reply", "_chs", "_client_ccs", "_client_reads", "_cr",
        "_error", "_failed", "_flight_open", "_head", "_sh_done", "_shs", "_sr", "_suspect_alert", "_tls13",
        "alerts", "app_records_in", "app_records_out", "cipher", "client_hello", "completed_ns",
        "hello_retry_request", "is_tls", "negotiated_alpn", "resumed", "server_hello", "server_hello_ns",
        "started_ns", "version", "warnings",
    )

    def __init__(self, *, resync: bool = True) -> None:
        """``resync``: after a capture gap desynchronises a direction, pick the stream up again at the
        next message that starts with a plausible record header."""
        self.is_tls: bool | None = None
        self.client_hello: ClientHello | None = None
        self.server_hello: ServerHello | None = None
        self.hello_retry_request: ServerHello | None = None
        self.started_ns: int | None = None
        self.server_hello_ns: int | None = None
        self.completed_ns: int | None = None
        self.version: str | None = None
        self.cipher: str | None = None
        self.resumed: bool | None = None
        self.negotiated_alpn: str | None = None
        self.alerts: list[tuple[str, int, int]] = []  # (sender "client"/"server", level, description)
        self.warnings: list[str] = []
        self.app_records_in = 0
        self.app_records_out = 0
        self._error: str | None = None
        self._cr = TlsRecordReader(collect_types=_COLLECT_HELLO, resync=resync)
        self._sr = TlsRecordReader(collect_types=_COLLECT_HELLO, resync=resync)
        self._chs = HandshakeReassembler()
        self._shs = HandshakeReassembler()
        self._head = b""  # first (< 3) client bytes while is_tls is undecided
        self._client_reads = 0  # non-peek client messages
        self._pending_counted = False  # a record judged by its header alone, its body still due
        self._ch_done = False  # ClientHello parsed, failed or lost: stop looking for it
        self._sh_done = False  # final ServerHello parsed or lost
        self._tls13 = False
        self._flight_open = False  # TLS <= 1.2: server's first flight, before any client data after SH
        self._abbreviated = False
        self._client_ccs = False
        self._suspect_alert = False
        self._check_server_reply = False  # TLS 1.3: look at the server's first record after completion
        self._failed = False  # alert seen / internal error: handshake over, no completion possible

    # ---- public API --------------------------------------------------------------------------------

    @property
    def error(self) -> str | None:
        """Why the handshake failed or could not be followed; None when all is well (so far)."""
        if self._error is not None:
            return self._error
        if self.completed_ns is None:
            if self._suspect_alert:
                return "tls alert (encrypted)"
            if self._cr.error is not None:
                return f"client stream: {self._cr.error}"
            if self._sr.error is not None:
                return f"server stream: {self._sr.error}"
        return None

    @property
    def established(self) -> bool:
        """The handshake completed."""
        return self.completed_ns is not None

    @property
    def records_in(self) -> int:
        """Records read from the client (peeks excluded)."""
        return self._cr.total_records

    @property
    def records_out(self) -> int:
        """Records written to the client."""
        return self._sr.total_records

    @property
    def bytes_in(self) -> int:
        """Bytes read from the client (peeks excluded), captured or not."""
        return self._cr.bytes

    @property
    def bytes_out(self) -> int:
        """Bytes written to the client, captured or not."""
        return self._sr.bytes

    def buffered_bytes(self) -> int:
        """Bytes currently held in reassembly buffers (bounded by ~2 records + 2 handshake messages)."""
        return (self._cr.buffered_bytes + self._sr.buffered_bytes + self._chs.buffered_bytes
                + self._shs.buffered_bytes + len(self._head))

    def on_client_data(self, ts_ns: int, data: bytes, total_len: int | None = None,
                       peek: bool = False) -> None:
        """Bytes Envoy read from the client (``peek``: a ``MSG_PEEK`` read, not consumed)."""
        try:
            if peek:
                self._client_peek(ts_ns, data, total_len)
            else:
                self._client_read(ts_ns, data, total_len)
        except Exception as exc:  # defensive: never let a parser bug escape into the daemon
            self._internal_error(exc)

    def on_server_data(self, ts_ns: int, data: bytes, total_len: int | None = None) -> None:
        """Bytes Envoy wrote to the client."""
        try:
            self._server_write(ts_ns, data, total_len)
        except Exception as exc:  # defensive, as above
            self._internal_error(exc)

    def summary(self) -> dict[str, object]:
        """OpenTelemetry ``tls.*`` attributes of what was observed (unknown values are omitted)."""
        if self.is_tls is not True:
            return {}
        attrs: dict[str, object] = {"tls.protocol.name": "tls"}
        if self.version is not None:
            attrs["tls.protocol.version"] = self.version
        ch = self.client_hello
        if ch is not None:
            if ch.server_name is not None:
                attrs["tls.client.server_name"] = ch.server_name
            attrs["tls.client.supported_alpn"] = list(ch.alpn)
            attrs["tls.client.supported_ciphers"] = [cipher_suite_name(c) for c in ch.cipher_suites]
            attrs["tls.client.ja3"] = ch.ja3()
            attrs["tls.client.ja4"] = ch.ja4()
        if self.server_hello is not None:
            attrs["tls.server.ja3s"] = self.server_hello.ja3s()
        if self.negotiated_alpn is not None:
            attrs["tls.next_protocol"] = self.negotiated_alpn
        if self.cipher is not None:
            attrs["tls.cipher"] = self.cipher
        if self.resumed is not None:
            attrs["tls.resumed"] = self.resumed
        attrs["tls.established"] = self.completed_ns is not None
        return attrs

    # ---- client direction ----------------------------------------------------------------------------

    def _client_peek(self, ts_ns: int, data: bytes, total_len: int | None) -> None:
        if self.is_tls is False or self._failed:
            return
        if self.client_hello is not None or self._client_reads:
            return  # a peek after the stream moved on shows nothing new for us
        if self.is_tls is None:
            self._decide(bytes(data[:3]), remember=False)
            if self.is_tls is False:
                return
        if not len(data):
            return
        if self.started_ns is None or ts_ns < self.started_ns:
            self.started_ns = ts_ns
        if self._ch_done:
            return
        # Parse from scratch with throw-away state: a peek doesn't consume, the next read shows it again.
        reader = TlsRecordReader(collect_types=(CT_HANDSHAKE,))
        hs = HandshakeReassembler()
        for rec in reader.feed(data, total_len):
            if rec.content_type != CT_HANDSHAKE:
                return
            for msg_type, body in hs.feed(rec.fragment, rec.length - len(rec.fragment)):
                if msg_type == HS_CLIENT_HELLO:
                    self._on_client_hello(body)
                return

    def _client_read(self, ts_ns: int, data: bytes, total_len: int | None) -> None:
        if self.is_tls is False:
            return
        self._client_reads += 1
        if self.is_tls is None:
            self._decide(self._head + bytes(data[: 3 - len(self._head)]), remember=True)
            if self.is_tls is False:
                return
        if self.started_ns is None and (len(data) or self._head):
            self.started_ns = ts_ns
        reader = self._cr
        if self.completed_ns is not None or self._failed:
            before = reader.records.get(CT_APPLICATION_DATA, 0)
            reader.feed(data, total_len)
            if self.completed_ns is not None:
                delta = reader.records.get(CT_APPLICATION_DATA, 0) - before
                if delta and self._pending_counted:  # the record judged by its header completed now
                    delta -= 1
                    self._pending_counted = False
                self.app_records_in += delta
            return
        records = reader.feed(data, total_len)
        partial = reader.partial_header()
        if partial is not None and partial[0] == CT_APPLICATION_DATA and not self._failed:
            # The kernel stops capturing at a client application-data record header (the handshake is
            # over by then), so its body may never arrive: judge the record by its header. If the body
            # does arrive, that record is not counted again as application data.
            records = [*records, TlsRecord(CT_APPLICATION_DATA, 0, partial[1], b"", False)]
            self._pending_counted = True
        if self._flight_open:  # the client answered: the server's first flight is over
            self._flight_open = False
            if not self._abbreviated:
                self.resumed = False
        sh = self.server_hello
        for rec in records:
            ct = rec.content_type
            if self.completed_ns is not None:
                if ct == CT_APPLICATION_DATA:
                    self.app_records_in += 1
                continue
            if self._failed:
                break
            if ct == CT_HANDSHAKE:
                if not self._ch_done:
                    self._client_handshake_record(rec)
            elif ct == CT_ALERT:
                self._on_alert("client", rec)
            elif sh is None:
                continue
            elif ct == CT_CHANGE_CIPHER_SPEC:
                if not self._tls13:
                    if self._abbreviated:
                        self._complete(ts_ns)
                    else:
                        self._client_ccs = True
            elif ct == CT_APPLICATION_DATA and self._tls13:
                if (rec.length >= _MIN_TLS13_FINISHED_RECORD or self._suspect_alert
                        or (sh.psk_accepted and self.client_hello is not None
                            and self.client_hello.offers_early_data())):
                    self._suspect_alert = False
                    self._complete(ts_ns)
                else:
                    self._suspect_alert = True
        if reader.error is not None:
            if not reader.desynced:
                self._failed = True
            elif not self._ch_done:  # a partial ClientHello cannot be trusted across a lost header
                self._ch_done = True
                reader.collect_types = _COLLECT_ALERTS
                self._warn("ClientHello not fully captured")

    def _client_handshake_record(self, rec: TlsRecord) -> None:
        chs = self._chs
        for msg_type, body in chs.feed(rec.fragment, rec.length - len(rec.fragment)):
            if msg_type == HS_CLIENT_HELLO and not self._ch_done:
                self._on_client_hello(body)
        if not self._ch_done and (chs.error is not None or chs.lost):
            self._ch_done = True
            self._warn("ClientHello not fully captured")
        if self._ch_done:
            self._cr.collect_types = _COLLECT_ALERTS

    def _on_client_hello(self, body: bytes) -> None:
        self._ch_done = True
        self._cr.collect_types = _COLLECT_ALERTS
        try:
            self.client_hello = parse_client_hello(body)
            self.is_tls = True
        except TlsParseError as exc:
            self._set_error(f"malformed ClientHello: {exc}")

    # ---- server direction ----------------------------------------------------------------------------

    def _server_write(self, ts_ns: int, data: bytes, total_len: int | None) -> None:
        if self.is_tls is None and not self._client_reads and self.started_ns is None:
            self.is_tls = False  # the server spoke first: not a TLS server
            return
        if self.is_tls is False:
            return
        reader = self._sr
        if self.completed_ns is not None or self._failed:
            before = reader.records.get(CT_APPLICATION_DATA, 0)
            records = reader.feed(data, total_len)
            if self._check_server_reply and records:
                self._check_server_reply = False
                first = records[0]
                if (len(records) == 1 and first.content_type == CT_APPLICATION_DATA
                        and first.length <= _MAX_TLS13_ALERT_RECORD):
                    # The server's first word after the client Finished is a lone alert-sized record
                    # instead of session tickets or data: it refused the client's flight (typically
                    # certificate_required / bad_certificate with mTLS).  The handshake did not complete.
                    self.completed_ns = None
                    self._failed = True
                    self._set_error("tls alert (encrypted) from the server after the client Finished")
                    return
            if self.completed_ns is not None:
                self.app_records_out += reader.records.get(CT_APPLICATION_DATA, 0) - before
            return
        for rec in reader.feed(data, total_len):
            ct = rec.content_type
            if self.completed_ns is not None:
                if ct == CT_APPLICATION_DATA:
                    self.app_records_out += 1
                continue
            if self._failed:
                break
            if ct == CT_HANDSHAKE:
                if not self._sh_done:
                    self._server_handshake_record(ts_ns, rec)
            elif ct == CT_ALERT:
                self._on_alert("server", rec)
            elif ct == CT_CHANGE_CIPHER_SPEC and self.server_hello is not None and not self._tls13:
                if self._flight_open:
                    self._abbreviated = True
                    self.resumed = True
                elif self._client_ccs:
                    self._complete(ts_ns)
        if reader.error is not None:
            if not reader.desynced:
                self._failed = True
            elif not self._sh_done:
                self._sh_done = True
                reader.collect_types = _COLLECT_ALERTS
                self._warn("ServerHello not fully captured")

    def _server_handshake_record(self, ts_ns: int, rec: TlsRecord) -> None:
        shs = self._shs
        for msg_type, body in shs.feed(rec.fragment, rec.length - len(rec.fragment)):
            if msg_type == HS_SERVER_HELLO and not self._sh_done:
                self._on_server_hello(ts_ns, body)
        if not self._sh_done and (shs.error is not None or shs.lost):
            self._sh_done = True
            self._sr.collect_types = _COLLECT_ALERTS
            self._warn("ServerHello not fully captured")

    def _on_server_hello(self, ts_ns: int, body: bytes) -> None:
        try:
            sh = parse_server_hello(body)
        except TlsParseError as exc:
            self._sh_done = True
            self._sr.collect_types = _COLLECT_ALERTS
            self._set_error(f"malformed ServerHello: {exc}")
            return
        if sh.is_hello_retry_request:
            if self.hello_retry_request is not None:
                self._warn("second HelloRetryRequest")
            self.hello_retry_request = sh
            return  # keep looking for the real ServerHello
        self._sh_done = True
        self._sr.collect_types = _COLLECT_ALERTS
        self._cr.collect_types = _COLLECT_ALERTS
        self._ch_done = True
        self.server_hello = sh
        self.server_hello_ns = ts_ns
        self.is_tls = True
        self.version = tls_version_name(sh.selected_version)
        self.cipher = cipher_suite_name(sh.cipher_suite)
        self.negotiated_alpn = sh.alpn
        self._tls13 = sh.selected_version == 0x0304 or (sh.selected_version >> 8) == 0x7F
        if self._tls13:
            self.resumed = sh.psk_accepted
        else:
            self._flight_open = True

    # ---- shared --------------------------------------------------------------------------------------

    def _decide(self, head: bytes, remember: bool) -> None:
        """is_tls from the first client bytes: a handshake record header 16 03 0x.

        ``remember``: keep an undecided prefix (< 3 bytes) to complete with the next read; peeks don't,
        since every peek starts again at the beginning of the stream.
        """
        if not head:
            return
        if head[0] != CT_HANDSHAKE or (len(head) > 1 and head[1] != 3) or (len(head) > 2 and head[2] > 4):
            self.is_tls = False
            self._head = b""
        elif len(head) >= 3:
            self.is_tls = True
            self._head = b""
        elif remember:
            self._head = head

    def _on_alert(self, sender: str, rec: TlsRecord) -> None:
        frag = rec.fragment
        if rec.length == 2 and len(frag) == 2:  # plaintext (encrypted alerts are >= 17 bytes)
            level, desc = frag[0], frag[1]
            if len(self.alerts) < _MAX_ALERTS:
                self.alerts.append((sender, level, desc))
            text = f"tls alert {_ALERT_LEVELS.get(level, str(level))}/{alert_description_name(desc)}"
            if level == 1 and desc not in _CLOSURE_ALERTS and not self._tls13:
                self._warn(f"{sender} sent {text}")  # a warning alert: the handshake may go on
                return
        else:
            text = "tls alert (encrypted)"
        self._set_error(text)
        self._failed = True

    def _complete(self, ts_ns: int) -> None:
        self.completed_ns = ts_ns
        if self.resumed is None:
            self.resumed = False
        self._flight_open = False
        self._check_server_reply = self._tls13
        self._cr.collect_types = _COLLECT_NOTHING
        self._sr.collect_types = _COLLECT_NOTHING

    def _set_error(self, msg: str) -> None:
        if self._error is None:
            self._error = msg

    def _warn(self, msg: str) -> None:
        if len(self.warnings) < _MAX_WARNINGS:
            self.warnings.append(msg)

    def _internal_error(self, exc: Exception) -> None:
        self._failed = True
        self._set_error(f"internal error: {type(exc).__name__}: {exc}")

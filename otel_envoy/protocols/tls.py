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
from typing import TypeVar

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


_RECORD_HEADER = struct.Struct(">BBBH")  # content type, version major, minor, length
_EXT_HEADER = struct.Struct(">HH")  # extension type, extension data length
_U16_STRUCTS = tuple(struct.Struct(f">{i}H") for i in range(128))  # n big-endian uint16 values


def _truncated(what: str, need: int, left: int) -> TlsParseError:
    return TlsParseError(f"truncated {what}: need {need} bytes, {left} left")


def _vec(buf: bytes, p: int, end: int, len_bytes: int, what: str) -> tuple[int, int]:
    """Bounds of the length-prefixed (1 or 2 byte length) vector at ``buf[p:end]``: (start, stop)."""
    if p + len_bytes > end:
        raise _truncated(what, len_bytes, end - p)
    if len_bytes == 1:
        n = buf[p]
        p += 1
    else:
        n = (buf[p] << 8) | buf[p + 1]
        p += 2
    if p + n > end:
        raise _truncated(what, n, end - p)
    return p, p + n


def _u16_vector(buf: bytes, p: int, end: int, len_bytes: int, what: str) -> tuple[list[int], int]:
    """The length-prefixed vector of big-endian uint16 values at ``buf[p:end]``, GREASE removed, and
    the position after it."""
    if p + len_bytes > end:
        raise _truncated(what, len_bytes, end - p)
    if len_bytes == 1:
        n = buf[p]
        p += 1
    else:
        n = (buf[p] << 8) | buf[p + 1]
        p += 2
    if p + n > end:
        raise _truncated(what, n, end - p)
    if n & 1:
        raise TlsParseError(f"odd length {n} for {what}")
    k = n >> 1
    values = _U16_STRUCTS[k].unpack_from(buf, p) if k < 128 else struct.unpack_from(f">{k}H", buf, p)
    if GREASE_VALUES.isdisjoint(values):
        return list(values), p + n
    return [v for v in values if v not in GREASE_VALUES], p + n


def _hash12(text: str) -> str:
    return hashlib.sha256(text.encode("ascii")).hexdigest()[:12] if text else "000000000000"


def _hex16(values: list[int]) -> str:
    """``[0x1301, 0xc02b]`` -> ``"1301,c02b"`` (4 lowercase hex digits per value, comma-separated)."""
    try:
        return struct.pack(f">{len(values)}H", *values).hex(",", 2)
    except struct.error:  # not uint16 values (never from the parser): format them one by one
        return ",".join(f"{v:04x}" for v in values)


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
        extensions = self.extensions
        ciphers = self.cipher_suites
        version = _JA4_VERSIONS.get(self.max_version(), "00")
        sni = "d" if EXT_SERVER_NAME in extensions else "i"
        part_a = (f"t{version}{sni}{min(len(ciphers), 99):02d}{min(len(extensions), 99):02d}"
                  f"{_ja4_alpn(self.alpn_raw[0] if self.alpn_raw else None)}")
        exts = _hex16(sorted([e for e in extensions if e != EXT_SERVER_NAME and e != EXT_ALPN]))
        if exts and self.signature_algorithms:
            exts += "_" + _hex16(self.signature_algorithms)
        return f"{part_a}_{_hash12(_hex16(sorted(ciphers)))}_{_hash12(exts)}"


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


# Fingerprints and cipher names for summary(), cached by the hello's content (never by object identity,
# so a changed ClientHello is never served stale values): connections from the same kind of client share
# them.  Bounded: at most _FP_CACHE_ENTRIES entries per cache (emptied when full), and hellos with more
# than _FP_KEY_MAX list values are not cached: ~1 MiB at worst (hostile hellos), a few KiB typically.
_FP_CACHE_ENTRIES = 64
_FP_KEY_MAX = 128
_hello_cache: dict[tuple[object, ...], tuple[tuple[str, ...], str, str]] = {}
_ja4_cache: dict[tuple[object, ...], tuple[tuple[str, ...], str]] = {}
_ja3s_cache: dict[tuple[object, ...], str] = {}
_V = TypeVar("_V")


def _cache_put(cache: dict[tuple[object, ...], _V], key: tuple[object, ...], value: _V) -> _V:
    if len(cache) >= _FP_CACHE_ENTRIES:
        cache.clear()
    cache[key] = value
    return value


def _client_fingerprints(ch: ClientHello) -> tuple[tuple[str, ...], str, str]:
    """(cipher suite names, JA3, JA4) of ``ch``, cached by content. The names tuple is the cached object
    itself: the exporters encode a tuple they have seen before only once (by identity)."""
    ciphers = ch.cipher_suites
    extensions = ch.extensions
    if (len(ciphers) + len(extensions) + len(ch.supported_groups) + len(ch.signature_algorithms)
            + len(ch.ec_point_formats) + len(ch.supported_versions) > _FP_KEY_MAX):
        return tuple([cipher_suite_name(c) for c in ciphers]), ch.ja3(), ch.ja4()
    key = (ch.legacy_version, ch.max_version(), tuple(ciphers), tuple(extensions),
           tuple(ch.supported_groups), tuple(ch.ec_point_formats), tuple(ch.signature_algorithms),
           ch.alpn_raw[0] if ch.alpn_raw else None)
    hit = _hello_cache.get(key)
    if hit is None:
        # Some clients shuffle their extensions per connection: JA4 (and the cipher names) don't depend on
        # their order, so they have a cache whose key doesn't either.
        key4 = (key[1], key[2], tuple(sorted(extensions)), key[6], key[7])
        hit4 = _ja4_cache.get(key4)
        if hit4 is None:
            names = tuple([_CIPHER_SUITE_NAMES.get(c) or f"0x{c:04X}" for c in ciphers])
            hit4 = _cache_put(_ja4_cache, key4, (names, ch.ja4()))
        hit = _cache_put(_hello_cache, key, (hit4[0], ch.ja3(), hit4[1]))
    return hit[0], hit[1], hit[2]


def _server_fingerprint(sh: ServerHello) -> str:
    """JA3S of ``sh``, cached by content."""
    if len(sh.extensions) > _FP_KEY_MAX:
        return sh.ja3s()
    key = (sh.legacy_version, sh.cipher_suite, tuple(sh.extensions))
    ja3s = _ja3s_cache.get(key)
    if ja3s is None:
        ja3s = _cache_put(_ja3s_cache, key, sh.ja3s())
    return ja3s


# Extensions parse_client_hello looks into (others are only listed).
_CH_PARSED_EXTENSIONS = frozenset((
    EXT_SERVER_NAME, EXT_ALPN, EXT_SUPPORTED_GROUPS, EXT_EC_POINT_FORMATS, EXT_SIGNATURE_ALGORITHMS,
    EXT_SUPPORTED_VERSIONS, EXT_PRE_SHARED_KEY, EXT_SESSION_TICKET,
))


def _hello_session_id_length(buf: bytes, version_field: str) -> int:
    """Checks a Client/ServerHello's fixed part (version 2, random 32, session_id length 1, session_id) is
    all there; returns the session_id length."""
    end = len(buf)
    if end < 35:
        if end < 2:
            raise _truncated(version_field, 2, end)
        if end < 34:
            raise _truncated("random", 32, end - 2)
        raise _truncated("session_id", 1, 0)
    n = buf[34]
    if 35 + n > end:
        raise _truncated("session_id", n, end - 35)
    return n


def parse_client_hello(handshake_body: bytes) -> ClientHello:
    """Decode a ClientHello handshake body (after the 4-byte handshake header).

    Raises :class:`TlsParseError` when it is malformed or truncated.
    """
    buf = bytes(handshake_body)
    end = len(buf)
    n = _hello_session_id_length(buf, "client_version")
    if n > 32:
        raise TlsParseError(f"session_id of {n} bytes")
    p = 35 + n
    session_id = buf[35:p]
    cipher_suites, q = _u16_vector(buf, p, end, 2, "cipher_suites")
    p, q = _vec(buf, q, end, 1, "compression_methods")
    supported_versions: list[int] = []
    server_name: str | None = None
    alpn: list[str] = []
    extensions: list[int] = []
    supported_groups: list[int] = []
    ec_point_formats: list[int] = []
    signature_algorithms: list[int] = []
    alpn_raw: list[bytes] = []
    offers_psk = has_session_ticket = False
    if q != end:  # an extensions block (it may be absent before TLS 1.3)
        p, xend = _vec(buf, q, end, 2, "extensions")
        grease = GREASE_VALUES
        parsed = _CH_PARSED_EXTENSIONS
        unpack_header = _EXT_HEADER.unpack_from
        while p < xend:
            if p + 4 > xend:
                if p + 2 > xend:
                    raise _truncated("extension type", 2, xend - p)
                raise _truncated("extension data", 2, xend - p - 2)
            etype, n = unpack_header(buf, p)
            d = p + 4
            dend = d + n
            if dend > xend:
                raise _truncated("extension data", n, xend - d)
            p = dend
            if etype in grease:
                continue
            extensions.append(etype)
            if etype not in parsed:
                continue
            if etype == EXT_SERVER_NAME:
                d, lend = _vec(buf, d, dend, 2, "server_name_list")
                while d < lend:
                    name_type = buf[d]
                    d, q = _vec(buf, d + 1, lend, 2, "server name")
                    if name_type == 0 and server_name is None:
                        server_name = buf[d:q].decode("utf-8", "replace")
                    d = q
            elif etype == EXT_ALPN:
                d, lend = _vec(buf, d, dend, 2, "alpn list")
                while d < lend:
                    d, q = _vec(buf, d, lend, 1, "alpn protocol")
                    raw = buf[d:q]
                    alpn_raw.append(raw)
                    alpn.append(raw.decode("utf-8", "replace"))
                    d = q
            elif etype == EXT_SUPPORTED_GROUPS:
                supported_groups = _u16_vector(buf, d, dend, 2, "supported_groups")[0]
            elif etype == EXT_EC_POINT_FORMATS:
                d, q = _vec(buf, d, dend, 1, "ec_point_formats")
                ec_point_formats = list(buf[d:q])
            elif etype == EXT_SIGNATURE_ALGORITHMS:
                signature_algorithms = _u16_vector(buf, d, dend, 2, "signature_algorithms")[0]
            elif etype == EXT_SUPPORTED_VERSIONS:
                supported_versions = _u16_vector(buf, d, dend, 1, "supported_versions")[0]
            elif etype == EXT_PRE_SHARED_KEY:
                offers_psk = True
            else:  # EXT_SESSION_TICKET
                has_session_ticket = dend > d
    return ClientHello((buf[0] << 8) | buf[1], supported_versions, server_name, alpn, cipher_suites,
                       extensions, supported_groups, ec_point_formats, signature_algorithms, session_id,
                       offers_psk, has_session_ticket, alpn_raw)


def parse_server_hello(handshake_body: bytes) -> ServerHello:
    """Decode a ServerHello / HelloRetryRequest handshake body (after the 4-byte handshake header).

    Raises :class:`TlsParseError` when it is malformed or truncated.
    """
    buf = bytes(handshake_body)
    end = len(buf)
    n = _hello_session_id_length(buf, "server_version")
    legacy = (buf[0] << 8) | buf[1]
    if n > 32:
        raise TlsParseError(f"session_id of {n} bytes")
    p = 35 + n
    if p + 3 > end:
        if p + 2 > end:
            raise _truncated("cipher_suite", 2, end - p)
        raise _truncated("compression_method", 1, 0)
    sh = ServerHello(legacy, legacy, (buf[p] << 8) | buf[p + 1], buf[35:p], None,
                     buf.startswith(HRR_RANDOM, 2))
    p += 3
    if p == end:
        return sh
    p, xend = _vec(buf, p, end, 2, "extensions")
    extensions = sh.extensions
    while p < xend:
        if p + 4 > xend:
            if p + 2 > xend:
                raise _truncated("extension type", 2, xend - p)
            raise _truncated("extension data", 2, xend - p - 2)
        etype, n = _EXT_HEADER.unpack_from(buf, p)
        d = p + 4
        dend = d + n
        if dend > xend:
            raise _truncated("extension data", n, xend - d)
        p = dend
        extensions.append(etype)
        if etype == EXT_SUPPORTED_VERSIONS:
            if d + 2 > dend:
                raise _truncated("selected_version", 2, dend - d)
            sh.selected_version = (buf[d] << 8) | buf[d + 1]
        elif etype == EXT_ALPN:
            d, q = _vec(buf, d, dend, 2, "alpn list")
            d, q = _vec(buf, d, q, 1, "alpn protocol")
            sh.alpn = buf[d:q].decode("utf-8", "replace")
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


def _first_handshake_message(data: bytes | bytearray | memoryview) -> tuple[int, bytes] | None:
    """``(msg_type, body)`` of the first handshake message when ``data`` starts with a valid handshake
    record that was captured whole and holds that whole message; else None (then a TlsRecordReader and a
    HandshakeReassembler give the answer). The same result as theirs, without building them: a
    listener filter's peek of a ClientHello is one such record."""
    n = len(data)
    if n < 9 or data[0] != CT_HANDSHAKE or data[1] != 3 or data[2] > 4:
        return None
    length = (data[3] << 8) | data[4]
    if length > MAX_RECORD_LEN or 5 + length > n:
        return None
    size = (data[6] << 16) | (data[7] << 8) | data[8]
    if 4 + size > length:
        return None
    return data[5], bytes(data[9 : 9 + size])


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
        if type(data) is bytes:
            buf: bytes | memoryview = data
        else:
            buf = memoryview(data)
            if buf.format != "B" or buf.ndim != 1:
                buf = buf.cast("B")
        n = len(buf)
        if total_len is None or total_len <= n:
            gap = 0
            self.bytes += n
        else:
            gap = total_len - n
            self.bytes += total_len
        if self.error is not None:
            if not (self.desynced and self._resync and _plausible_header(buf)):
                self.missing_bytes += gap
                return []
            self.error = None
            self.desynced = False
            self.resyncs += 1
        elif not gap:
            # Fast paths for reads the way TLS libraries do them: a 5-byte header, then the body.
            if self._in_record:
                if n == self._need:  # exactly the rest of the pending body
                    if not self._append:
                        frag = bytes(self._frag) if self._keep else b""
                    elif self._frag:
                        self._frag += buf
                        frag = bytes(self._frag)
                    else:
                        frag = bytes(buf)
                    self._frag.clear()
                    self._need = 0
                    self._in_record = False
                    ct = self._type
                    records = self.records
                    records[ct] = records.get(ct, 0) + 1
                    return [TlsRecord(ct, self._ver, self._len, frag, not self._gapped)]
            elif n == 5 and not self._hdr:  # exactly one record header
                ct, major, minor, length = _RECORD_HEADER.unpack(buf)
                if not CT_CHANGE_CIPHER_SPEC <= ct <= CT_HEARTBEAT or major != 3 or minor > 4 \
                        or length > MAX_RECORD_LEN:
                    self._fail(f"not a TLS record: header {ct:02x} {major:02x}{minor:02x} length {length}")
                    return []
                if not length:
                    records = self.records
                    records[ct] = records.get(ct, 0) + 1
                    return [TlsRecord(ct, (major << 8) | minor, 0, b"", True)]
                collect = self.collect_types
                self._in_record = True
                self._type, self._ver, self._len, self._need = ct, (major << 8) | minor, length, length
                self._keep = self._append = collect is None or ct in collect
                self._gapped = False
                return []
        out: list[TlsRecord] = []
        pos = 0
        if self._in_record:  # continue a record body
            take = self._need if self._need <= n else n
            if self._append:
                self._frag += buf[:take]
            pos = take
            self._need -= take
            if self._need == 0:
                out.append(self._finish())
        elif self._hdr:  # a header split across messages: parse it from a joined copy
            buf = bytes(self._hdr) + bytes(buf)
            self._hdr.clear()
            n = len(buf)
        collect = self.collect_types
        records = self.records
        unpack_header = _RECORD_HEADER.unpack_from
        while n - pos >= 5:  # at a record boundary
            ct, major, minor, length = unpack_header(buf, pos)
            if not CT_CHANGE_CIPHER_SPEC <= ct <= CT_HEARTBEAT or major != 3 or minor > 4 \
                    or length > MAX_RECORD_LEN:
                self._fail(f"not a TLS record: header {ct:02x} {major:02x}{minor:02x} length {length}")
                return out
            pos += 5
            end = pos + length
            keep = collect is None or ct in collect
            if end <= n:  # whole body in this message
                out.append(TlsRecord(ct, (major << 8) | minor, length,
                                     bytes(buf[pos:end]) if keep else b"", True))
                records[ct] = records.get(ct, 0) + 1
                pos = end
                continue
            self._in_record = True  # the body goes on in later messages
            self._type, self._ver, self._len, self._need = ct, (major << 8) | minor, length, end - n
            self._keep = self._append = keep
            self._gapped = False
            if keep:
                self._frag += buf[pos:]
            pos = n
        if pos < n:  # the start of a header
            self._hdr += buf[pos:]
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
        if type(fragment) is bytes:
            data: bytes | memoryview = fragment
        else:
            data = memoryview(fragment)
            if data.format != "B" or data.ndim != 1:
                data = data.cast("B")
        if self._skip:
            k = min(self._skip, len(data))
            data = data[k:]
            self._skip -= k
        out: list[tuple[int, bytes]] = []
        buf = self._buf
        if buf:  # continue a message: parse from the buffer
            if len(data):
                buf += data
            src: bytes | bytearray | memoryview = buf
        else:  # parse straight from the fragment, buffer only an incomplete tail
            src = data
        off, blen = 0, len(src)
        max_message = self._max
        while blen - off >= 4:
            total = 4 + ((src[off + 1] << 16) | (src[off + 2] << 8) | src[off + 3])
            if total > max_message:  # too big to buffer (and never one we parse): skip it
                self.skipped += 1
                if blen - off >= total:
                    off += total
                    continue
                self._skip = total - (blen - off)
                off = blen
                break
            if blen - off < total:
                break
            out.append((src[off], bytes(src[off + 4 : off + total])))
            off += total
        if src is buf:
            if off:
                del buf[:off]
        elif off < blen:
            buf += src[off:]
        if out:
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
_COLLECT_HANDSHAKE = frozenset((CT_HANDSHAKE,))
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
        "_abbreviated", "_ch_done", "_check_server_reply", "_chs", "_client_ccs", "_client_reads", "_cr",
        "_error", "_failed", "_flight_open", "_head", "_pending_counted", "_sh_done", "_shs", "_sr",
        "_suspect_alert", "_tls13",
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
            ciphers, ja3, ja4 = _client_fingerprints(ch)
            attrs["tls.client.supported_ciphers"] = ciphers
            attrs["tls.client.ja3"] = ja3
            attrs["tls.client.ja4"] = ja4
        if self.server_hello is not None:
            attrs["tls.server.ja3s"] = _server_fingerprint(self.server_hello)
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
        first = _first_handshake_message(data)
        if first is not None:  # the usual peek: one record holding the whole ClientHello
            if first[0] == HS_CLIENT_HELLO:
                self._on_client_hello(first[1])
            return
        # Parse from scratch with throw-away state: a peek doesn't consume, the next read shows it again.
        reader = TlsRecordReader(collect_types=_COLLECT_HANDSHAKE)
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
        if reader._in_record and reader._type == CT_APPLICATION_DATA and not self._failed:
            # The kernel stops capturing at a client application-data record header (the handshake is
            # over by then), so its body may never arrive: judge the record by its header. If the body
            # does arrive, that record is not counted again as application data.
            records = [*records, TlsRecord(CT_APPLICATION_DATA, 0, reader._len, b"", False)]
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

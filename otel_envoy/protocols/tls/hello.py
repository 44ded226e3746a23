"""ClientHello / ServerHello decoding and the JA3, JA4 and JA3S fingerprints computed from them.

The ClientHello and the ServerHello (or HelloRetryRequest) are the only handshake messages sent in clear
that matter for spans. Parsing is strict about lengths and raises :class:`TlsParseError` on anything
malformed or truncated; GREASE values (RFC 8701) are dropped as they are read, as the fingerprints require.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass, field
from typing import TypeVar

from .names import GREASE_VALUES, cipher_suite_name

__all__ = [
    "EXTENSIONS_READ",
    "HRR_RANDOM",
    "HS_CLIENT_HELLO",
    "HS_SERVER_HELLO",
    "ClientHello",
    "ServerHello",
    "TlsParseError",
    "client_fingerprints",
    "parse_client_hello",
    "parse_server_hello",
    "server_fingerprint",
]

# Handshake message types (RFC 8446 4) and extension types (IANA TLS ExtensionType registry).
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

# SHA-256("HelloRetryRequest"): the ServerHello.random of a HelloRetryRequest (RFC 8446 4.1.3).
HRR_RANDOM = bytes.fromhex("cf21ad74e59a6111be1d8c021e65b891c2a211167abb8c5e079e09e2c8a8339c")

_JA4_VERSIONS = {0x0304: "13", 0x0303: "12", 0x0302: "11", 0x0301: "10", 0x0300: "s3", 0x0002: "s2"}


class TlsParseError(ValueError):
    """A handshake message is malformed or truncated."""


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
    #: client_fingerprints' answer, kept on the hello (and handed on to hellos of the same shape, whose
    #: fields are the same: hello_shapes.py); None until asked. The fields above are read-only once parsed.
    fingerprints: tuple[tuple[str, ...], str, str] | None = field(default=None, compare=False, repr=False)

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


# Fingerprints and cipher names for TlsHandshakeTracker.summary(), cached by the hello's content (never by
# object identity, so a changed ClientHello is never served stale values): connections from the same kind
# of client share them.  Bounded: at most _FP_CACHE_ENTRIES entries per cache (emptied when full), and
# hellos with more than _FP_KEY_MAX list values are not cached: ~1 MiB at worst (hostile hellos), a few KiB
# typically.
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


def client_fingerprints(ch: ClientHello) -> tuple[tuple[str, ...], str, str]:
    """(cipher suite names, JA3, JA4) of ``ch``, cached by content, and kept on ``ch``. The names tuple is the
    cached object itself: the exporters encode a tuple they have seen before only once (by identity)."""
    known = ch.fingerprints
    if known is None:
        known = ch.fingerprints = _client_fingerprints(ch)
    return known


def _client_fingerprints(ch: ClientHello) -> tuple[tuple[str, ...], str, str]:
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
            names = tuple([cipher_suite_name(c) for c in ciphers])
            hit4 = _cache_put(_ja4_cache, key4, (names, ch.ja4()))
        hit = _cache_put(_hello_cache, key, (hit4[0], ch.ja3(), hit4[1]))
    return hit[0], hit[1], hit[2]


def server_fingerprint(sh: ServerHello) -> str:
    """JA3S of ``sh``, cached by content."""
    if len(sh.extensions) > _FP_KEY_MAX:
        return sh.ja3s()
    key = (sh.legacy_version, sh.cipher_suite, tuple(sh.extensions))
    ja3s = _ja3s_cache.get(key)
    if ja3s is None:
        ja3s = _cache_put(_ja3s_cache, key, sh.ja3s())
    return ja3s


#: Extensions whose data the hello parses read (hello_shapes.py compares these bytes, and may skip others').
EXTENSIONS_READ = frozenset((
    EXT_SERVER_NAME, EXT_ALPN, EXT_SUPPORTED_GROUPS, EXT_EC_POINT_FORMATS, EXT_SIGNATURE_ALGORITHMS,
    EXT_SUPPORTED_VERSIONS,
))
# Extensions parse_client_hello looks into (others are only listed): a PSK and a ticket only for being there.
_CH_PARSED_EXTENSIONS = EXTENSIONS_READ | {EXT_PRE_SHARED_KEY, EXT_SESSION_TICKET}


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


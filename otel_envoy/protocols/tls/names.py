"""TLS code-point names: protocol versions, cipher suites, alert levels and descriptions, GREASE values.

Pure tables and lookups, shared by the hello parser (GREASE filtering, cipher names for fingerprints) and
the handshake tracker (span attributes, alert texts). Unknown code points get a numeric spelling, never an
error.
"""

from __future__ import annotations

__all__ = [
    "ALERT_DESCRIPTIONS",
    "GREASE_VALUES",
    "alert_description_name",
    "alert_level_name",
    "cipher_suite_name",
    "is_grease",
    "tls_version_name",
]

GREASE_VALUES = frozenset(0x0A0A + 0x1010 * i for i in range(16))  # RFC 8701: 0x0a0a, 0x1a1a .. 0xfafa

_TLS_VERSION_NAMES = {0x0304: "1.3", 0x0303: "1.2", 0x0302: "1.1", 0x0301: "1.0", 0x0300: "3.0"}

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


def alert_level_name(code: int) -> str:
    """RFC name of an alert level (``1`` -> ``"warning"``, ``2`` -> ``"fatal"``), else the decimal number."""
    return _ALERT_LEVELS.get(code, str(code))

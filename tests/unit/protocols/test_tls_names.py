"""Tests of otel_envoy.protocols.tls.names: version, cipher-suite and alert names."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from otel_envoy.protocols.tls.names import (
    alert_description_name,
    alert_level_name,
    cipher_suite_name,
    is_grease,
    tls_version_name,
)


def test_names() -> None:
    assert [tls_version_name(v) for v in (0x0304, 0x0303, 0x0302, 0x0301, 0x0300, 0x7F1C)] == [
        "1.3", "1.2", "1.1", "1.0", "3.0", "0x7F1C"]
    assert cipher_suite_name(0x1301) == "TLS_AES_128_GCM_SHA256"
    assert cipher_suite_name(0xC02F) == "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256"
    assert cipher_suite_name(0xCCA9) == "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256"
    assert cipher_suite_name(0x002F) == "TLS_RSA_WITH_AES_128_CBC_SHA"
    assert cipher_suite_name(0x009D) == "TLS_RSA_WITH_AES_256_GCM_SHA384"
    assert cipher_suite_name(0xABCD) == "0xABCD"


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl CLI not installed")
def test_cipher_names_match_openssl_standard_names() -> None:
    out = subprocess.run(["openssl", "ciphers", "-V", "-stdname", "ALL:COMPLEMENTOFALL"], capture_output=True,
                         text=True, check=True).stdout
    checked = 0
    for line in out.splitlines():
        parts = line.split()
        if len(parts) < 3 or not parts[0].startswith("0x"):
            continue
        hi, lo = parts[0].split(",")
        code = (int(hi, 16) << 8) | int(lo, 16)
        name = cipher_suite_name(code)
        if not name.startswith("0x"):
            assert name == parts[2], hex(code)
            checked += 1
    assert checked >= 30


def test_alert_names_and_grease() -> None:
    assert [alert_level_name(v) for v in (1, 2, 7)] == ["warning", "fatal", "7"]
    assert alert_description_name(40) == "handshake_failure" and alert_description_name(255) == "255"
    assert is_grease(0x0A0A) and is_grease(0xFAFA) and not is_grease(0x0A0B)

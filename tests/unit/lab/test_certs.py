"""Self-signed certificates for the lab (lab/certs.py), checked with openssl."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from otel_envoy.lab import generate_certs


def test_generate_certs(tmp_path: Path) -> None:
    certs = generate_certs(tmp_path)
    assert set(certs.servers) == {"a.example.com", "b.example.com"}
    for name, sc in certs.servers.items():
        verify = subprocess.run(["openssl", "verify", "-CAfile", str(certs.ca_path), str(sc.cert_path)],
                                capture_output=True, text=True, check=False)  # fmt: skip
        assert verify.returncode == 0, verify.stderr
        text = subprocess.run(["openssl", "x509", "-in", str(sc.cert_path), "-noout", "-text"],
                              capture_output=True, text=True, check=True).stdout  # fmt: skip
        assert f"DNS:{name}" in text
        assert "prime256v1" in text or "P-256" in text
        # valid for one day
        assert subprocess.run(["openssl", "x509", "-in", str(sc.cert_path), "-noout", "-checkend", "3600"],
                              capture_output=True, check=False).returncode == 0  # fmt: skip
        assert subprocess.run(["openssl", "x509", "-in", str(sc.cert_path), "-noout", "-checkend", "90000"],
                              capture_output=True, check=False).returncode == 1  # fmt: skip
        assert sc.key_path.stat().st_mode & 0o077 == 0
    assert certs.a.name == "a.example.com" and certs.b.name == "b.example.com"


def test_generate_certs_rsa(tmp_path: Path) -> None:
    certs = generate_certs(tmp_path, names=("a.example.com",), key_type="rsa")
    sc = certs.a
    verify = subprocess.run(["openssl", "verify", "-CAfile", str(certs.ca_path), str(sc.cert_path)],
                            capture_output=True, text=True, check=False)  # fmt: skip
    assert verify.returncode == 0, verify.stderr
    for pem in (sc.cert_path, certs.ca_path):
        text = subprocess.run(["openssl", "x509", "-in", str(pem), "-noout", "-text"],
                              capture_output=True, text=True, check=True).stdout  # fmt: skip
        assert "rsaEncryption" in text and "2048 bit" in text
    assert sc.key_path.stat().st_mode & 0o077 == 0


def test_generate_certs_rejects_unknown_key_type(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="key_type"):
        generate_certs(tmp_path, key_type="dsa")
    assert not any(tmp_path.iterdir())

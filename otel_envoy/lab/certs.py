"""Self-signed test PKI for the lab, generated with the ``openssl`` command line tool.

Produces one CA and two server certificates (``a.example.com`` and ``b.example.com``), valid for one day,
with the server names in the subjectAltName extension (which is what clients check). Keys are EC P-256 by
default, or RSA 2048 (``key_type="rsa"``: what most public and many mesh certificates use, and a handshake
whose cost is the server's signature, ~0.2 ms, rather than the client's work).
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

SERVER_NAMES: tuple[str, ...] = ("a.example.com", "b.example.com")
#: key type -> ``openssl genpkey`` algorithm and its option
_KEY_ALGORITHMS: dict[str, tuple[str, str]] = {
    "ec": ("EC", "ec_paramgen_curve:P-256"),
    "rsa": ("RSA", "rsa_keygen_bits:2048"),
}
KEY_TYPES: tuple[str, ...] = tuple(_KEY_ALGORITHMS)


@dataclass(frozen=True)
class ServerCert:
    """A server certificate and its private key (PEM files)."""

    name: str
    cert_path: Path
    key_path: Path


@dataclass(frozen=True)
class LabCerts:
    """Paths of the generated CA and server certificates."""

    ca_path: Path
    ca_key_path: Path
    servers: dict[str, ServerCert]

    @property
    def a(self) -> ServerCert:
        """The certificate for ``a.example.com``."""
        return self.servers["a.example.com"]

    @property
    def b(self) -> ServerCert:
        """The certificate for ``b.example.com``."""
        return self.servers["b.example.com"]


def _openssl(*args: str, cwd: Path) -> None:
    exe = shutil.which("openssl")
    if exe is None:
        raise RuntimeError("the openssl command line tool is required to generate lab certificates")
    proc = subprocess.run([exe, *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args[:2])} failed ({proc.returncode}): {proc.stderr.strip()}")


def _private_key(path: Path, cwd: Path, key_type: str) -> None:
    algorithm, option = _KEY_ALGORITHMS[key_type]
    _openssl("genpkey", "-algorithm", algorithm, "-pkeyopt", option, "-out", str(path), cwd=cwd)
    path.chmod(0o600)


def generate_certs(
    directory: str | Path, names: tuple[str, ...] = SERVER_NAMES, days: int = 1, key_type: str = "ec"
) -> LabCerts:
    """Generate a CA and one server certificate per name into ``directory``; return their paths.

    Files: ``ca.pem``/``ca.key`` and, per name, ``<name>.pem``/``<name>.key``. ``key_type``: "ec" (P-256)
    or "rsa" (2048 bits), for the CA and the servers alike.
    """
    if key_type not in KEY_TYPES:
        raise ValueError(f"key_type must be one of {', '.join(KEY_TYPES)}, not {key_type!r}")
    d = Path(directory).resolve()
    d.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = d / "ca.key", d / "ca.pem"
    _private_key(ca_key, d, key_type)
    _openssl(
        "req", "-x509", "-new", "-key", str(ca_key), "-sha256", "-days", str(days),
        "-subj", "/O=otel-envoy lab/CN=otel-envoy lab CA",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        "-addext", "subjectKeyIdentifier=hash",
        "-out", str(ca_cert),
        cwd=d,
    )  # fmt: skip
    servers: dict[str, ServerCert] = {}
    for name in names:
        key, csr, cert, ext = d / f"{name}.key", d / f"{name}.csr", d / f"{name}.pem", d / f"{name}.ext"
        _private_key(key, d, key_type)
        subj = f"/O=otel-envoy lab/CN={name}"
        _openssl("req", "-new", "-key", str(key), "-subj", subj, "-out", str(csr), cwd=d)
        ext.write_text(
            "basicConstraints=critical,CA:FALSE\n"
            "keyUsage=critical,digitalSignature\n"
            "extendedKeyUsage=serverAuth\n"
            f"subjectAltName=DNS:{name}\n"
            "authorityKeyIdentifier=keyid\n"
            "subjectKeyIdentifier=hash\n"
        )
        _openssl(
            "x509", "-req", "-in", str(csr), "-CA", str(ca_cert), "-CAkey", str(ca_key), "-CAcreateserial",
            "-sha256", "-days", str(days), "-extfile", str(ext), "-out", str(cert),
            cwd=d,
        )  # fmt: skip
        csr.unlink(missing_ok=True)
        ext.unlink(missing_ok=True)
        servers[name] = ServerCert(name=name, cert_path=cert, key_path=key)
    return LabCerts(ca_path=ca_cert, ca_key_path=ca_key, servers=servers)

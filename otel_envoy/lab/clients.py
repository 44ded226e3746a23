"""Real clients against the lab: curl, openssl s_client and raw sockets.

Each helper returns enough to assert on, including the client's local port where it can be known, so a
test can match a span to a connection's 4-tuple (the server side is always 127.0.0.1:<listener port>).
"""

from __future__ import annotations

import re
import shutil
import socket
import struct
import subprocess
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

Alpn = Literal["h2", "http/1.1"]
TlsVersion = Literal["1.2", "1.3"]

_WRITE_OUT_MARK = "\n@@otel-envoy-curl@@ "
_CURL_TLS_FLAGS: dict[str, list[str]] = {
    "1.2": ["--tlsv1.2", "--tls-max", "1.2"],
    "1.3": ["--tlsv1.3", "--tls-max", "1.3"],
}
_CURL_ALPN_FLAGS: dict[str, list[str]] = {"h2": ["--http2"], "http/1.1": ["--http1.1"]}
_OPENSSL_TLS_FLAGS: dict[str, str] = {"1.2": "-tls1_2", "1.3": "-tls1_3"}


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise RuntimeError(f"{name} is not installed")
    return path


@dataclass
class CurlResult:
    """Outcome of one curl run."""

    returncode: int
    body: str
    stderr: str
    local_port: int | None
    http_code: int | None
    http_version: str | None
    tls_version: str | None = None  # e.g. "TLSv1.3" (from curl -v), None for plain HTTP
    alpn: str | None = None  # ALPN the server accepted ("h2", "http/1.1"), None if none
    cmd: list[str] = field(default_factory=list)

    @property
    def stdout(self) -> str:
        """Alias of :attr:`body`."""
        return self.body

    @property
    def ok(self) -> bool:
        """curl exited 0 and got a 2xx."""
        return self.returncode == 0 and self.http_code is not None and 200 <= self.http_code < 300


def _run_curl(args: list[str], timeout: float) -> CurlResult:
    cmd = [_tool("curl"), "-sS", "-v", "--max-time", str(timeout),
           "--write-out", _WRITE_OUT_MARK + "%{local_port} %{http_code} %{http_version}", *args]  # fmt: skip
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace", timeout=timeout + 5,
                              check=False)
    except subprocess.TimeoutExpired as e:
        return CurlResult(-1, "", f"timeout: {e}", None, None, None, cmd=cmd)
    body, _, tail = proc.stdout.rpartition(_WRITE_OUT_MARK)
    if not _:
        body, tail = proc.stdout, ""
    fields = tail.split()
    local_port = int(fields[0]) if len(fields) > 0 and fields[0].isdigit() and fields[0] != "0" else None
    http_code = int(fields[1]) if len(fields) > 1 and fields[1].isdigit() and fields[1] != "000" else None
    http_version = fields[2] if len(fields) > 2 and fields[2] != "0" else None
    m_tls = re.search(r"SSL connection using (TLSv[\d.]+)", proc.stderr)
    m_alpn = re.search(r"ALPN[:,] server accepted (?:to use )?(\S+)", proc.stderr)
    return CurlResult(
        returncode=proc.returncode, body=body, stderr=proc.stderr, local_port=local_port, http_code=http_code,
        http_version=http_version, tls_version=m_tls.group(1) if m_tls else None,
        alpn=m_alpn.group(1) if m_alpn else None, cmd=cmd,
    )  # fmt: skip


def curl_plain(port: int, path: str = "/", http2_prior_knowledge: bool = False, timeout: float = 10.0,
               extra_args: Sequence[str] = ()) -> CurlResult:
    """GET ``http://127.0.0.1:<port><path>`` with curl (HTTP/1.1, or h2c with prior knowledge)."""
    args = ["--http2-prior-knowledge"] if http2_prior_knowledge else ["--http1.1"]
    return _run_curl([*args, *extra_args, f"http://127.0.0.1:{port}{path}"], timeout)


def curl_tls(port: int, sni: str | None, alpn: Alpn = "h2", tls_version: TlsVersion = "1.3",
             ca: str | Path | None = None, path: str = "/", timeout: float = 10.0,
             extra_args: Sequence[str] = ()) -> CurlResult:
    """GET ``https://<sni>:<port><path>`` with curl, resolving ``sni`` to 127.0.0.1 (so SNI is ``sni``).

    ``alpn`` selects ``--http2`` or ``--http1.1``; ``tls_version`` pins both min and max. The certificate is
    verified against ``ca``. ``sni=None`` connects to ``https://127.0.0.1`` (curl sends no SNI for an IP
    literal) without verification: that lands on the default filter chain.
    """
    args = [*_CURL_TLS_FLAGS[tls_version], *_CURL_ALPN_FLAGS[alpn]]
    if sni is None:
        url = f"https://127.0.0.1:{port}{path}"
        args.append("--insecure")
    else:
        url = f"https://{sni}:{port}{path}"
        args += ["--resolve", f"{sni}:{port}:127.0.0.1"]
        if ca is not None:
            args += ["--cacert", str(ca)]
    return _run_curl([*args, *extra_args, url], timeout)


def _text(data: str | bytes | None) -> str:
    if isinstance(data, bytes):
        return data.decode(errors="replace")
    return data or ""


@dataclass
class OpensslResult:
    """Outcome of one ``openssl s_client`` run."""

    returncode: int
    stdout: str
    stderr: str
    protocol: str | None  # negotiated TLS version, e.g. "TLSv1.3"
    alpn: str | None  # negotiated ALPN protocol, None if none
    verify_code: int | None  # "Verify return code" (0 = ok); None when not printed
    subject_cn: str | None  # CN of the server certificate
    http_status: int | None  # status of the HTTP/1.x response read back, if any
    cmd: list[str] = field(default_factory=list)

    @property
    def output(self) -> str:
        """stdout and stderr together (s_client splits its report across both)."""
        return self.stdout + self.stderr


def openssl_s_client(port: int, sni: str | None, alpn: Alpn | None = "http/1.1",
                     tls_version: TlsVersion = "1.3", ca: str | Path | None = None,
                     request: str | None = None, timeout: float = 10.0, groups: str | None = None
                     ) -> OpensslResult:
    """Handshake with ``openssl s_client`` and send an HTTP/1.1 request (``Connection: close``) via stdin.
    ``groups``: its key-exchange groups, in order (``-groups``; a first one the server does not take makes it
    answer with a HelloRetryRequest).

    ``-ign_eof`` keeps s_client reading until Envoy closes the connection after its response. ``sni=None``
    sends no SNI (``-noservername``). With ``alpn="h2"`` the default HTTP/1.1 request makes no sense to the
    server (it expects the h2 preface): use it to check the handshake only. The local port is not known.
    """
    host = sni or "localhost"
    if request is None:
        request = f"GET / HTTP/1.1\r\nHost: {host}\r\nUser-Agent: s_client\r\nConnection: close\r\n\r\n"
    cmd = [_tool("openssl"), "s_client", "-connect", f"127.0.0.1:{port}", _OPENSSL_TLS_FLAGS[tls_version],
           "-ign_eof"]  # fmt: skip
    cmd += ["-servername", sni] if sni is not None else ["-noservername"]
    if alpn is not None:
        cmd += ["-alpn", alpn]
    if groups is not None:
        cmd += ["-groups", groups]
    if ca is not None:
        cmd += ["-CAfile", str(ca)]
        if sni is not None:
            cmd += ["-verify_hostname", sni]
    try:
        proc = subprocess.run(cmd, input=request, capture_output=True, text=True, errors="replace",
                              timeout=timeout, check=False)  # fmt: skip
        rc, out, err = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as e:
        rc = -1
        out = _text(e.stdout)
        err = _text(e.stderr) + "\ntimeout"
    both = out + "\n" + err
    m_proto = re.search(r"^\s*Protocol\s*:\s*(\S+)", both, re.M) or re.search(r"New, (TLSv[\d.]+),", both)
    m_alpn = re.search(r"^ALPN protocol: (\S+)", both, re.M)
    m_verify = re.search(r"Verify return code: (\d+)", both)
    m_cn = re.search(r"^subject=.*?CN\s*=\s*([^,/\n]+)", both, re.M)
    m_http = re.search(r"^HTTP/1\.[01] (\d{3})", out, re.M)
    return OpensslResult(
        returncode=rc, stdout=out, stderr=err, protocol=m_proto.group(1) if m_proto else None,
        alpn=m_alpn.group(1) if m_alpn else None,
        verify_code=int(m_verify.group(1)) if m_verify else None,
        subject_cn=m_cn.group(1).strip() if m_cn else None,
        http_status=int(m_http.group(1)) if m_http else None,
        cmd=cmd,
    )  # fmt: skip


@dataclass
class ResetResult:
    """A connection the client aborted with a RST."""

    local_port: int
    sent: int


def reset_client(port: int, payload: bytes = b"GET / HTTP/1.1\r\nHost: lab\r\n", delay: float = 0.05,
                 host: str = "127.0.0.1") -> ResetResult:
    """Connect, send a partial request, wait ``delay`` s, then close with SO_LINGER {1, 0} (sends RST)."""
    with socket.create_connection((host, port), timeout=5) as s:
        local_port = s.getsockname()[1]
        s.sendall(payload)
        if delay > 0:
            time.sleep(delay)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    return ResetResult(local_port=local_port, sent=len(payload))


@dataclass
class ConnResult:
    """One short-lived plain HTTP connection from :func:`burst`."""

    local_port: int | None
    status: int | None
    nbytes: int
    seconds: float
    error: str | None = None


@dataclass
class BurstResult:
    """All connections of one :func:`burst`."""

    results: list[ConnResult]
    seconds: float

    @property
    def statuses(self) -> Counter[int | None]:
        """How many connections got each HTTP status (None: no valid response)."""
        return Counter(r.status for r in self.results)

    @property
    def local_ports(self) -> list[int]:
        """Local ports of all connections that connected."""
        return [r.local_port for r in self.results if r.local_port is not None]

    @property
    def errors(self) -> list[str]:
        """Error messages of failed connections."""
        return [r.error for r in self.results if r.error]

    @property
    def all_ok(self) -> bool:
        """Every connection got a 200."""
        return all(r.status == 200 for r in self.results)


def _one_request(port: int, path: str, host: str, timeout: float) -> ConnResult:
    t0 = time.monotonic()
    local_port = None
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            local_port = s.getsockname()[1]
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: lab\r\nConnection: close\r\n\r\n".encode())
            chunks = []
            while True:
                data = s.recv(65536)
                if not data:
                    break
                chunks.append(data)
        raw = b"".join(chunks)
        m = re.match(rb"HTTP/1\.[01] (\d{3})", raw)
        return ConnResult(local_port, int(m.group(1)) if m else None, len(raw), time.monotonic() - t0,
                          None if m else f"bad response: {raw[:80]!r}")
    except OSError as e:
        return ConnResult(local_port, None, 0, time.monotonic() - t0, f"{type(e).__name__}: {e}")


def burst(port: int, n: int, concurrency: int = 10, path: str = "/", host: str = "127.0.0.1",
          timeout: float = 10.0) -> BurstResult:
    """Open ``n`` short-lived plain HTTP/1.1 connections (``Connection: close``), ``concurrency`` at once."""
    t0 = time.monotonic()
    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        results = list(pool.map(lambda _: _one_request(port, path, host, timeout), range(n)))
    return BurstResult(results=results, seconds=time.monotonic() - t0)

"""Build and run the uprobe tier's test target (``tests/e2e/uprobe_target/tls_server.cpp``) with g++.

``build_uprobe_target(out_dir)`` produces, from one link (``-Wl,--build-id``):

* ``tls-server``          -- with symbols (``.symtab``: SSL_read, SSL_write, SSL_do_handshake, Envoy's
  ``SslSocket::doRead/doWrite``),
* ``tls-server-stripped`` -- ``strip --strip-all`` of it (same code and build-id, no ``.symtab``),
* ``tls-server.debug``    -- ``objcopy --only-keep-debug`` of it (symbols only, same build-id).

The code is linked at 0x20000 (``--section-start=.init``): its ELF virtual addresses differ from its file
offsets, as in Envoy's lld-linked binary, so a test attaching at a symbol's address checks the conversion.
A missing tool is a failure, not a skip (scripts/setup.sh installs g++ and binutils).
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from otel_envoy.lab.certs import ServerCert, generate_certs

__all__ = ["TEXT_VADDR", "RunningTarget", "UprobeTarget", "build_uprobe_target", "run_target"]

SOURCE = Path(__file__).resolve().parents[1] / "e2e" / "uprobe_target" / "tls_server.cpp"
TEXT_VADDR = 0x20000
CXXFLAGS = ("-g", "-O1", "-fno-omit-frame-pointer", "-Wl,--build-id",
            f"-Wl,--section-start=.init={TEXT_VADDR:#x}")


@dataclass(frozen=True)
class UprobeTarget:
    """The three builds and a server certificate."""

    unstripped: Path
    stripped: Path
    debug: Path
    cert: ServerCert


@dataclass
class RunningTarget:
    """A started target: its process and the port it listens on."""

    proc: subprocess.Popen[bytes]
    port: int

    @property
    def pid(self) -> int:
        """The server's pid."""
        return self.proc.pid


def _run(*argv: str | Path) -> None:
    subprocess.run([str(a) for a in argv], check=True, capture_output=True)


def build_uprobe_target(out_dir: Path) -> UprobeTarget:
    """Compile, strip and split the target into ``out_dir``; generate its certificate."""
    for tool in ("g++", "strip", "objcopy", "openssl"):
        assert shutil.which(tool), f"{tool} is missing (scripts/setup.sh installs it)"
    out_dir.mkdir(parents=True, exist_ok=True)
    unstripped = out_dir / "tls-server"
    _run("g++", *CXXFLAGS, "-o", unstripped, SOURCE, "-ldl")
    stripped, debug = out_dir / "tls-server-stripped", out_dir / "tls-server.debug"
    _run("strip", "--strip-all", "-o", stripped, unstripped)
    _run("objcopy", "--only-keep-debug", unstripped, debug)
    certs = generate_certs(out_dir / "certs", names=("localhost",))
    return UprobeTarget(unstripped, stripped, debug, certs.servers["localhost"])


@contextlib.contextmanager
def run_target(binary: Path, cert: ServerCert, timeout: float = 10.0) -> Iterator[RunningTarget]:
    """Start ``binary`` on an ephemeral port of 127.0.0.1, yield once it printed ``ready``; then kill it."""
    proc = subprocess.Popen([str(binary), str(cert.cert_path), str(cert.key_path)], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        port = 0
        for raw in proc.stdout:
            line = raw.decode().strip()
            if line.startswith("port="):
                port = int(line.removeprefix("port="))
            if line == "ready":
                break
        else:
            raise RuntimeError(f"{binary} exited before printing 'ready' (rc={proc.wait(timeout)})")
        yield RunningTarget(proc, port)
    finally:
        proc.kill()
        proc.wait(timeout)
        if proc.stdout is not None:
            proc.stdout.close()

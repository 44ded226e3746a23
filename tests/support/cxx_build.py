"""Build and run the small C++ test server (``tests/support/cxx_server/server.cpp``) with g++.

``build_cxx_server(out_dir)`` produces, from one link (``-Wl,--build-id``):

* ``server``          -- with symbols (``-g -O1 -fno-omit-frame-pointer``), PIE,
* ``server-stripped`` -- ``strip --strip-all`` of it (same code, same build-id, no ``.symtab``),
* ``server.debug``    -- ``objcopy --only-keep-debug`` of it (symbols and DWARF only, same build-id).

``run_server(path)`` starts one of them and yields a :class:`RunningServer` with the runtime addresses it
printed; the process blocks in ``demo::wait_for_client`` (a read(2) on stdin) until the context exits.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["WAIT_FOR_CLIENT", "WAIT_MANGLED", "CxxServerBuild", "RunningServer", "build_cxx_server",
           "build_epoll_server", "have_toolchain", "run_epoll_server", "run_server"]

SOURCE = Path(__file__).resolve().parent / "cxx_server" / "server.cpp"
_TOOLS = ("g++", "strip", "objcopy")
CXXFLAGS = ("-g", "-O1", "-fno-omit-frame-pointer", "-U_FORTIFY_SOURCE", "-Wl,--build-id")
WAIT_FOR_CLIENT = "demo::wait_for_client(int)"  # the server's blocking function, demangled
WAIT_MANGLED = "_ZN4demo15wait_for_clientEi"  # and as its symbol tables name it


@dataclass(frozen=True)
class CxxServerBuild:
    """Paths of the three builds."""

    unstripped: Path
    stripped: Path
    debug: Path


@dataclass
class RunningServer:
    """A started server and the addresses it printed (``wait_for_client``, ``sum``, ``read``)."""

    proc: subprocess.Popen[bytes]
    addresses: dict[str, int] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        """The server's pid."""
        return self.proc.pid


def have_toolchain() -> bool:
    """True when g++, strip and objcopy are on PATH."""
    return all(shutil.which(tool) for tool in _TOOLS)


def _run(*argv: str | Path) -> None:
    subprocess.run([str(a) for a in argv], check=True, capture_output=True)


def build_cxx_server(out_dir: Path) -> CxxServerBuild:
    """Compile, strip and split the test server into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    build = CxxServerBuild(out_dir / "server", out_dir / "server-stripped", out_dir / "server.debug")
    _run("g++", *CXXFLAGS, "-o", build.unstripped, SOURCE)
    _run("strip", "--strip-all", "-o", build.stripped, build.unstripped)
    _run("objcopy", "--only-keep-debug", build.unstripped, build.debug)
    return build


@contextlib.contextmanager
def run_server(binary: Path, timeout: float = 10.0) -> Iterator[RunningServer]:
    """Start ``binary``, read its address lines up to ``ready``, yield; then close stdin and reap it."""
    proc = subprocess.Popen([str(binary)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    server = RunningServer(proc)
    try:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.decode().strip()
            if line == "ready":
                break
            name, _, value = line.partition("=")
            if value.startswith("0x"):
                server.addresses[name] = int(value, 16)
        else:
            raise RuntimeError(f"{binary} exited before printing 'ready' (rc={proc.wait(timeout)})")
        yield server
    finally:
        if proc.stdin is not None:
            with contextlib.suppress(OSError):
                proc.stdin.close()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)
        if proc.stdout is not None:
            proc.stdout.close()


EPOLL_SOURCE = SOURCE.parent / "epoll_server.cpp"


def build_epoll_server(out_dir: Path) -> CxxServerBuild:
    """Compile the epoll server (an event loop like an Envoy worker) the same three ways into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    build = CxxServerBuild(out_dir / "epoll-server", out_dir / "epoll-server-stripped",
                           out_dir / "epoll-server.debug")
    _run("g++", *CXXFLAGS, "-o", build.unstripped, EPOLL_SOURCE)
    _run("strip", "--strip-all", "-o", build.stripped, build.unstripped)
    _run("objcopy", "--only-keep-debug", build.unstripped, build.debug)
    return build


@contextlib.contextmanager
def run_epoll_server(binary: Path, port: int, timeout: float = 10.0) -> Iterator[subprocess.Popen[bytes]]:
    """Start the epoll server on 127.0.0.1:``port``; yield once it printed ``ready``; then kill it."""
    proc = subprocess.Popen([str(binary), str(port)], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != b"ready":
            raise RuntimeError(f"{binary} did not start (rc={proc.poll()})")
        yield proc
    finally:
        proc.kill()
        proc.wait(timeout)
        if proc.stdout is not None:
            proc.stdout.close()

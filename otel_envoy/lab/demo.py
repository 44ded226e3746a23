"""The embedded default: a real Envoy, a real backend, real clients, the daemon, then the waterfall.

Run as root (after scripts/setup.sh): ``python -m otel_envoy.lab.demo [--output FILE]``.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import clients
from .lab import EnvoyLab

__all__ = ["main"]


def _start_daemon(lab: EnvoyLab, output: Path, workdir: Path) -> subprocess.Popen[bytes]:
    ready = workdir / "daemon.ready"
    # a demo of what a trace holds: every request (the default samples 1 % of those without a traceparent)
    cmd = [sys.executable, "-m", "otel_envoy.cli", "run", "--pid", str(lab.pid), "--envoy-admin",
           lab.admin_url, "--sampler", "always_on", "--output", str(output), "--ready-file", str(ready)]
    print("$ otel-envoy " + " ".join(cmd[3:-2]), flush=True)
    proc = subprocess.Popen(cmd)
    deadline = time.monotonic() + 180
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise SystemExit("demo: the daemon did not start (see its message above)")
        time.sleep(0.1)
    return proc


def _traffic(lab: EnvoyLab) -> None:
    print(f"traffic: Envoy {lab.pid} plain :{lab.http_port}, TLS :{lab.tls_port} (SNI a/b.example.com)")
    r = clients.curl_plain(lab.http_port, "/")
    print(f"  curl http://127.0.0.1:{lab.http_port}/                 -> {r.http_code}")
    r = clients.curl_tls(lab.tls_port, "a.example.com", alpn="h2", tls_version="1.3", ca=lab.ca_path)
    print(f"  curl --http2 --tlsv1.3 https://a.example.com/   -> {r.http_code} ({r.tls_version}, {r.alpn})")
    r = clients.curl_tls(lab.tls_port, "b.example.com", alpn="http/1.1", tls_version="1.2", ca=lab.ca_path)
    print(f"  curl --http1.1 --tls-max 1.2 https://b.example.com/ -> {r.http_code} ({r.tls_version})")
    o = clients.openssl_s_client(lab.tls_port, "b.example.com", alpn="http/1.1", tls_version="1.2")
    print(f"  openssl s_client -tls1_2 -servername b.example.com -> {o.http_status} ({o.protocol})")
    rs = clients.reset_client(lab.http_port)
    print(f"  a client that resets (SO_LINGER 0) from port {rs.local_port}")
    b = clients.burst(lab.http_port, 50, concurrency=10)
    print(f"  a burst of 50 connections, 10 at a time -> {dict(b.statuses)}")


def main(argv: list[str] | None = None) -> int:
    """Run the demo; returns the exit code."""
    parser = argparse.ArgumentParser(prog="otel-envoy-demo", description=__doc__)
    parser.add_argument("--output", default="otel-envoy-traces.jsonl", help="spans file (OTLP/JSON lines)")
    parser.add_argument("--show", type=int, default=6, help="how many traces to draw")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("demo: must run as root (BPF)", file=sys.stderr)
        return 1
    output = Path(args.output).resolve()
    with tempfile.TemporaryDirectory(prefix="otel-envoy-demo-") as tmp, EnvoyLab(concurrency=2) as lab:
        daemon = _start_daemon(lab, output, Path(tmp))
        try:
            time.sleep(0.3)
            _traffic(lab)
            time.sleep(0.3)
        finally:
            daemon.send_signal(signal.SIGTERM)
            code = daemon.wait(60)
        if code != 0:
            print(f"demo: the daemon exited with {code}", file=sys.stderr)
            return code
    print(f"\nspans written to {output}; the first {args.show} traces:\n", flush=True)
    from rich.console import Console

    from ..export.terminal import render_file

    render_file(output, Console(), max_traces=args.show)
    print(f"\nsee them all: .venv/bin/otel-envoy show {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

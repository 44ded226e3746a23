"""Regenerates tests/data/lab.events: a real event stream from the lab's Envoy (run as root).

Traffic, in order: curl plain HTTP, curl TLS 1.3 (SNI a.example.com, h2), openssl s_client TLS 1.2
(SNI b.example.com, http/1.1), a client that resets, a burst of 20 plain connections.
The client ports are written to tests/data/lab.events.json so tests can find each connection.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from otel_envoy.lab import clients
from otel_envoy.lab.lab import EnvoyLab

HERE = Path(__file__).resolve().parent


@contextlib.contextmanager
def recording(out: Path, *flags: str) -> Iterator[EnvoyLab]:
    """A lab Envoy (2 workers) under `otel-envoy record --events out --sampler always_on FLAGS` while the
    body drives traffic; the recorder is stopped after it and must exit 0."""
    with tempfile.TemporaryDirectory() as tmp, EnvoyLab(concurrency=2) as lab:
        ready = Path(tmp) / "ready"
        # every request and connection traced: the golden replays must hold all of them
        proc = subprocess.Popen([sys.executable, "-m", "otel_envoy.cli", "record", "--pid", str(lab.pid),
                                 "--events", str(out), "--ready-file", str(ready), "--sampler", "always_on",
                                 "--cpu-budget", "0", *flags])
        while not ready.exists():
            assert proc.poll() is None, "record failed"
            time.sleep(0.1)
        time.sleep(0.2)
        yield lab
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0


def main() -> None:
    out = HERE / "lab.events"
    # every handshake transfer as its own record (not one summary record per handshake, the default): the
    # tests of this recording read the TLS connections' ClientHello and record-header reads
    with recording(out, "--tls-handshake-detail", "full") as lab:
        meta = {"pid": lab.pid, "http_port": lab.http_port, "tls_port": lab.tls_port}
        meta["plain"] = clients.curl_plain(lab.http_port).local_port
        meta["tls13"] = clients.curl_tls(lab.tls_port, "a.example.com", alpn="h2", tls_version="1.3",
                                         ca=lab.ca_path).local_port
        clients.openssl_s_client(lab.tls_port, "b.example.com", alpn="http/1.1", tls_version="1.2")
        meta["reset"] = clients.reset_client(lab.http_port).local_port
        meta["burst"] = clients.burst(lab.http_port, 20, concurrency=5).local_ports
    (HERE / "lab.events.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(f"wrote {out} ({out.stat().st_size} bytes)")


if __name__ == "__main__":
    main()

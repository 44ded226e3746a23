"""Regenerates tests/data/h2c_rounds.events (run as root): a real event stream from the lab's Envoy with every
event-loop round and every off-CPU wait reported (thresholds 0), for the golden replay test.

Traffic, in order: curl plain HTTP/1.1 and h2c (prior knowledge) to /, /bytes/100, /status/500, /status/404;
curl TLS 1.3 (h2) and TLS 1.2 (http/1.1); a client that resets; a burst of 5 plain connections.
After regenerating, regenerate tests/data/h2c_rounds.spans.canonical as tests/unit/test_replay_golden.py says.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from otel_envoy.lab import clients
from tests.data.make_recording import HERE, recording


def main() -> None:
    with recording(HERE / "h2c_rounds.events", "--offcpu-threshold", "0", "--round-threshold", "0") as lab:
        for path in ("/", "/bytes/100", "/status/500", "/status/404"):
            clients.curl_plain(lab.http_port, path)
            clients.curl_plain(lab.http_port, path, http2_prior_knowledge=True)
        clients.curl_tls(lab.tls_port, "a.example.com", alpn="h2", tls_version="1.3", ca=lab.ca_path)
        clients.curl_tls(lab.tls_port, "b.example.com", alpn="http/1.1", tls_version="1.2", ca=lab.ca_path)
        clients.reset_client(lab.http_port)
        clients.burst(lab.http_port, 5)


if __name__ == "__main__":
    main()

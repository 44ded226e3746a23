"""Exact TLS handshake metrics counted in the kernel, against Envoy's own TLS counters (real Envoy, real
BPF, real clients: Python's ssl for TLS 1.2 and 1.3, full and resumed, h2load with a new TLS connection per
request, and clients that give up mid-handshake; a real OTLP/gRPC receiver)."""

from __future__ import annotations

import json
import socket
import ssl
import struct
import threading

import pytest

from otel_envoy.export.request_metrics import REQUEST_BOUNDS_S, TLS_HANDSHAKE_DURATION
from otel_envoy.lab.lab import EnvoyLab
from tests.support.correlation import client_hello
from tests.support.daemon import DaemonProcess
from tests.support.h2load import h2load
from tests.support.otlp_receiver import OtlpReceiver

pytestmark = pytest.mark.root

STATS = r"^listener\.tls_sni\.ssl\.(handshake|session_reused|versions\.TLSv1\.[23])$"
PREFIX = "listener.tls_sni.ssl."
RESUMED_PER_VERSION = 20
GIVE_UP = 5


def _exchange(ctx: ssl.SSLContext, port: int, session: ssl.SSLSession | None = None) -> ssl.SSLSession:
    """One request over a new TLS connection (resuming ``session`` when given); its session."""
    with ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10),
                         server_hostname="a.example.com", session=session) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: a.example.com\r\n\r\n")
        assert s.recv(65536).startswith(b"HTTP/1.1 200")
        assert s.session_reused == (session is not None)
        return s.session


def _sessions(lab: EnvoyLab, version: ssl.TLSVersion) -> None:
    """A full handshake at ``version``, then RESUMED_PER_VERSION resumed ones."""
    ctx = ssl.create_default_context(cafile=str(lab.ca_path))
    ctx.minimum_version = ctx.maximum_version = version
    ctx.set_alpn_protocols(["http/1.1"])
    session = _exchange(ctx, lab.tls_port)
    for _ in range(RESUMED_PER_VERSION):
        _exchange(ctx, lab.tls_port, session)


def _give_up(port: int) -> None:
    """A ClientHello, the server's hello flight read, then a reset: the handshake never completes."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(client_hello())
        assert s.recv(65536)[:1] == b"\x16"
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def test_every_tls_handshake_is_counted_by_version_and_resumption_and_equals_envoys(tmp_path) -> None:
    """Default sampler (new TLS connections sampled whole at 1 %): the kernel still counts every handshake,
    and its counts by version and resumption equal Envoy's ssl.* counters over the same run."""
    summary = tmp_path / "summary.json"
    with EnvoyLab(concurrency=2, direct_response=True) as lab, OtlpReceiver() as receiver:
        daemon = DaemonProcess(["--pid", str(lab.pid), "--otlp-endpoint", receiver.grpc_endpoint,
                                "--otlp-protocol", "grpc", "--metrics-interval", "1", "--summary-json",
                                str(summary)], tmp_path,
                               env={"OTEL_TRACES_SAMPLER": "parentbased_traceidratio"})
        daemon.start()
        before = lab.stats(STATS)
        load = threading.Thread(target=h2load, args=(f"https://127.0.0.1:{lab.tls_port}/", 1500, 8,
                                                     ["Connection: close"]))
        load.start()  # h2load: a new TLS connection per request, at saturation
        _sessions(lab, ssl.TLSVersion.TLSv1_3)
        _sessions(lab, ssl.TLSVersion.TLSv1_2)
        load.join()
        for _ in range(GIVE_UP):
            _give_up(lab.tls_port)
        after = lab.stats(STATS)
        envoy = {name.removeprefix(PREFIX): after.get(name, 0) - before.get(name, 0) for name in after}

        def handshakes_exported() -> int:
            points = receiver.latest_metric_points(TLS_HANDSHAKE_DURATION).values()
            return sum(int(p.count or 0) for p in points if "error.type" not in p.attributes)

        receiver.wait_for_metrics(lambda _p: handshakes_exported() >= envoy["handshake"], timeout=30)
        points = list(receiver.latest_metric_points(TLS_HANDSHAKE_DURATION).values())
        code = daemon.stop()
    assert code == 0, daemon.stderr()
    assert envoy["handshake"] >= 1500 + 2 * (RESUMED_PER_VERSION + 1)
    counted = json.loads(summary.read_text())["tls_handshakes"]
    done = {k: v for k, v in counted.items() if k.endswith("/done")}
    why = (counted, envoy)
    assert sum(done.values()) == envoy["handshake"], why
    assert sum(v for k, v in done.items() if k.startswith("1.3/")) == envoy["versions.TLSv1.3"], why
    assert sum(v for k, v in done.items() if k.startswith("1.2/")) == envoy["versions.TLSv1.2"], why
    assert sum(v for k, v in done.items() if "/resumed/" in k) == envoy["session_reused"], why
    assert done.get("1.2/resumed/done", 0) >= RESUMED_PER_VERSION  # Python's own resumptions, at least
    assert sum(v for k, v in counted.items() if k.endswith("/closed")) == GIVE_UP, counted
    # the OTLP histogram carries the same counts, by the semantic conventions' tls.* attributes
    assert all(p.unit == "s" and p.explicit_bounds == pytest.approx(REQUEST_BOUNDS_S) for p in points)
    exported = {(p.attributes.get("tls.protocol.version"), p.attributes["tls.resumed"]): 0 for p in points}
    for p in points:
        if "error.type" not in p.attributes:
            exported[(p.attributes["tls.protocol.version"], p.attributes["tls.resumed"])] += int(p.count or 0)
    assert sum(n for (v, _r), n in exported.items() if v == "1.3") == envoy["versions.TLSv1.3"]
    assert sum(n for (_v, r), n in exported.items() if r) == envoy["session_reused"]
    assert all(p.attributes["server.port"] == lab.tls_port for p in points)
    done_points = [p for p in points if "error.type" not in p.attributes and p.count]
    means = [p.sum / p.count for p in done_points]
    assert all(2e-6 < m < 0.2 for m in means), means  # a handshake takes microseconds to milliseconds here
    assert all(p.attributes["error.type"] == "closed_during_handshake" for p in points
               if "error.type" in p.attributes)

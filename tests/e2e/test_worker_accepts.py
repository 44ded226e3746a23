"""Accepts per worker and listener, counted in the kernel, against Envoy's own per-worker counters."""

from __future__ import annotations

import json
import re
import threading

import pytest

from otel_envoy.lab import clients
from otel_envoy.lab.lab import EnvoyLab
from tests.support.daemon import DaemonProcess
from tests.support.h2load import h2load
from tests.support.otlp_receiver import OtlpReceiver

pytestmark = pytest.mark.root

ACCEPTED = "envoy.worker.connections.accepted"
WORKER_CX = r"^listener\.(plain_http|tls_sni)\.worker_\d+\.downstream_cx_total$"


def test_accepts_per_worker_equal_envoy_s_per_worker_counters(tmp_path) -> None:
    """Two workers, the default sampler (1 %: most connections send no record), new connections on both
    listeners from several clients at once: envoy.worker.connections.accepted by thread and listener equals
    Envoy's listener.<name>.worker_<n>.downstream_cx_total, and sums to the listener's downstream_cx_total."""
    summary = tmp_path / "summary.json"
    with EnvoyLab(concurrency=2) as lab, OtlpReceiver() as receiver:
        before = lab.stats(WORKER_CX)
        daemon = DaemonProcess(["--pid", str(lab.pid), "--envoy-admin", lab.admin_url, "--otlp-endpoint",
                                receiver.grpc_endpoint, "--otlp-protocol", "grpc", "--metrics-interval", "1",
                                "--summary-json", str(summary)], tmp_path,
                               env={"OTEL_TRACES_SAMPLER": "parentbased_traceidratio"}).start()
        plain = f"http://127.0.0.1:{lab.http_port}/"
        loads = [threading.Thread(target=h2load, args=(plain, 400, 8, ["Connection: close"])),
                 threading.Thread(target=h2load, args=(plain, 300, 8))]
        for t in loads:
            t.start()
        for _ in range(20):
            assert clients.curl_tls(lab.tls_port, "a.example.com", ca=lab.ca_path).http_code == 200
        for t in loads:
            t.join()
        after = lab.stats(WORKER_CX)
        envoy = {}  # (listener, worker index) -> connections accepted during the run
        for name, value in after.items():
            m = re.match(r"listener\.(\w+)\.worker_(\d+)\.", name)
            assert m
            envoy[(m.group(1), int(m.group(2)))] = value - before.get(name, 0)
        assert sum(v for (lst, _w), v in envoy.items() if lst == "plain_http") == 400 + 8
        assert sum(v for (lst, _w), v in envoy.items() if lst == "tls_sni") == 20

        listeners = {lab.http_port: "plain_http", lab.tls_port: "tls_sni"}

        def ours() -> dict[tuple[str, int], int]:
            out: dict[tuple[str, int], int] = {}
            for p in receiver.latest_metric_points(ACCEPTED).values():
                listener = listeners.get(p.attributes.get("server.port"))  # type: ignore[arg-type]
                thread = str(p.attributes["thread.name"])
                if listener is not None:
                    worker = int(thread.rsplit("_", 1)[-1])  # "wrk:worker_1"
                    out[(listener, worker)] = out.get((listener, worker), 0) + int(p.value)
            return out

        receiver.wait_for_metrics(lambda _p: sum(ours().values()) >= sum(envoy.values()), timeout=30)
        got = ours()
        named = {p.attributes.get("envoy.listener.name")
                 for p in receiver.latest_metric_points(ACCEPTED).values()
                 if p.attributes.get("server.port") in listeners}
        assert daemon.stop() == 0, daemon.stderr()
    assert named == {"plain_http", "tls_sni"}
    assert {k: v for k, v in got.items() if v} == {k: v for k, v in envoy.items() if v}, (got, envoy)
    assert len({w for (_l, w), v in got.items() if v}) == 2  # both workers took connections
    points = receiver.latest_metric_points(ACCEPTED).values()
    assert all(p.attributes.get("server.port") in (lab.http_port, lab.tls_port, lab.admin_port, None)
               for p in points)
    rows = json.loads(summary.read_text())["accepts_by_worker"]
    from_summary = {(r["listener"], int(r["thread"].rsplit("_", 1)[-1])): r["accepted"]
                    for r in rows if r["listener"] in ("plain_http", "tls_sni")}
    assert from_summary == {k: v for k, v in envoy.items() if v}

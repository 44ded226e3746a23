"""The ledger of a run at saturation (otel_envoy/accounting.py): real Envoy, real BPF, h2load saturating
two workers (keep-alive requests, new TLS connections, requests answered 5xx, clients that reset), a real
OTLP/gRPC receiver and the file output. At every stage what came in equals what went on plus what was
dropped, with a reason, plus what is still held: exactly, with every span traced and with the default
sampler."""

from __future__ import annotations

import json
import threading

import pytest

from otel_envoy.lab.lab import EnvoyLab
from tests.support.daemon import DaemonProcess
from tests.support.h2load import h2load
from tests.support.otlp_receiver import OtlpReceiver

pytestmark = pytest.mark.root


@pytest.mark.parametrize("sampler", [["--sampler", "always_on", "--cpu-budget", "0"], []],
                         ids=["always_on", "default"])
def test_every_stage_balances_at_saturation(tmp_path, sampler: list[str]) -> None:
    summary, out = tmp_path / "summary.json", tmp_path / "traces.jsonl"
    with EnvoyLab(concurrency=2) as lab, OtlpReceiver() as receiver:
        daemon = DaemonProcess(["--pid", str(lab.pid), "--otlp-endpoint", receiver.grpc_endpoint,
                                "--otlp-protocol", "grpc", "--output", str(out),
                                "--summary-json", str(summary), *sampler], tmp_path).start()
        base = f"http://127.0.0.1:{lab.http_port}"
        side = [threading.Thread(target=h2load, args=(f"{base}/status/503", 300, 4)),
                threading.Thread(target=h2load, args=(f"https://127.0.0.1:{lab.tls_port}/", 300, 30))]
        for t in side:
            t.start()
        h2load(f"{base}/", 20000, 32)
        for t in side:
            t.join()
        code = daemon.stop()
    assert code == 0, daemon.stderr()
    stats = json.loads(summary.read_text())
    accounts = stats["accounting"]
    assert {"ring", "decoder", "connections", "connection_spans", "rounds", "span_queue", "span_queue_out",
            "sink:jsonl", "sink:jsonl:delivery", "sink:otlp-grpc", "sink:otlp-grpc:delivery"} <= set(accounts)
    unbalanced = {name: stage for name, stage in accounts.items() if not stage["holds"]}
    assert not unbalanced, unbalanced
    assert accounts["ring"]["in"] > 1000
    assert accounts["connections"]["in"] >= 62  # h2load's 32 + 30 connections at least
    exported = stats["export"]["exported"]
    assert exported["jsonl"] == exported["otlp-grpc"] == accounts["span_queue"]["in"] > 0
    assert len(receiver.spans()) == exported["otlp-grpc"]


def test_nothing_is_submitted_once_the_daemon_stops_producing(tmp_path) -> None:
    """The end of a run: after stop_producing, a connection the kernel still tracks (accepted and read while
    producing) is closed by Envoy, yet no record is submitted: the last drain then reads every record the
    kernel counted (the ``ring`` stage of the ledger). Its close would otherwise come from the state the
    kernel holds, whatever the targets."""
    import socket
    import time

    from otel_envoy.probes.loader import ConnectionProbes, ProbeConfig

    with EnvoyLab(concurrency=1) as lab:
        probes = ConnectionProbes(ProbeConfig(sampling=True))
        try:
            received: list[bytes] = []
            probes.open_ring_buffer(received.append)
            probes.set_listen_ports([lab.http_port])
            probes.add_targets([lab.pid])
            with socket.create_connection(("127.0.0.1", lab.http_port), timeout=5) as s:
                s.sendall(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
                assert s.recv(4096).startswith(b"HTTP/1.1 200")
                time.sleep(0.2)
                probes.consume()
                assert probes.records_submitted() == len(received) > 0  # its accept and transfers, at least
                probes.stop_producing()
            time.sleep(0.5)  # Envoy closes its end of the connection (a close the kernel tracks)
            assert probes.records_submitted() == len(received)
            probes.consume()
            assert probes.records_submitted() == len(received)
        finally:
            probes.close()

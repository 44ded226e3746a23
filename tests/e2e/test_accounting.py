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

"""A traced connection of a TLS listener (decided whole by the kernel) sends no ESTABLISHED record: its accept
record carries its TCP handshake's completion and the local address the peer reached (bpf/sockets.bpf.h,
bpf/http_metrics.bpf.h established_at), and its accept-queue span and depths come from the accepts alone
(correlate/accept_queue.py ``AcceptQueue.accepted``). Real Envoy with its worker stopped while real TLS
clients connect, so that their handshakes wait in the kernel's accept queue together; real BPF; the spans
go to a real OTLP receiver and the kernel's records are saved beside them (--record)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from otel_envoy.correlate.addresses import format_ip
from otel_envoy.events.layout import load_layout
from otel_envoy.events.types import AcceptEvent, SockStateEvent
from tests.e2e.test_kept_connections import _wait_stopped
from tests.support.live_records import recorded_events, tls_listener_sampled_whole
from tests.support.tls_steps import SteppedTlsClient
from tests.support.traces import connection_traces

pytestmark = pytest.mark.root

C = load_layout().constants
SNI = "a.example.com"
QUEUED = 5
STOPPED_S = 0.2


def test_queued_tls_connections_take_their_completion_from_the_accept(lab, receiver, tmp_path: Path) -> None:
    with tls_listener_sampled_whole(lab, receiver, tmp_path, SNI) as events:
        os.kill(lab.pid, signal.SIGSTOP)  # no worker accepts: the kernel's accept queues hold them
        try:
            _wait_stopped(lab.pid)
            queued = []
            for _ in range(QUEUED):
                queued.append(SteppedTlsClient(lab.tls_port, SNI, lab.ca_path))
                time.sleep(0.01)  # established one after the other
            time.sleep(STOPPED_S)
        finally:
            os.kill(lab.pid, signal.SIGCONT)
        ports = []
        for c in queued:
            c.handshake()
            assert c.get().startswith(b"HTTP/1.1 200")
            ports.append(c.sock.getsockname()[1])
            c.close()
        time.sleep(1.0)

    # what the kernel sent: an accept carrying the completion and the local address, no ESTABLISHED record
    offset, decoded = recorded_events(events)
    accepts = {ev.peer_port: ev for ev in decoded if isinstance(ev, AcceptEvent) and ev.peer_port in ports}
    established_records = [ev.dport for ev in decoded if isinstance(ev, SockStateEvent) and ev.dport in ports
                           and ev.newstate == C["TCP_ESTABLISHED"]]
    assert offset is not None and sorted(accepts) == sorted(ports), (sorted(accepts), ports)
    assert established_records == []
    for port in ports:
        ev = accepts[port]
        assert 0 < ev.established_ns < ev.ts_ns and ev.ts_ns - ev.established_ns >= STOPPED_S * 1e9 * 0.9
        assert format_ip(ev.local_family, ev.local_addr) == "127.0.0.1"
    by_establishment = sorted(ports, key=lambda p: accepts[p].established_ns)
    by_accept = sorted(ports, key=lambda p: accepts[p].ts_ns)

    # the spans: each queued connection's wait from its completion to its accept, and the depths of a queue
    # that all five joined before the first was accepted
    traces = connection_traces(receiver.spans(), lab.tls_port)
    assert set(ports) <= set(traces), sorted(traces)
    for port in ports:
        trace = traces[port]
        queue = trace.child("tcp.accept_queue")
        assert (queue.start_ns - offset, queue.end_ns - offset) == (accepts[port].established_ns,
                                                                    accepts[port].ts_ns)
        assert trace.root.start_ns == queue.start_ns
        assert trace.root.attributes["network.local.address"] == "127.0.0.1"
        assert "established_not_seen" not in trace.root.attributes.get("otel_envoy.partial", [])
        assert trace.child("tls.handshake").attributes["tls.client.server_name"] == SNI
    depth = {p: traces[p].child("tcp.accept_queue").attributes for p in ports}
    assert [depth[p]["tcp.accept_queue.depth"] for p in by_accept] == list(range(QUEUED, 0, -1))
    arrivals = [depth[p]["tcp.accept_queue.depth_on_arrival"] for p in by_establishment]
    assert arrivals == list(range(1, QUEUED + 1))

"""A traced connection of a TLS listener (decided whole by the kernel): its peer's FIN and the first reset
it received ride on its close record instead of a record each (bpf/conn_sampling.bpf.h close_facts), and
its spans say what those records said. Real Envoy, real TLS clients over real sockets, real BPF: the daemon
exports its spans to a real OTLP receiver and saves the kernel's records beside them (--record)."""

from __future__ import annotations

import socket
import ssl
import struct
import time
from pathlib import Path

import pytest

from otel_envoy.events.layout import load_layout
from otel_envoy.events.types import CloseEvent, SockStateEvent, TcpEvent
from otel_envoy.spans.model import STATUS_CODE_ERROR
from tests.support.live_records import recorded_events, tls_listener_sampled_whole
from tests.support.traces import connection_traces

pytestmark = pytest.mark.root

C = load_layout().constants
SNI = "a.example.com"


def _request_then_close(port: int, ca: Path, *, reset: bool) -> int:
    """One request over TLS (HTTP/1.1, kept alive), its whole answer read; then the client closes first:
    a FIN, or with ``reset`` a RST (SO_LINGER 0). Returns the client's port."""
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.set_alpn_protocols(["http/1.1"])
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    with ctx.wrap_socket(raw, server_hostname=SNI) as tls:
        local_port = tls.getsockname()[1]
        tls.sendall(f"GET / HTTP/1.1\r\nHost: {SNI}\r\n\r\n".encode())
        answer = b""
        while b"\r\n\r\n" not in answer:
            answer += tls.recv(65536)
        head, _, body = answer.partition(b"\r\n\r\n")
        length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:"))
        while len(body) < length:
            body += tls.recv(65536)
        assert head.startswith(b"HTTP/1.1 200"), head
        time.sleep(0.05)
        if reset:
            tls.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    return local_port


def _folded_kind(ev: SockStateEvent | TcpEvent) -> str:
    """What a record says that a folded close record would carry instead ("" for other records)."""
    if isinstance(ev, SockStateEvent):
        return "CLOSE_WAIT" if ev.newstate == C["TCP_CLOSE_WAIT"] else ""
    return "reset_received" if ev.type == C["TCP_RESET_RECEIVED"] else ""


def test_the_peers_fin_and_reset_ride_on_the_close_record(lab, receiver, tmp_path: Path) -> None:
    with tls_listener_sampled_whole(lab, receiver, tmp_path, SNI) as events:
        fin_port = _request_then_close(lab.tls_port, lab.ca_path, reset=False)
        rst_port = _request_then_close(lab.tls_port, lab.ca_path, reset=True)
        time.sleep(1.0)

    # what the kernel sent: no record of the FIN or the reset, both on the close record
    offset, decoded = recorded_events(events)
    closes: dict[int, CloseEvent] = {}
    own_records: dict[int, list[str]] = {fin_port: [], rst_port: []}
    peers: dict[int, int] = {}  # fd -> peer port, from the accepts
    for ev in decoded:
        if ev.kind == C["EV_ACCEPT"]:
            peers[ev.fd] = ev.peer_port
        elif isinstance(ev, CloseEvent):
            if ev.role == C["ROLE_DOWNSTREAM"] and peers.get(ev.fd) in own_records:
                closes[peers[ev.fd]] = ev
        elif isinstance(ev, (SockStateEvent, TcpEvent)) and ev.dport in own_records and _folded_kind(ev):
            own_records[ev.dport].append(_folded_kind(ev))
    assert offset is not None and set(closes) == {fin_port, rst_port}, (sorted(closes), fin_port, rst_port)
    assert own_records == {fin_port: [], rst_port: []}, own_records
    fin_close, rst_close = closes[fin_port], closes[rst_port]
    assert fin_close.open_ts_ns < fin_close.peer_fin_ns < fin_close.ts_ns
    # Envoy answers the FIN with its TLS close_notify, which the client's closed socket answers with a reset
    fin_resets = [fin_close.reset_rx_ns] if fin_close.reset_rx_ns else []
    assert all(fin_close.peer_fin_ns < t < fin_close.ts_ns for t in fin_resets)
    assert rst_close.open_ts_ns < rst_close.reset_rx_ns < rst_close.ts_ns and rst_close.peer_fin_ns == 0

    # the spans the receiver got: as the records would have made them
    traces = connection_traces(receiver.spans(), lab.tls_port)
    assert {fin_port, rst_port} <= set(traces), sorted(traces)
    fin_root, rst_root = traces[fin_port].root, traces[rst_port].root
    assert fin_root.attributes["envoy.connection.close_initiator"] == "peer"
    def marks(root):
        return [(t - offset, name) for t, name, _ in root.events]

    assert marks(fin_root) == [(t, "tcp.reset_received") for t in fin_resets]
    assert fin_root.status_code != STATUS_CODE_ERROR  # a reset after the peer's FIN is no abort
    assert marks(rst_root) == [(rst_close.reset_rx_ns, "tcp.reset_received")]
    assert rst_root.attributes["envoy.connection.close_initiator"] == "peer"
    assert rst_root.status_code == STATUS_CODE_ERROR and rst_root.status_message == "connection reset by peer"
    for trace in (traces[fin_port], traces[rst_port]):
        assert trace.child("tls.handshake").attributes["tls.client.server_name"] == SNI

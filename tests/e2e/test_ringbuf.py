"""The mmap ring-buffer reader against the real kernel, with a ring small enough to wrap many times."""

from __future__ import annotations

import threading

import pytest

from otel_envoy.events.decode import Decoder
from otel_envoy.events.types import AcceptEvent, DataEvent
from otel_envoy.lab import clients
from otel_envoy.probes.loader import ConnectionProbes, ProbeConfig

pytestmark = pytest.mark.root


def test_small_ring_wraps_without_corrupting_records(lab):
    probes = ConnectionProbes(ProbeConfig(ringbuf_pages=4))  # 16 KiB: TLS records of ~1 KiB wrap it often
    decoder = Decoder()
    accepts: list[AcceptEvent] = []
    data_bytes = 0
    lock = threading.Lock()

    def on_record(raw: bytes) -> None:
        nonlocal data_bytes
        ev = decoder.decode(raw)
        with lock:
            if isinstance(ev, AcceptEvent):
                accepts.append(ev)
            elif isinstance(ev, DataEvent):
                assert len(ev.data) == ev.captured  # a record cut at the wrap would show here
                data_bytes += ev.captured

    stop = threading.Event()
    try:
        probes.add_targets([lab.pid])
        probes.set_listen_ports([lab.http_port, lab.tls_port])
        probes.open_ring_buffer(on_record)
        poller = threading.Thread(target=lambda: [probes.poll(5) for _ in iter(stop.is_set, True)])
        poller.start()
        ports = set()
        for i in range(60):
            r = clients.curl_tls(lab.tls_port, "a.example.com", alpn="h2", tls_version="1.3", ca=lab.ca_path)
            assert r.http_code == 200
            ports.add(r.local_port)
            if i % 10 == 0:
                ports.update(clients.burst(lab.http_port, 10, concurrency=5).local_ports)
        stop.set()
        poller.join(10)
        probes.consume()
        drops = probes.drop_counts()
    finally:
        stop.set()
        probes.close()
    assert decoder.errors == {}, decoder.errors
    seen = {a.peer_port for a in accepts}
    lost = drops["ringbuf_full"]
    assert data_bytes > 16 * 1024 * 5  # the ring wrapped at least five times
    if lost == 0:
        assert ports <= seen
    else:  # the kernel counted what it could not write; everything else arrived intact
        assert len(ports - seen) <= lost

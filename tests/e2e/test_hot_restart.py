"""An Envoy hot restart under a daemon that follows every Envoy: the new process (``--restart-epoch 1``, same
``--base-id``) takes the listening sockets over from the old one (over a unix socket, SCM_RIGHTS: it never
binds them), the old one drains and exits. Connections of each process carry its pid and a known listener,
the new process's startup trace says its sockets were received, the old one leaves nothing in the kernel's
tables, and the daemon goes on."""

from __future__ import annotations

import json
import socket
import ssl
import time

import pytest

from otel_envoy.lab.envoy_config import PLAIN_LISTENER, TLS_LISTENER
from otel_envoy.lab.lab import EnvoyLab
from otel_envoy.spans.model import SpanRecord
from tests.support.daemon import DaemonProcess
from tests.support.otlp_receiver import OtlpReceiver

pytestmark = pytest.mark.root


def _plain(port: int, keep_open: bool = False) -> tuple[int, socket.socket | None]:
    """One HTTP/1.1 request answered 200; (the client's port, the socket when ``keep_open``)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n" + (b"" if keep_open else b"Connection: close\r\n") + b"\r\n")
    head = s.recv(65536)
    assert head.startswith(b"HTTP/1.1 200"), head[:100]
    client_port = s.getsockname()[1]
    if keep_open:
        return client_port, s
    s.close()
    return client_port, None


def _tls(lab: EnvoyLab) -> int:
    """One HTTPS request on the TLS listener (SNI a.example.com); the client's port."""
    ctx = ssl.create_default_context(cafile=str(lab.ca_path))
    with socket.create_connection(("127.0.0.1", lab.tls_port), timeout=5) as raw, \
            ctx.wrap_socket(raw, server_hostname="a.example.com") as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: a.example.com\r\nConnection: close\r\n\r\n")
        assert s.recv(65536).startswith(b"HTTP/1.1 200")
        return s.getsockname()[1]


def _by_client_port(spans: list[SpanRecord]) -> dict[int, SpanRecord]:
    return {s.attributes["network.peer.port"]: s for s in spans if s.name == "envoy.downstream.connection"
            and "network.peer.port" in s.attributes}


def test_hot_restart_is_followed_across_both_processes(tmp_path) -> None:
    summary = tmp_path / "summary.json"
    receiver = OtlpReceiver().start()
    lab = EnvoyLab(concurrency=2, direct_response=True, hot_restart=True, drain_time_s=2,
                   parent_shutdown_time_s=3)
    daemon = None
    held = None
    try:
        lab.start()
        old = lab.pid
        # no --pid/--comm: every Envoy, this one found running, the next epoch followed from its exec
        daemon = DaemonProcess(["--envoy-admin", lab.admin_url, "--otlp-endpoint", receiver.grpc_endpoint,
                                "--otlp-protocol", "grpc", "--metrics-interval", "1",
                                "--summary-json", str(summary)], tmp_path).start()
        listeners = {lab.http_port: PLAIN_LISTENER, lab.tls_port: TLS_LISTENER}
        before = [_plain(lab.http_port)[0] for _ in range(5)] + [_tls(lab) for _ in range(2)]
        held_port, held = _plain(lab.http_port, keep_open=True)  # open across the restart
        new = lab.restart()
        assert new != old
        during = [_plain(lab.http_port)[0] for _ in range(5)]  # either process may take these
        codes = lab.wait_retired(15.0)
        assert codes == [0], codes  # the old epoch drained and exited on its own
        assert daemon.proc is not None and daemon.proc.poll() is None, daemon.stderr()
        after = [_plain(lab.http_port)[0] for _ in range(10)] + [_tls(lab) for _ in range(3)]
        receiver.wait_for(lambda s: set(before + during + after + [held_port]) <= set(_by_client_port(s)),
                          timeout=20)
        receiver.wait_for(lambda s: any(x.name == "envoy.startup" and x.attributes.get("process.pid") == new
                                        for x in s), timeout=20)
        time.sleep(4.0)  # past the old process's metric series' grace (one metrics interval + 2 s)
        assert daemon.proc.poll() is None, daemon.stderr()
    finally:
        if held is not None:
            held.close()
        code = daemon.stop() if daemon is not None else None
        lab.stop()
        receiver.stop()
    assert code == 0, daemon.stderr()
    stderr = daemon.stderr()
    assert "Traceback" not in stderr and "ERROR" not in stderr, stderr
    spans = receiver.spans()
    conns = _by_client_port(spans)
    def check(port: int, pid: int | None) -> None:
        a = conns[port].attributes
        if pid is not None:
            assert a["process.pid"] == pid, (port, a)
        assert a["process.pid"] in (old, new)
        assert "listener_unknown" not in a.get("otel_envoy.partial", ()), (port, old, new, a)
        assert a["network.local.address"] == "127.0.0.1", a
        assert a["envoy.listener.name"] == listeners[a["network.local.port"]], a

    for port in [*before, held_port]:
        check(port, old)
    for port in during:
        check(port, None)
    for port in after:  # served by the new process, through the sockets it received
        check(port, new)
        assert "established_not_seen" not in conns[port].attributes.get("otel_envoy.partial", ())
    assert {conns[p].attributes["network.local.port"] for p in after} == {lab.http_port, lab.tls_port}
    # the connection held open across the restart ended with the old process: closed by it when it shut
    # down (Envoy 1.40 closes it), or by its exit (ended with end_reason process_exited)
    kept = conns[held_port].attributes
    assert kept.get("envoy.connection.still_open") is not True, kept
    assert kept.get("envoy.connection.end_reason") == "process_exited" or \
        kept["envoy.connection.close_initiator"] == "envoy", kept

    # the new process's start: its listening sockets came from the old one, none was bound
    roots = [s for s in spans if s.name == "envoy.startup" and s.attributes.get("process.pid") == new]
    assert len(roots) == 1
    sockets = [s for s in spans if s.name == "envoy.listen_socket" and s.parent_span_id == roots[0].span_id]
    taken = [s for s in sockets if s.attributes.get("server.port") in listeners]
    # 2 listeners x 2 workers (SO_REUSEPORT): 4 sockets; the admin API's socket is bound anew
    assert len(taken) == 4, [(s.attributes, [e[1] for e in s.events]) for s in sockets]
    for s in taken:
        steps = [e[1] for e in s.events]
        assert "bind" not in steps, steps
        assert s.attributes["envoy.listen_socket.received"] is True, s.attributes
        assert s.attributes["server.address"] == "127.0.0.1"
        assert s.attributes["envoy.listener.name"] == listeners[s.attributes["server.port"]]
        assert len(s.attributes["envoy.listen_socket.accepted_by"]) == 1, s.attributes
    assert roots[0].attributes["envoy.startup.workers"] == 2
    assert roots[0].attributes["envoy.startup.received_sockets"] == 4

    processes = json.loads(summary.read_text())["processes"]
    assert new in processes["traced"] and old not in processes["traced"], processes
    assert processes["left_in_kernel"].get(str(old)) == {}, processes

"""An Envoy in network, PID and mount namespaces of its own (``unshare --net --pid --fork --mount-proc``, as
a container runtime starts one), traced by a daemon on the host that follows every Envoy and has no admin
API to ask (Envoy's is inside the namespace): its connections carry its host pid and the addresses and
ports Envoy sees inside, its listeners are found inside its namespace, its requests are traced, and its
exit leaves nothing behind."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from otel_envoy.lab.lab import EnvoyLab
from otel_envoy.lab.namespaced import NETNS_TOOLS
from otel_envoy.spans.model import SpanRecord
from tests.support.capabilities import CAP_SYS_ADMIN, daemonset_capabilities
from tests.support.daemon import DaemonProcess
from tests.support.otlp_receiver import OtlpReceiver

pytestmark = pytest.mark.root


#: Addresses that exist only inside Envoy's namespace (on its loopback, 10.199.0.0/24): a span carrying
#: them was made from what Envoy saw there.
ENVOY_ADDRESS = "10.199.0.1"
CLIENT_ADDRESS = "10.199.0.2"
PLAIN, TLS = 12, 4
PATHS = [f"/bytes/{100 + i}" for i in range(PLAIN)]  # the lab backend answers with that many bytes


def _curl_inside(lab: EnvoyLab, args: list[str]) -> tuple[str, int]:
    """curl run inside Envoy's network namespace from CLIENT_ADDRESS: (HTTP status, its local port)."""
    out = subprocess.run(lab.in_netns(["curl", "-sS", "--max-time", "10", "--interface", CLIENT_ADDRESS,
                                       "-o", "/dev/null", "-w", "%{http_code} %{local_port}", *args]),
                         capture_output=True, text=True, timeout=20, check=True).stdout.split()
    return out[0], int(out[1])


def _connections(spans: list[SpanRecord], lab: EnvoyLab, pid: int) -> list[SpanRecord]:
    """The connections of ``pid`` to the lab's listeners (the lab's own admin calls, also traced, aside)."""
    return [s for s in _of(spans, "envoy.downstream.connection", pid)
            if s.attributes.get("network.local.port") in (lab.http_port, lab.tls_port)]


def _of(spans: list[SpanRecord], name: str, pid: int) -> list[SpanRecord]:
    return [s for s in spans if s.name == name and s.attributes.get("process.pid") == pid]


@pytest.mark.parametrize("capabilities", ["root", "daemonset"])
def test_envoy_in_its_own_namespaces_is_traced_with_the_addresses_it_sees(tmp_path, capabilities) -> None:
    missing = [t for t in (*NETNS_TOOLS, "curl", "capsh") if shutil.which(t) is None]
    assert not missing, f"missing tools: {missing} (apt-get install util-linux iproute2 curl libcap2-bin)"
    summary = tmp_path / "summary.json"
    receiver = OtlpReceiver().start()
    # no --pid, --comm or --envoy-admin: every process named envoy, from kernel events and /proc alone
    daemon = DaemonProcess(["--otlp-endpoint", receiver.grpc_endpoint, "--otlp-protocol", "grpc",
                            "--metrics-interval", "1", "--summary-json", str(summary)], tmp_path)
    if capabilities == "daemonset":
        daemon.cmd = daemonset_capabilities(daemon.cmd)
    daemon.start()
    assert daemon.proc is not None
    effective = int(next(line for line in Path(f"/proc/{daemon.proc.pid}/status").read_text().splitlines()
                         if line.startswith("CapEff:")).split()[1], 16)
    assert bool(effective & (1 << CAP_SYS_ADMIN)) == (capabilities == "root")
    lab = EnvoyLab(concurrency=2, netns=True, address=ENVOY_ADDRESS)
    try:
        lab.start()
        pid = lab.pid
        # its own namespaces: pid 1 in its PID namespace, a network namespace that is not ours
        status_lines = Path(f"/proc/{pid}/status").read_text().splitlines()
        nspid = next(line for line in status_lines if line.startswith("NSpid:")).split()
        assert nspid[1:] == [str(pid), "1"], nspid
        assert os.stat(f"/proc/{pid}/ns/net").st_ino != os.stat("/proc/self/ns/net").st_ino
        # (client port, Envoy's port it connected to): a list, since the kernel may give a client port again
        # to a connection to the other listener (a different 4-tuple)
        pairs: list[tuple[int, int]] = []
        for path in PATHS:
            status, port = _curl_inside(lab, ["--http1.1", f"http://{ENVOY_ADDRESS}:{lab.http_port}{path}"])
            assert status == "200"
            pairs.append((port, lab.http_port))
        for _ in range(TLS):
            status, port = _curl_inside(lab, [
                "--http1.1", "--tlsv1.3", "--cacert", str(lab.ca_path),
                "--resolve", f"a.example.com:{lab.tls_port}:{ENVOY_ADDRESS}",
                f"https://a.example.com:{lab.tls_port}/"])
            assert status == "200"
            pairs.append((port, lab.tls_port))
        envoy_cx = lab.stats(r"^listener\.(plain_http|tls_sni)\.downstream_cx_total$")
        receiver.wait_for(lambda s: len(_connections(s, lab, pid)) >= PLAIN + TLS, timeout=20)
        receiver.wait_for(lambda s: len([x for x in s if x.name == "GET" and x.kind == 2
                                         and x.attributes.get("url.path") in PATHS]) >= PLAIN, timeout=20)
    finally:
        lab.stop()
    try:
        # its exit ends its startup trace (or its shutdown trace, when its start was handed on before)
        receiver.wait_for(lambda s: any(x.attributes.get("envoy.startup.exited") is True
                                        and x.attributes.get("process.pid") == pid for x in s), timeout=15)
        time.sleep(4.0)  # past the metric series' grace (one metrics interval + 2 s)
        assert daemon.proc is not None and daemon.proc.poll() is None, daemon.stderr()  # goes on without it
    finally:
        code = daemon.stop()
        receiver.stop()
    assert code == 0, daemon.stderr()
    stderr = daemon.stderr()
    assert "Traceback" not in stderr and "ERROR" not in stderr, stderr
    spans = receiver.spans()

    # as many as Envoy itself counted
    assert sum(envoy_cx.values()) == PLAIN + TLS, envoy_cx
    connections = _connections(spans, lab, pid)
    assert len(connections) == PLAIN + TLS
    for conn in connections:
        a = conn.attributes
        assert a["network.peer.address"] == CLIENT_ADDRESS, a
        assert a["network.local.address"] == ENVOY_ADDRESS, a
        assert "listener_unknown" not in a.get("otel_envoy.partial", ()), a
        assert "established_not_seen" not in a.get("otel_envoy.partial", ()), a
        assert a["thread.name"].startswith("wrk:worker_"), a
    # each client connection once, on the listener it connected to
    assert sorted((c.attributes["network.peer.port"], c.attributes["network.local.port"])
                  for c in connections) == sorted(pairs), pairs
    # the lab's own admin calls while Envoy started, some accepted before the daemon's rescan found the
    # listener: known all the same, from the bind the kernel saw
    admin = [s for s in _of(spans, "envoy.downstream.connection", pid)
             if (s.attributes.get("network.peer.port"), s.attributes.get("network.local.port")) not in pairs]
    assert admin and all(s.attributes["network.local.port"] == lab.admin_port for s in admin), \
        [s.attributes for s in admin]
    by_id = {c.span_id: c for c in connections}
    queues = [s for s in spans if s.name == "tcp.accept_queue" and s.parent_span_id in by_id]
    assert len(queues) == PLAIN + TLS  # the handshakes inside the namespace were seen (softirq, by port)
    handshakes = [s for s in spans if s.name == "tls.handshake" and s.parent_span_id in by_id]
    assert len(handshakes) == TLS
    assert all(h.attributes["tls.client.server_name"] == "a.example.com" for h in handshakes)

    # every plaintext request, under its connection, and the upstream request Envoy sent the backend that
    # runs in its namespace
    requests = [s for s in spans if s.name == "GET" and s.kind == 2 and s.parent_span_id in by_id]
    assert sorted(r.attributes["url.path"] for r in requests) == sorted(PATHS)
    assert all(r.attributes["http.response.status_code"] == 200 for r in requests)
    upstream = [s for s in spans if s.name == "GET" and s.kind == 3
                and s.attributes.get("url.path") in PATHS]
    assert len(upstream) == PLAIN
    assert {(u.attributes["server.address"], u.attributes["server.port"]) for u in upstream} == \
        {("127.0.0.1", lab.backend_port)}

    # its startup: each socket with the address it bound inside its namespace
    (root,) = _of(spans, "envoy.startup", pid)
    sockets = [s for s in spans if s.name == "envoy.listen_socket" and s.parent_span_id == root.span_id]
    assert {(s.attributes["server.address"], s.attributes["server.port"]) for s in sockets} >= \
        {(ENVOY_ADDRESS, lab.http_port), (ENVOY_ADDRESS, lab.tls_port)}

    processes = json.loads(summary.read_text())["processes"]
    assert pid not in processes["traced"] and processes["exited"] >= 1, processes
    assert processes["left_in_kernel"].get(str(pid)) == {}, processes

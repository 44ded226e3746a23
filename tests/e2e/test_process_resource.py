"""Per-process resource attributes with real Envoys in real cgroups: each Envoy's spans carry its own
container.id (from a cgroup v2 directory named like a container runtime's scope), k8s.pod.* and service.name
(from its environment), the operator's OTEL_RESOURCE_ATTRIBUTES over both; a replay of the run's recording,
after the Envoys are gone, gives the same resources."""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from otel_envoy.lab.lab import EnvoyLab
from tests.support.daemon import DaemonProcess
from tests.support.otlp_receiver import OtlpReceiver
from tests.support.replay import ROOT, read_jsonl

pytestmark = pytest.mark.root


def _cgroup2_mount() -> Path | None:
    """Where the cgroup v2 hierarchy is mounted (/sys/fs/cgroup, or /sys/fs/cgroup/unified when hybrid)."""
    for line in Path("/proc/self/mounts").read_text().splitlines():
        fields = line.split()
        if len(fields) > 2 and fields[2] == "cgroup2":
            return Path(fields[1])
    return None


@contextlib.contextmanager
def _cgroups(*relative: str) -> Iterator[list[Path]]:
    """Real cgroup v2 directories (made, then removed once their processes are gone)."""
    mount = _cgroup2_mount()
    if mount is None or not os.access(mount, os.W_OK):
        pytest.skip(f"no writable cgroup v2 hierarchy (mount: {mount})")
    top = mount / f"otel-envoy-test-{os.getpid()}.slice"
    made: list[Path] = []
    try:
        for rel in relative:
            path = top / rel
            for d in [*reversed(path.relative_to(mount).parents[:-1]), path.relative_to(mount)]:
                if not (mount / d).exists():
                    (mount / d).mkdir()
                    made.append(mount / d)
        yield [top / rel for rel in relative]
    finally:
        for d in reversed(made):
            for _ in range(50):  # a process just killed leaves its cgroup a moment later
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.1)


def _get(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert s.recv(65536).startswith(b"HTTP/1.1 200")


def test_each_envoy_s_spans_carry_its_container_pod_and_service(tmp_path: Path) -> None:
    docker_id, crio_id = secrets.token_hex(32), secrets.token_hex(32)
    pod_uid = str(uuid.uuid4())
    with _cgroups(f"docker-{docker_id}.scope",
                  f"kubepods-besteffort-pod{pod_uid.replace('-', '_')}.slice/crio-{crio_id}.scope") as (
            docker_scope, crio_scope), OtlpReceiver() as receiver:
        # Envoy A runs before the daemon starts; Envoy B starts under it (traced from its exec)
        a = EnvoyLab(direct_response=True, envoy_cgroup=docker_scope,
                     envoy_env={"OTEL_SERVICE_NAME": "edge-a"}).start()
        b = EnvoyLab(direct_response=True, envoy_cgroup=crio_scope,
                     envoy_env={"POD_NAME": "checkout-6f9b8c7d5c-z2mkq", "POD_NAMESPACE": "shop",
                                "OTEL_SERVICE_NAME": "",
                                "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment.name=lost,team=payments"})
        recording = tmp_path / "run.events"
        daemon = DaemonProcess(
            ["--exe", str(a.envoy_binary), "--otlp-endpoint", receiver.grpc_endpoint,
             "--otlp-protocol", "grpc", "--metrics-interval", "0", "--record", str(recording)], tmp_path,
            env={"OTEL_SERVICE_NAME": "", "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment.name=e2e"})
        try:
            daemon.start()
            b.start()
            pids = {"a": a.pid, "b": b.pid}
            assert f"docker-{docker_id}.scope" in Path(f"/proc/{a.pid}/cgroup").read_text()
            for lab in (a, b):
                for _ in range(3):
                    _get(lab.http_port)
            receiver.wait_for(lambda spans: all(
                sum(s.name == "GET" and s.resource_attributes.get("process.pid") == pid for s in spans) >= 3
                for pid in pids.values()), timeout=20)
        finally:
            code = daemon.stop()
            a.stop()
            b.stop()
        assert code == 0, daemon.stderr()
    spans = receiver.spans()
    common = {"deployment.environment.name": "e2e", "telemetry.distro.name": "otel-envoy",
              "telemetry.sdk.language": "python"}
    expected = {
        "a": {**common, "service.name": "edge-a", "container.id": docker_id, "process.pid": pids["a"],
              "process.executable.name": "envoy"},
        "b": {**common, "service.name": "checkout", "container.id": crio_id, "k8s.pod.uid": pod_uid,
              "k8s.pod.name": "checkout-6f9b8c7d5c-z2mkq", "k8s.namespace.name": "shop", "team": "payments",
              "process.pid": pids["b"], "process.executable.name": "envoy"},
    }
    for name, pid in pids.items():
        mine = [s for s in spans if s.attributes.get("process.pid") == pid or
                s.resource_attributes.get("process.pid") == pid]
        names = {s.name for s in mine}
        assert {"envoy.downstream.connection", "GET"} <= names, names
        if name == "b":  # started under the daemon: its startup trace carries its resource too
            assert "envoy.startup" in names
        for span in mine:  # every span of the process, its connections', requests' and startup's alike
            got = {k: span.resource_attributes.get(k) for k in expected[name]}
            assert got == expected[name], (span.name, span.resource_attributes)
        assert mine[0].resource_attributes["process.executable.path"] == os.path.realpath(a.envoy_binary)

    # the recording holds the resources: a replay (no root, the Envoys gone, the same operator's settings)
    # gives the same
    replayed = tmp_path / "replayed.jsonl"
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("OTEL_")},
           "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment.name=e2e"}
    proc = subprocess.run([sys.executable, "-m", "otel_envoy.cli", "replay", str(recording), "--output",
                           str(replayed)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    again = read_jsonl(replayed)
    for name, pid in pids.items():
        roots = [s for s in again if s.name == "envoy.downstream.connection"
                 and s.attributes["process.pid"] == pid]
        assert len(roots) >= 3
        for root in roots:
            assert {k: root.resource_attributes.get(k) for k in expected[name]} == expected[name]

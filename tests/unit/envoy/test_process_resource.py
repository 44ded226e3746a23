"""process_resource: a process's resource attributes from fake /proc/<pid>/cgroup and environ contents, for
every container runtime's cgroup form, and the precedence of the service name."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from otel_envoy.envoy.process_resource import (
    cgroup_attributes,
    deployment_of,
    environ_attributes,
    kubelet_pod_name,
    merged,
    operator_keys,
    parse_resource_attributes,
    process_resource,
    read_environ,
)

CID = "3f1c0a9e5b7d2c4e6f8a0b1c2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f7a8b9c0d1e"
CID2 = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
UID = "5c3e2a1b-9f8d-4e7c-b6a5-0d1e2f3a4b5c"
SYSTEMD_UID = UID.replace("-", "_")


@pytest.mark.parametrize(("cgroup", "expected"), [
    # docker, cgroupfs driver (v1 hierarchies and the v2 line)
    (f"12:memory:/docker/{CID}\n11:pids:/docker/{CID}\n0::/docker/{CID}\n", {"container.id": CID}),
    # docker, systemd driver (cgroup v2 only)
    (f"0::/system.slice/docker-{CID}.scope\n", {"container.id": CID}),
    # Kubernetes, containerd, systemd driver, burstable and besteffort QoS
    (f"0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{SYSTEMD_UID}.slice/"
     f"cri-containerd-{CID}.scope\n", {"container.id": CID, "k8s.pod.uid": UID}),
    (f"0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{SYSTEMD_UID}.slice/"
     f"cri-containerd-{CID}.scope\n", {"container.id": CID, "k8s.pod.uid": UID}),
    # guaranteed QoS: no QoS level in the path
    (f"0::/kubepods.slice/kubepods-pod{SYSTEMD_UID}.slice/cri-containerd-{CID}.scope\n",
     {"container.id": CID, "k8s.pod.uid": UID}),
    # Kubernetes, cgroupfs driver: /kubepods/<qos>/pod<uid>/<id>, and /kubepods/pod<uid>/<id>
    (f"0::/kubepods/burstable/pod{UID}/{CID}\n", {"container.id": CID, "k8s.pod.uid": UID}),
    (f"4:memory:/kubepods/pod{UID}/{CID}\n", {"container.id": CID, "k8s.pod.uid": UID}),
    # CRI-O (its conmon's scope is not the container)
    (f"0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{SYSTEMD_UID}.slice/crio-{CID}.scope\n",
     {"container.id": CID, "k8s.pod.uid": UID}),
    (f"0::/machine.slice/crio-conmon-{CID}.scope\n", {}),
    # podman (and its conmon)
    (f"0::/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{CID}.scope\n",
     {"container.id": CID}),
    (f"0::/machine.slice/libpod-conmon-{CID}.scope\n", {}),
    (f"0::/machine.slice/libpod-{CID}.scope/container\n", {"container.id": CID}),
    # nested: the deepest container is the process's own
    (f"0::/system.slice/docker-{CID2}.scope/docker/{CID}\n", {"container.id": CID}),
    # seen from another cgroup namespace (the daemon's own container): the path starts with ..
    (f"0::/../../kubepods-besteffort-pod{SYSTEMD_UID}.slice/cri-containerd-{CID}.scope\n",
     {"container.id": CID, "k8s.pod.uid": UID}),
    # hybrid: the v2 line first, then the v1 hierarchies
    (f"5:devices:/docker/{CID2}\n0::/system.slice/docker-{CID}.scope\n", {"container.id": CID}),
    (f"5:devices:/docker/{CID}\n0::/\n", {"container.id": CID}),
    # not in a container
    ("0::/\n", {}),
    ("0::/user.slice/user-0.slice/session-3.scope\n", {}),
    ("12:memory:/process_api/2fefd692242f157ae3481da322a1491b\n0::/init.scope\n", {}),
    (f"0::/otel-envoy-test.slice/pod{UID}/x\n", {}),  # a pod segment outside kubepods is no pod
    (f"0::/system.slice/docker-{CID[:63]}.scope\n", {}),  # not 64 hex digits
    (f"0::/system.slice/docker-{CID.upper()}.scope\n", {}),
    ("", {}),
    ("garbage without colons\n::\n", {}),
])
def test_cgroup_forms_of_each_runtime(cgroup: str, expected: dict[str, str]) -> None:
    assert cgroup_attributes(cgroup) == expected


def test_resource_attributes_variable_is_parsed_as_the_sdks_do() -> None:
    assert parse_resource_attributes("a=1, b = two ,c=x%2Cy%3Dz,bad,=novalue,d=") == {
        "a": "1", "b": "two", "c": "x,y=z", "d": ""}
    assert parse_resource_attributes("") == {}
    many = ",".join(f"k{i}=v" for i in range(200))
    assert len(parse_resource_attributes(many)) == 64


@pytest.mark.parametrize(("env", "service"), [
    ({"OTEL_SERVICE_NAME": "svc", "OTEL_RESOURCE_ATTRIBUTES": "service.name=declared",
      "ISTIO_META_WORKLOAD_NAME": "reviews-v1", "POD_NAME": "reviews-v1-5d8c9b7f6d-x2x7b"}, "svc"),
    ({"OTEL_RESOURCE_ATTRIBUTES": "service.name=declared", "ISTIO_META_WORKLOAD_NAME": "reviews-v1",
      "POD_NAME": "reviews-v1-5d8c9b7f6d-x2x7b"}, "declared"),
    ({"ISTIO_META_WORKLOAD_NAME": "reviews-v1", "POD_NAME": "other-5d8c9b7f6d-x2x7b"}, "reviews-v1"),
    ({"POD_NAME": "reviews-v1-5d8c9b7f6d-x2x7b"}, "reviews-v1"),  # a Deployment's pod
    ({"POD_NAME": "web-0"}, "web-0"),  # not a ReplicaSet's: the pod name itself
    ({"OTEL_SERVICE_NAME": "  ", "POD_NAME": "web-0"}, "web-0"),  # blank is unset
    ({}, None),  # the daemon's default stays
    ({"OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=prod"}, None),
])
def test_service_name_precedence(env: dict[str, str], service: str | None) -> None:
    assert environ_attributes(env).get("service.name") == service


def test_pod_name_namespace_and_uid_from_the_downward_api_s_usual_names() -> None:
    assert environ_attributes({"POD_NAME": "p-1", "POD_NAMESPACE": "shop", "POD_UID": UID}) == {
        "k8s.pod.name": "p-1", "k8s.namespace.name": "shop", "k8s.pod.uid": UID, "service.name": "p-1"}
    assert environ_attributes({"K8S_POD_NAME": "p-2", "K8S_NAMESPACE": "ns2"})["k8s.namespace.name"] == "ns2"
    assert environ_attributes({"MY_POD_NAME": "p-3", "MY_POD_NAMESPACE": "ns3"})["k8s.pod.name"] == "p-3"
    # the first variable that holds a valid value wins: "Not A Label" is no namespace name
    attrs = environ_attributes({"POD_NAMESPACE": "Not A Label", "K8S_POD_NAMESPACE": "ns4", "POD_UID": "x"})
    assert attrs == {"k8s.namespace.name": "ns4"}


def test_declared_attributes_win_over_guessed_ones_and_telemetry_stays_ours() -> None:
    attrs = environ_attributes({
        "OTEL_RESOURCE_ATTRIBUTES": "k8s.pod.name=declared-pod,telemetry.sdk.language=cpp,team=edge",
        "POD_NAME": "env-pod"})
    assert attrs == {"k8s.pod.name": "declared-pod", "team": "edge", "service.name": "declared-pod"}


def test_deployment_of_needs_kubernetes_generated_suffixes() -> None:
    assert deployment_of("reviews-v1-5d8c9b7f6d-x2x7b") == "reviews-v1"
    assert deployment_of("api-7c9f8b6d5-qwzrt") == "api"  # a 9-character pod-template hash
    assert deployment_of("api-7c9f8b6d5-qwert") is None  # 'e' is not in Kubernetes' alphabet
    assert deployment_of("web-0") is None
    assert deployment_of("daemon-x2x7b") is None  # a DaemonSet's pod: no ReplicaSet hash


def _fake_proc(root: Path, pid: int, *, cgroup: str | None = None, environ: bytes | None = None,
               comm: str | None = "envoy", exe: str | None = "/usr/local/bin/envoy") -> Path:
    d = root / str(pid)
    d.mkdir(parents=True)
    if cgroup is not None:
        (d / "cgroup").write_text(cgroup)
    if environ is not None:
        (d / "environ").write_bytes(environ)
    if comm is not None:
        (d / "comm").write_text(comm + "\n")
    if exe is not None:
        os.symlink(exe, d / "exe")
    return root


def test_a_process_in_a_kubernetes_pod(tmp_path: Path) -> None:
    proc = _fake_proc(
        tmp_path / "proc", 4242,
        cgroup=f"0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{SYSTEMD_UID}.slice/"
               f"cri-containerd-{CID}.scope\n",
        environ=b"PATH=/usr/bin\0POD_NAME=reviews-v1-5d8c9b7f6d-x2x7b\0POD_NAMESPACE=shop\0"
                b"ISTIO_META_WORKLOAD_NAME=reviews-v1\0SECRET_TOKEN=hunter2\0INSTANCE_IP=10.0.0.7\0")
    attrs = process_resource(4242, proc=proc, kubelet_pods=tmp_path / "none")
    assert attrs == {
        "container.id": CID, "k8s.pod.uid": UID, "k8s.pod.name": "reviews-v1-5d8c9b7f6d-x2x7b",
        "k8s.namespace.name": "shop", "service.name": "reviews-v1", "process.pid": 4242,
        "process.executable.name": "envoy", "process.executable.path": "/usr/local/bin/envoy"}


def test_only_the_named_variables_are_read(tmp_path: Path) -> None:
    proc = _fake_proc(tmp_path, 7, environ=b"SECRET=x\0OTEL_SERVICE_NAME=a\0OTEL_SERVICE_NAME=b\0"
                                           b"\xff\xfe=\xff\0POD_NAME\0=\0POD_NAMESPACE=ns\xff")
    assert read_environ(7, tmp_path) == {"OTEL_SERVICE_NAME": "a", "POD_NAMESPACE": "ns\ufffd"}
    assert proc == tmp_path


def test_facts_of_the_kernel_win_over_declared_values(tmp_path: Path) -> None:
    _fake_proc(tmp_path, 9, cgroup=f"0::/system.slice/docker-{CID}.scope\n",
               environ=b"OTEL_RESOURCE_ATTRIBUTES=container.id=fake,process.pid=1,host.name=h\0"
                       b"OTEL_SERVICE_NAME=front\0", exe="/opt/envoy (deleted)")
    attrs = process_resource(9, proc=tmp_path, kubelet_pods=tmp_path / "none")
    assert attrs == {"container.id": CID, "process.pid": 9, "host.name": "h", "service.name": "front",
                     "process.executable.name": "envoy", "process.executable.path": "/opt/envoy"}


def test_a_vanished_process_gives_what_is_known(tmp_path: Path) -> None:
    assert process_resource(12345, proc=tmp_path) == {"process.pid": 12345}
    # environ and cgroup unreadable (here: directories), comm and exe given by the caller
    d = tmp_path / "77"
    (d / "environ").mkdir(parents=True)
    (d / "cgroup").mkdir()
    assert process_resource(77, "envoy", "/bin/envoy", proc=tmp_path) == {
        "process.pid": 77, "process.executable.name": "envoy", "process.executable.path": "/bin/envoy"}


def _kubelet(root: Path, uid: str, hosts: str) -> Path:
    pods = root / "pods"
    (pods / uid).mkdir(parents=True)
    (pods / uid / "etc-hosts").write_text(hosts)
    return pods


MANAGED = "# Kubernetes-managed hosts file.\n127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost\n"


def test_pod_name_from_the_kubelet_s_hosts_file(tmp_path: Path) -> None:
    pods = _kubelet(tmp_path, UID, MANAGED + "10.244.1.7\tcheckout-6f9b8c7d5c-z2mkq\n")
    _fake_proc(tmp_path / "proc", 5, cgroup=f"0::/kubepods/besteffort/pod{UID}/{CID}\n", environ=b"")
    attrs = process_resource(5, proc=tmp_path / "proc", kubelet_pods=pods)
    assert attrs["k8s.pod.name"] == "checkout-6f9b8c7d5c-z2mkq" and attrs["service.name"] == "checkout"
    # the environment's name wins; the kubelet's file is then not read
    _fake_proc(tmp_path / "proc", 6, cgroup=f"0::/kubepods/besteffort/pod{UID}/{CID}\n",
               environ=b"POD_NAME=from-env\0")
    assert process_resource(6, proc=tmp_path / "proc", kubelet_pods=pods)["k8s.pod.name"] == "from-env"


@pytest.mark.parametrize("hosts", [
    "# Kubernetes-managed hosts file (host network).\n127.0.0.1\tlocalhost\n10.0.0.1\tnode-1\n",
    MANAGED + "10.244.1.7\tweb-0.web.shop.svc.cluster.local\tweb-0\n",  # hostname + subdomain
    "127.0.0.1 localhost\n10.0.0.1 something\n",  # not the kubelet's
    MANAGED,
    "",
])
def test_hosts_files_that_do_not_name_the_pod(tmp_path: Path, hosts: str) -> None:
    assert kubelet_pod_name(UID, _kubelet(tmp_path, UID, hosts)) is None
    assert kubelet_pod_name("no-such-pod", tmp_path) is None


def test_operator_keys_and_the_merge() -> None:
    assert operator_keys({}) == frozenset()
    assert operator_keys({"OTEL_SERVICE_NAME": "edge"}) == {"service.name"}
    assert operator_keys({"OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=prod,service.name=x"}) == {
        "deployment.environment", "service.name"}
    base = {"service.name": "edge", "telemetry.sdk.language": "python", "deployment.environment": "prod"}
    own = {"service.name": "reviews", "telemetry.sdk.language": "cpp", "container.id": CID,
           "deployment.environment": "dev"}
    assert merged(base, own, {"service.name"}) == {
        "service.name": "edge", "telemetry.sdk.language": "python", "deployment.environment": "dev",
        "container.id": CID}
    assert merged(base, own, ()) == {**base, "service.name": "reviews", "deployment.environment": "dev",
                                     "container.id": CID}


def test_this_process_is_read_without_error() -> None:
    attrs = process_resource(os.getpid())
    assert attrs["process.pid"] == os.getpid() and attrs["process.executable.path"]

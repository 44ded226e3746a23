"""The resource attributes of one traced process, from ``/proc/<pid>/cgroup`` and ``/proc/<pid>/environ``.

What a process's spans say about where they come from (OpenTelemetry resource semantic conventions):

  process.pid, process.executable.name, process.executable.path: the process itself.
  container.id: the 64-hex id in its cgroup path: ``/docker/<id>``, ``docker-<id>.scope``,
    ``cri-containerd-<id>.scope``, ``crio-<id>.scope``, ``libpod-<id>.scope``, or a bare ``<id>`` segment
    (cgroupfs drivers: ``/kubepods/<qos>/pod<uid>/<id>``); the deepest one wins.
  k8s.pod.uid: ``kubepods...-pod<uid>.slice`` (systemd driver, ``_`` for ``-``) or ``/kubepods/.../pod<uid>/``
    in its cgroup path, else ``POD_UID``, ``K8S_POD_UID``, ``OTEL_RESOURCE_ATTRIBUTES_POD_UID``.
  k8s.pod.name: ``POD_NAME`` (Istio sets it), ``K8S_POD_NAME``, ``MY_POD_NAME``,
    ``OTEL_RESOURCE_ATTRIBUTES_POD_NAME`` (the downward API's usual names), else the pod's hostname in the
    kubelet's ``/var/lib/kubelet/pods/<uid>/etc-hosts`` when readable.
  k8s.namespace.name: ``POD_NAMESPACE`` (Istio), ``K8S_NAMESPACE``, ``K8S_POD_NAMESPACE``,
    ``K8S_NAMESPACE_NAME``, ``MY_POD_NAMESPACE``.
  service.name: ``OTEL_SERVICE_NAME``; else ``service.name`` in ``OTEL_RESOURCE_ATTRIBUTES``; else the pod's
    workload: ``ISTIO_META_WORKLOAD_NAME``, else the Deployment of a pod named like a ReplicaSet's
    (``<deployment>-<hash>-<5 chars>``), else the pod name; else none (the daemon's default, ``envoy``,
    stays).
  anything else: the pairs of the process's own ``OTEL_RESOURCE_ATTRIBUTES`` (not ``telemetry.*``: the spans
    are made by otel-envoy, not by the process's SDK).

Only the variables named here are read from the environment; no other value leaves the process. Facts of the
kernel (pid, executable, cgroup) win over what the environment declares, and what the process declares
(``OTEL_RESOURCE_ATTRIBUTES``) wins over what is guessed from the downward API's usual variable names.

The daemon's own ``OTEL_SERVICE_NAME`` and ``OTEL_RESOURCE_ATTRIBUTES`` (the operator's choice) override every
process's values for the keys they name: :func:`operator_keys`, :func:`merged`.

A process that vanishes while it is read gives what was read: nothing here raises for an unreadable /proc.
"""

from __future__ import annotations

import os
import re
from collections.abc import Collection, Mapping
from pathlib import Path
from urllib.parse import unquote

__all__ = ["KUBELET_PODS", "ResourceValue", "cgroup_attributes", "deployment_of", "environ_attributes",
           "kubelet_pod_name", "merged", "operator_keys", "parse_resource_attributes", "process_resource",
           "read_environ"]

ResourceValue = str | int
KUBELET_PODS = Path("/var/lib/kubelet/pods")
PROC = Path("/proc")

_ENVIRON_MAX = 1 << 20  # bytes of /proc/<pid>/environ read at most (the kernel caps it near ARG_MAX)
_PAIRS_MAX = 64  # OTEL_RESOURCE_ATTRIBUTES pairs taken at most
_KEY_MAX, _VALUE_MAX = 255, 4096

#: Variables read, by the attribute they give (first one set wins).
POD_NAME_VARS = ("POD_NAME", "K8S_POD_NAME", "MY_POD_NAME", "OTEL_RESOURCE_ATTRIBUTES_POD_NAME")
NAMESPACE_VARS = ("POD_NAMESPACE", "K8S_NAMESPACE", "K8S_POD_NAMESPACE", "K8S_NAMESPACE_NAME",
                  "MY_POD_NAMESPACE")
POD_UID_VARS = ("POD_UID", "K8S_POD_UID", "OTEL_RESOURCE_ATTRIBUTES_POD_UID")
WORKLOAD_VAR = "ISTIO_META_WORKLOAD_NAME"
_VARS = frozenset(("OTEL_SERVICE_NAME", "OTEL_RESOURCE_ATTRIBUTES", WORKLOAD_VAR, *POD_NAME_VARS,
                   *NAMESPACE_VARS, *POD_UID_VARS))

_CONTAINER_SEGMENT = re.compile(r"^(?:(?:docker|cri-containerd|crio|libpod)-)?([0-9a-f]{64})(?:\.scope)?$")
_UUID = r"[0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12}"
_POD_SEGMENT = re.compile(rf"^(?:kubepods(?:-[a-z]+)*-)?pod({_UUID})(?:\.slice)?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_UUID_ONLY = re.compile(rf"^{_UUID}$")
# Kubernetes names a ReplicaSet's pods <replicaset>-<5 chars> and a Deployment's ReplicaSets
# <deployment>-<pod-template-hash>, both from its "safe" alphabet (no vowels, no 0, 1, 3).
_SAFE = "bcdfghjklmnpqrstvwxz2456789"
_REPLICASET_POD = re.compile(rf"^(.+)-[{_SAFE}]{{6,10}}-[{_SAFE}]{{5}}$")


def _read_text(path: Path, limit: int = 65536) -> str:
    try:
        with open(path, "rb") as f:
            return f.read(limit).decode("utf-8", "replace")
    except OSError:
        return ""


def read_environ(pid: int, proc: Path = PROC) -> dict[str, str]:
    """The variables of ``/proc/<pid>/environ`` this module reads (no other); {} when unreadable."""
    try:
        with open(proc / str(pid) / "environ", "rb") as f:
            raw = f.read(_ENVIRON_MAX)
    except OSError:
        return {}
    out: dict[str, str] = {}
    for entry in raw.split(b"\0"):
        raw_name, sep, value = entry.partition(b"=")
        name = raw_name.decode("ascii", "replace")
        if sep and name in _VARS and name not in out:
            out[name] = value.decode("utf-8", "replace")
    return out


def cgroup_attributes(text: str) -> dict[str, str]:
    """``container.id`` and ``k8s.pod.uid`` from the text of ``/proc/<pid>/cgroup`` (v2 line first, then
    the v1 hierarchies in order; in each path the deepest container segment wins)."""
    paths = []
    for line in text.splitlines():
        hid, _, rest = line.partition(":")
        _controllers, _, path = rest.partition(":")
        if not path:
            continue
        if hid == "0":
            paths.insert(0, path)
        else:
            paths.append(path)
    out: dict[str, str] = {}
    for path in paths:
        segments = path.split("/")
        for segment in reversed(segments):
            found = _CONTAINER_SEGMENT.match(segment)
            if found and "container.id" not in out:
                out["container.id"] = found.group(1)
            pod = _POD_SEGMENT.match(segment)
            if pod and "k8s.pod.uid" not in out and any(s.startswith("kubepods") for s in segments):
                out["k8s.pod.uid"] = pod.group(1).replace("_", "-")
        if len(out) == 2:
            break
    return out


def parse_resource_attributes(value: str) -> dict[str, str]:
    """``key1=value1,key2=value2`` (values percent-encoded) as the SDKs read ``OTEL_RESOURCE_ATTRIBUTES``;
    malformed pairs are skipped, at most 64 kept."""
    out: dict[str, str] = {}
    for pair in value.split(","):
        key, sep, raw = pair.partition("=")
        key = key.strip()
        if not sep or not key or len(key) > _KEY_MAX or len(raw) > _VALUE_MAX * 3:
            continue
        out[key] = unquote(raw.strip())[:_VALUE_MAX]
        if len(out) >= _PAIRS_MAX:
            break
    return out


def _first(env: Mapping[str, str], names: tuple[str, ...], valid: re.Pattern[str]) -> str | None:
    for name in names:
        value = env.get(name, "").strip()
        if value and valid.match(value):
            return value
    return None


def deployment_of(pod_name: str) -> str | None:
    """The Deployment of a pod named like a ReplicaSet's pod (``<deployment>-<hash>-<5>``), else None."""
    found = _REPLICASET_POD.match(pod_name)
    return found.group(1) if found else None


def environ_attributes(env: Mapping[str, str]) -> dict[str, str]:
    """Resource attributes from the variables :func:`read_environ` keeps (see the module's table); the
    service name as the environment alone gives it (no pod name from the kubelet)."""
    out = {k: v for k, v in parse_resource_attributes(env.get("OTEL_RESOURCE_ATTRIBUTES", "")).items()
           if not k.startswith("telemetry.")}
    for key, names, valid in (("k8s.pod.name", POD_NAME_VARS, _DNS_SUBDOMAIN),
                              ("k8s.namespace.name", NAMESPACE_VARS, _DNS_LABEL),
                              ("k8s.pod.uid", POD_UID_VARS, _UUID_ONLY)):
        value = _first(env, names, valid)
        if value is not None and key not in out:
            out[key] = value
    service = env.get("OTEL_SERVICE_NAME", "").strip() or out.get("service.name") or _workload(env, out)
    if service:
        out["service.name"] = service
    return out


def _workload(env: Mapping[str, str], attrs: Mapping[str, str]) -> str | None:
    workload = env.get(WORKLOAD_VAR, "").strip()
    if workload and _DNS_SUBDOMAIN.match(workload):
        return workload
    pod = attrs.get("k8s.pod.name")
    return (deployment_of(pod) or pod) if pod else None


def kubelet_pod_name(pod_uid: str, pods: Path = KUBELET_PODS) -> str | None:
    """The pod's hostname in the hosts file the kubelet manages for it (its name, unless the pod sets
    ``hostname``/``subdomain``: then the line has more names and None is returned); None when unreadable."""
    lines = _read_text(pods / pod_uid / "etc-hosts").splitlines()
    if not lines or lines[0].strip() != "# Kubernetes-managed hosts file.":
        return None
    last = next((ln.split() for ln in reversed(lines) if ln.strip() and not ln.startswith("#")), [])
    if len(last) == 2 and _DNS_SUBDOMAIN.match(last[1]) and last[1] != "localhost":
        return last[1]
    return None


def process_resource(pid: int, comm: str = "", exe: str = "", *, proc: Path = PROC,
                     kubelet_pods: Path = KUBELET_PODS) -> dict[str, ResourceValue]:
    """The resource attributes of process ``pid`` (``comm``/``exe``: its name and executable, when known
    already). Never raises for a process that is gone: what could be read."""
    env = read_environ(pid, proc)
    attrs: dict[str, ResourceValue] = dict(environ_attributes(env))
    facts = cgroup_attributes(_read_text(proc / str(pid) / "cgroup"))
    attrs.update(facts)
    uid = facts.get("k8s.pod.uid") or attrs.get("k8s.pod.uid")
    if uid and "k8s.pod.name" not in attrs:
        name = kubelet_pod_name(str(uid), kubelet_pods)
        if name:
            attrs["k8s.pod.name"] = name
            if "service.name" not in attrs:
                attrs["service.name"] = deployment_of(name) or name
    attrs["process.pid"] = pid
    if not exe:
        try:
            exe = os.readlink(proc / str(pid) / "exe")
        except OSError:
            exe = ""
    comm = comm or _read_text(proc / str(pid) / "comm").strip()
    if comm:
        attrs["process.executable.name"] = comm
    if exe:
        attrs["process.executable.path"] = exe.removesuffix(" (deleted)")
    return attrs


def operator_keys(environ: Mapping[str, str] | None = None) -> frozenset[str]:
    """The resource keys the daemon's operator set (its own ``OTEL_SERVICE_NAME``, the keys of its
    ``OTEL_RESOURCE_ATTRIBUTES``): no process's value replaces them."""
    environ = os.environ if environ is None else environ
    keys = set(parse_resource_attributes(environ.get("OTEL_RESOURCE_ATTRIBUTES", "")))
    if environ.get("OTEL_SERVICE_NAME"):
        keys.add("service.name")
    return frozenset(keys)


def merged(base: Mapping[str, object], own: Mapping[str, object],
           fixed: Collection[str]) -> dict[str, object]:
    """A process's resource: the daemon's (``base``) with the process's own attributes over it, except the
    keys in ``fixed`` (:func:`operator_keys`) and ``telemetry.*`` (the daemon's)."""
    out = dict(base)
    for key, value in own.items():
        if key not in fixed and not key.startswith("telemetry."):
            out[key] = value
    return out

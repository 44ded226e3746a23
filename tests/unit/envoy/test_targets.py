"""TracedProcesses: each traced process's resource attributes, read when it becomes traced, kept until it
exits, shown by the status endpoint's view."""

from __future__ import annotations

import os

from otel_envoy.envoy.process import EnvoyProcess
from otel_envoy.envoy.targets import TracedProcesses


def test_resources_follow_the_processes_traced() -> None:
    forgotten: list[int] = []
    read: list[int] = []

    def resource_of(p: EnvoyProcess) -> dict[str, str | int]:
        read.append(p.pid)
        return {"process.pid": p.pid, "service.name": f"svc-{p.pid}"}

    traced = TracedProcesses([EnvoyProcess(11, "envoy", "/bin/envoy")], follow_comm="python3",
                             require_envoy=False, forget=lambda pid, _tids: forgotten.append(pid),
                             resource_of=resource_of)
    assert traced.resources == {11: {"process.pid": 11, "service.name": "svc-11"}}
    me = os.getpid()  # a live process: started() reads its comm and executable
    assert traced.started(me) is not None
    assert traced.resources[me]["service.name"] == f"svc-{me}"
    view = traced.view(lambda _pid, _tids: {})
    assert [p["resource"] for p in view["processes"]] == [traced.resources[11], traced.resources[me]]
    assert traced.exited(11) is not None
    assert 11 not in traced.resources and forgotten == [11] and read == [11, me]


def test_by_default_the_resource_is_read_from_proc() -> None:
    me = os.getpid()
    traced = TracedProcesses([EnvoyProcess(me, "python3", "/usr/bin/python3")], follow_comm=None,
                             require_envoy=False, forget=lambda _pid, _tids: None)
    assert traced.resources[me]["process.pid"] == me
    assert traced.resources[me]["process.executable.name"] == "python3"

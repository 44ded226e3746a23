"""The connection program loads in every build the daemon can ask for (root: the kernel's verifier runs).

``raw_syscalls:sys_exit`` is near the verifier's budget of 1M processed instructions, and the builds differ
(``HTTP_CAPTURE`` for --no-requests, ``OFFCPU`` for --no-offcpu): a change that fits one build can put
another over it (E2BIG at load), which the end-to-end tests, all run in the default build, would not see.
"""

from __future__ import annotations

import pytest

from otel_envoy.probes.loader import ConnectionProbes, ProbeConfig


@pytest.mark.parametrize("http_capture", [True, False], ids=["requests", "no-requests"])
@pytest.mark.parametrize("offcpu", [True, False], ids=["offcpu", "no-offcpu"])
def test_connection_program_loads(http_capture: bool, offcpu: bool) -> None:
    probes = ConnectionProbes(ProbeConfig(http_capture=http_capture, offcpu=offcpu))
    try:
        names = {name.decode() for name in probes.bpf.funcs}
        assert "raw_tracepoint__sys_exit" in names  # loaded (verified), not only compiled
        assert ("tracepoint__sched__sched_switch" in names) == offcpu
    finally:
        probes.close()

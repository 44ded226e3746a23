"""`otel-envoy doctor`'s checks (features.py): the target binary's facts, read by stacks/elf.py."""

from __future__ import annotations

import os
import subprocess
import sys

from otel_envoy.features import binary_checks, host_checks
from otel_envoy.stacks import read_build_id, read_debuglink, read_elf_facts


def test_binary_checks_report_the_targets_elf_facts() -> None:
    exe = os.path.realpath(f"/proc/{os.getpid()}/exe")
    checks = {c.name: c for c in binary_checks(os.getpid())}
    assert checks["target"].ok and checks["target"].detail == f"pid {os.getpid()}: {exe}"
    build_id = read_build_id(exe)
    assert checks["build-id"].ok == (build_id is not None)
    assert checks["build-id"].detail == (build_id or "no build-id note")
    facts = read_elf_facts(exe)
    if facts.symtab is not None:
        assert checks["symbols"].ok and checks["symbols"].detail == f"{facts.symtab.count} symbols in .symtab"
    else:
        dynamic = facts.dynsym.count if facts.dynsym else 0
        assert not checks["symbols"].ok and checks["symbols"].detail.startswith(f"stripped (only {dynamic} ")
    debuglink = read_debuglink(exe)
    assert ("debuglink" in checks) == (debuglink is not None)
    assert all(not c.required for name, c in checks.items() if name != "target")


def test_binary_checks_of_a_process_that_is_gone() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    [target] = binary_checks(proc.pid)
    assert target.name == "target" and not target.ok and target.detail.startswith(f"pid {proc.pid}: ")


def test_host_checks_name_root_and_bcc() -> None:
    names = [c.name for c in host_checks()]
    assert names[0] == "root" and "bcc" in names and "ringbuf" in names

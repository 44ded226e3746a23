"""Fixtures for end-to-end tests: a real Envoy, a real OTLP receiver, the real daemon (root only)."""

from __future__ import annotations

import os
import time

import pytest

from otel_envoy.lab.lab import EnvoyLab
from tests.support.daemon import DaemonProcess, running_daemons
from tests.support.otlp_receiver import OtlpReceiver

pytestmark = pytest.mark.root


def pytest_collection_modifyitems(items):
    for item in items:
        if "tests/e2e" in str(item.fspath) and os.geteuid() != 0:
            item.add_marker(pytest.mark.skip(reason="needs root to load BPF programs"))


@pytest.fixture(autouse=True)
def _stop_daemons_a_test_left():
    """A test that fails between starting a daemon and stopping it would leave the daemon attached, its
    programs running on every syscall of the machine for the tests (and benchmarks) after it: stop it when
    the test ends. Daemons of module fixtures, started before the test, are left to their fixture."""
    before = running_daemons()
    yield
    for daemon in running_daemons() - before:
        daemon.stop()


@pytest.fixture(scope="module")
def lab():
    with EnvoyLab(concurrency=2) as lab:
        yield lab


@pytest.fixture(scope="module")
def receiver():
    with OtlpReceiver() as rx:
        yield rx


@pytest.fixture(scope="module")
def traced(lab, receiver, tmp_path_factory):
    """The daemon attached to the lab's Envoy, exporting over OTLP/gRPC and to a JSON lines file."""
    workdir = tmp_path_factory.mktemp("daemon")
    output = workdir / "traces.jsonl"
    daemon = DaemonProcess(
        ["--pid", str(lab.pid), "--envoy-admin", lab.admin_url, "--otlp-endpoint", receiver.grpc_endpoint,
         "--otlp-protocol", "grpc", "--output", str(output)], workdir,
        env={"OTEL_SERVICE_NAME": "envoy-under-test"},
    ).start()
    time.sleep(0.2)
    yield daemon, output
    daemon.stop()

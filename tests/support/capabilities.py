"""The daemon run with only the capabilities the DaemonSet gives it (deploy/kubernetes/daemonset.yaml)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

__all__ = ["CAP_SYS_ADMIN", "daemonset_capabilities"]

ROOT = Path(__file__).resolve().parents[2]
CAP_SYS_ADMIN = 21


def daemonset_capabilities(cmd: list[str]) -> list[str]:
    """``cmd`` with only the capabilities deploy/kubernetes/daemonset.yaml gives the daemon (no
    CAP_SYS_ADMIN: it cannot enter another network namespace, and reads /proc/<pid>/net/tcp instead)."""
    spec = yaml.safe_load_all((ROOT / "deploy" / "kubernetes" / "daemonset.yaml").read_text())
    daemonset = next(d for d in spec if d and d.get("kind") == "DaemonSet")
    (container,) = daemonset["spec"]["template"]["spec"]["containers"]
    keep = {f"cap_{c.lower()}" for c in container["securityContext"]["capabilities"]["add"]}
    printed = subprocess.run(["capsh", "--print"], capture_output=True, text=True, check=True).stdout
    bounding = next(line for line in printed.splitlines() if line.startswith("Bounding set =")).split("=")[1]
    drop = sorted(set(bounding.strip().split(",")) - keep)
    return ["capsh", f"--drop={','.join(drop)}", "--", "-c", 'exec "$@"', "capsh", *cmd]

"""An Envoy in network, PID and mount namespaces of its own (``EnvoyLab(netns=True)``), as a container
runtime would start it, and how the lab reaches into them.

``unshare --net --pid --fork --mount-proc`` forks: the process that becomes Envoy is its child (pid 1 of
the new PID namespace, with a host pid of its own: the one the kernel reports to BPF programs). A shell
brings the namespace's loopback up (and adds the lab's addresses to it) before it execs Envoy. Nothing of
the host's network is reachable from inside, nor the inside from the host: clients and the admin API go
through the namespace (``nsenter --net=/proc/<pid>/ns/net``, or a socket opened in it).
"""

from __future__ import annotations

import http.client
import os
import shlex
import shutil
import socket
import time
from collections.abc import Callable, Iterable, Sequence

from otel_envoy.envoy.netns import socket_in_netns

__all__ = ["NETNS_TOOLS", "forked_child", "http_get_in_netns", "nsenter_command", "require_tools",
           "unshare_command"]

#: What an Envoy in namespaces of its own needs on the host: util-linux's unshare and nsenter, iproute2's ip.
NETNS_TOOLS = ("unshare", "nsenter", "ip")


def require_tools(tools: Iterable[str] = NETNS_TOOLS) -> None:
    """Raise RuntimeError naming the tools that are not on PATH."""
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        raise RuntimeError(f"an Envoy in its own namespaces needs {', '.join(missing)} "
                           "(apt-get install util-linux iproute2)")


def unshare_command(cmd: Sequence[str], lo_addresses: Iterable[str] = ()) -> list[str]:
    """``cmd`` in new network, PID and mount namespaces: loopback up, ``lo_addresses`` (CIDR, e.g.
    ``10.199.0.1/24``: on loopback the whole prefix is local) added to it, then ``cmd`` exec'd. The child
    gets SIGKILL if unshare itself dies (``--kill-child``)."""
    setup = ["ip link set lo up", *(f"ip addr add {shlex.quote(a)} dev lo" for a in lo_addresses)]
    return ["unshare", "--net", "--pid", "--fork", "--mount-proc", "--kill-child",
            "sh", "-c", " && ".join(setup) + ' && exec "$@"', "sh", *cmd]


def nsenter_command(pid: int, cmd: Sequence[str]) -> list[str]:
    """``cmd`` run in the network namespace of ``pid`` (nsenter execs it: the pid stays the command's)."""
    return ["nsenter", f"--net=/proc/{pid}/ns/net", "--", *cmd]


def _parent_and_comm(pid: str) -> tuple[int, str]:
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    comm = stat[stat.index("(") + 1 : stat.rindex(")")]
    return int(stat[stat.rindex(")") + 2 :].split()[1]), comm


def forked_child(parent: int, comm: str, timeout: float, alive: Callable[[], bool]) -> int:
    """The host pid of ``parent``'s child once it runs as ``comm`` (unshare's child, after its exec).
    Raises RuntimeError after ``timeout`` or when ``alive()`` turns false."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and alive():
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                ppid, name = _parent_and_comm(entry)
            except (OSError, ValueError, IndexError):
                continue
            if ppid == parent and name == comm:
                return int(entry)
        time.sleep(0.02)
    raise RuntimeError(f"no child of pid {parent} named {comm!r} within {timeout} s")


def http_get_in_netns(pid: int, host: str, port: int, path: str, timeout: float) -> str:
    """GET ``path`` from ``host:port`` as seen from the network namespace of ``pid``; the body. Raises
    OSError on a refused connection or a non-2xx answer."""
    sock = socket_in_netns(pid, socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect((host, port))
    except BaseException:
        sock.close()
        raise
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    conn.sock = sock
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        body = resp.read().decode("utf-8", "replace")
    except http.client.HTTPException as exc:
        raise OSError(f"GET {path}: {exc!r}") from exc
    finally:
        conn.close()
    if not 200 <= resp.status < 300:
        raise OSError(f"GET {path}: HTTP {resp.status}")
    return body

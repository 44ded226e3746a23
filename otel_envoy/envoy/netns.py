"""Sockets opened in the network namespace of another process (an Envoy started with ``unshare --net``, a
pod's sidecar): ``setns`` on a short-lived thread of its own, so no other thread of the caller ever changes
namespace. A socket keeps the namespace it was created in, whichever thread uses it later.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import threading

__all__ = ["same_netns", "socket_in_netns"]

CLONE_NEWNET = 0x40000000


def _netns_path(pid: int) -> str:
    return f"/proc/{pid}/ns/net"


def _gone(pid: int, exc: OSError) -> ProcessLookupError:
    """The process (and with it the namespace it was in) is gone: /proc/<pid> no longer exists, or the
    process is a zombie whose namespaces were already released (the link then names nothing)."""
    return ProcessLookupError(errno.ESRCH, f"process {pid} is gone ({exc.strerror})")


def same_netns(pid: int) -> bool:
    """Whether ``pid`` is in the caller's network namespace. Raises ProcessLookupError when it is gone,
    OSError when its namespace cannot be looked at (permissions)."""
    try:
        theirs = os.stat(_netns_path(pid)).st_ino
    except (FileNotFoundError, ProcessLookupError) as exc:
        raise _gone(pid, exc) from exc
    return theirs == os.stat("/proc/self/ns/net").st_ino


def socket_in_netns(pid: int, family: int, kind: int, proto: int = 0) -> socket.socket:
    """A socket created in the network namespace of ``pid`` (a plain one when that is the caller's).

    Raises ProcessLookupError when ``pid`` is gone (also when it exits while the namespace is entered),
    OSError when the namespace cannot be entered (no CAP_SYS_ADMIN, ptrace access denied)."""
    if same_netns(pid):
        return socket.socket(family, kind, proto)
    result: list[socket.socket | BaseException] = []

    def enter_and_open() -> None:  # a thread of its own: setns changes only the calling thread
        try:
            try:
                fd = os.open(_netns_path(pid), os.O_RDONLY)
            except (FileNotFoundError, ProcessLookupError) as exc:
                raise _gone(pid, exc) from exc
            try:
                if ctypes.CDLL(None, use_errno=True).setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns into the network namespace of {pid}: {os.strerror(err)}")
            finally:
                os.close(fd)
            result.append(socket.socket(family, kind, proto))
        except BaseException as exc:  # reported to the caller
            result.append(exc)

    thread = threading.Thread(target=enter_and_open, name="otel-envoy-netns", daemon=True)
    thread.start()
    thread.join()
    if isinstance(result[0], BaseException):
        raise result[0]
    return result[0]

"""sock_diag: the LISTEN sockets of a process's network namespace, with their inodes."""

from __future__ import annotations

import os
import socket

from otel_envoy.envoy.sockdiag import listening_tcp_sockets
from tests.support.sockets import listening_socket


def test_sock_diag_lists_our_listeners_with_their_inodes() -> None:
    with listening_socket() as v4, listening_socket(socket.AF_INET6, "::1") as v6, socket.socket() as unbound:
        found = set(listening_tcp_sockets(os.getpid()))
        assert ("127.0.0.1", v4.getsockname()[1], os.fstat(v4.fileno()).st_ino) in found
        assert ("::1", v6.getsockname()[1], os.fstat(v6.fileno()).st_ino) in found
        assert os.fstat(unbound.fileno()).st_ino not in {inode for _a, _p, inode in found}

"""Small socket helpers for tests."""

from __future__ import annotations

import socket

__all__ = ["listening_socket"]


def listening_socket(family: int = socket.AF_INET, host: str = "127.0.0.1") -> socket.socket:
    """A TCP socket listening on an ephemeral port of ``host``."""
    s = socket.socket(family)
    s.bind((host, 0))
    s.listen()
    return s

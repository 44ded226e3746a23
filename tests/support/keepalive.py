"""GET requests one after another on one HTTP/1.1 connection (plain or TLS), as keep-alive clients do."""

from __future__ import annotations

import http.client

__all__ = ["get_all", "keep_alive"]


def get_all(conn: http.client.HTTPConnection, paths: list[str]) -> list[int]:
    """GET each path on ``conn`` in turn, reading each response whole; their statuses. Closes ``conn``."""
    statuses = []
    try:
        for path in paths:
            conn.request("GET", path)
            resp = conn.getresponse()
            resp.read()
            statuses.append(resp.status)
    finally:
        conn.close()
    return statuses


def keep_alive(port: int, requests: list[tuple[str, str, dict[str, str]]]) -> tuple[int, list[int]]:
    """Send (method, path, headers) requests in turn over one connection to 127.0.0.1:``port``; returns
    (the client's port, statuses). The client closes first."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    statuses = []
    try:
        for method, path, headers in requests:
            conn.request(method, path, headers=headers)
            resp = conn.getresponse()
            resp.read()
            statuses.append(resp.status)
        local_port = conn.sock.getsockname()[1]
    finally:
        conn.close()
    return local_port, statuses

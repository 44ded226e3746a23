"""GET requests one after another on one HTTP/1.1 connection (plain or TLS), as keep-alive clients do."""

from __future__ import annotations

import http.client

__all__ = ["get_all"]


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

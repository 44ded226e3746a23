"""Envoy admin API client (aiohttp): listener names by local address."""

from __future__ import annotations

import socket
from collections.abc import Callable
from urllib.parse import urlsplit

import aiohttp

__all__ = ["AdminError", "fetch_listener_names"]


class AdminError(RuntimeError):
    """The admin API could not be read (message is one line)."""


async def fetch_listener_names(admin_url: str, timeout: float = 2.0,
                               own_connection: Callable[[str, int], None] | None = None,
                               ) -> dict[tuple[str, int], str]:
    """(address, port) -> listener name from ``GET /listeners?format=json``.

    ``own_connection(address, port)`` is told, before connecting, the local address and port the request
    will come from (so that a traced Envoy's connection from the daemon itself can be left out).
    """
    url = admin_url.rstrip("/") + "/listeners?format=json"
    try:
        local_addr = _local_address_for(url) if own_connection is not None else None
        if local_addr is not None and own_connection is not None:
            own_connection(*local_addr)
        connector = aiohttp.TCPConnector(local_addr=local_addr, force_close=True)
        limit = aiohttp.ClientTimeout(total=timeout)
        async with (
            aiohttp.ClientSession(connector=connector, timeout=limit) as session,
            session.get(url) as resp,
        ):
            if resp.status != 200:
                raise AdminError(f"Envoy admin {url} answered HTTP {resp.status}")
            body = await resp.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError, ValueError, OSError) as exc:
        raise AdminError(f"Envoy admin {admin_url} is unreachable: {exc or type(exc).__name__}") from exc
    return parse_listeners(body)


def _local_address_for(url: str) -> tuple[str, int] | None:
    """A local (address, port) to connect to ``url`` from: the address the kernel's routing would choose,
    and a port free now. ``None`` for a host that does not resolve (the request then fails on its own)."""
    parts = urlsplit(url)
    try:
        family, _, _, _, sockaddr = socket.getaddrinfo(parts.hostname or "localhost", parts.port or 80,
                                                       type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError):
        return None
    with socket.socket(family, socket.SOCK_DGRAM) as probe:  # no packet: only the route is looked up
        probe.connect(sockaddr)
        address = probe.getsockname()[0]
    with socket.socket(family, socket.SOCK_STREAM) as reserve:
        reserve.bind((address, 0))
        return address, reserve.getsockname()[1]


def parse_listeners(body: dict) -> dict[tuple[str, int], str]:
    """Parse the JSON of /listeners?format=json (local_address plus additional_local_addresses)."""
    out: dict[tuple[str, int], str] = {}
    for status in body.get("listener_statuses", []):
        name = status.get("name")
        addrs = [status.get("local_address", {})]
        addrs += [a.get("address", {}) for a in status.get("additional_local_addresses", [])]
        for addr in addrs:
            sa = addr.get("socket_address") or {}
            if name and "port_value" in sa:
                out[(sa.get("address", "0.0.0.0"), int(sa["port_value"]))] = name
    return out

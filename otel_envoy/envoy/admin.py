"""Envoy admin API client (aiohttp): listener names by local address, and what selects each listener's
filter chains (its configuration dump)."""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from .filter_chains import listener_selection_json

__all__ = ["AdminError", "fetch_listener_config", "fetch_listener_names"]

OwnConnection = Callable[[str, int], None]


class AdminError(RuntimeError):
    """The admin API could not be read (message is one line)."""


async def fetch_listener_names(admin_url: str, timeout: float = 2.0,
                               own_connection: OwnConnection | None = None,
                               ) -> dict[tuple[str, int], str]:
    """(address, port) -> listener name from ``GET /listeners?format=json``.

    ``own_connection(address, port)`` is told, before connecting, the local address and port the request
    will come from (so that a traced Envoy's connection from the daemon itself can be left out).
    """
    return parse_listeners(await _get_json(admin_url, "/listeners?format=json", timeout, own_connection))


async def fetch_listener_config(admin_url: str, timeout: float = 2.0,
                                own_connection: OwnConnection | None = None) -> list[dict]:
    """Each active listener, reduced to what selects its filter chains (see
    :func:`.filter_chains.listener_selection_json`), from ``/config_dump`` (static and dynamic listeners)."""
    configs: list = []
    for resource in ("static_listeners", "dynamic_listeners"):
        body = await _get_json(admin_url, f"/config_dump?resource={resource}", timeout, own_connection)
        if isinstance(body, dict):
            configs.extend(body.get("configs", []))
    return listener_selection_json({"configs": configs})


async def _get_json(admin_url: str, path: str, timeout: float, own_connection: OwnConnection | None) -> Any:
    url = admin_url.rstrip("/") + path
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
            return await resp.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError, ValueError, OSError) as exc:
        raise AdminError(f"Envoy admin {admin_url} is unreachable: {exc or type(exc).__name__}") from exc


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

"""Envoy admin API client (aiohttp): listener names by local address."""

from __future__ import annotations

import aiohttp

__all__ = ["AdminError", "fetch_listener_names"]


class AdminError(RuntimeError):
    """The admin API could not be read (message is one line)."""


async def fetch_listener_names(admin_url: str, timeout: float = 2.0) -> dict[tuple[str, int], str]:
    """(address, port) -> listener name from ``GET /listeners?format=json``."""
    url = admin_url.rstrip("/") + "/listeners?format=json"
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session,
            session.get(url) as resp,
        ):
            if resp.status != 200:
                raise AdminError(f"Envoy admin {url} answered HTTP {resp.status}")
            body = await resp.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        raise AdminError(f"Envoy admin {admin_url} is unreachable: {exc or type(exc).__name__}") from exc
    return parse_listeners(body)


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

"""Address formatting for kernel address bytes (cached: the same peers recur)."""

from __future__ import annotations

import ipaddress
import socket
from functools import lru_cache

__all__ = ["format_ip", "network_type"]


@lru_cache(maxsize=4096)
def format_ip(family: int, raw: bytes) -> str:
    """Text form of a 4- or 16-byte address; IPv4-mapped IPv6 is shown as IPv4."""
    if family == socket.AF_INET:
        return socket.inet_ntop(socket.AF_INET, raw[:4])
    if family == socket.AF_INET6:
        addr = ipaddress.IPv6Address(raw[:16])
        return str(addr.ipv4_mapped) if addr.ipv4_mapped else str(addr)
    return ""


def network_type(address: str) -> str:
    """'ipv4' or 'ipv6' for an address formatted by :func:`format_ip`."""
    return "ipv6" if ":" in address else "ipv4"

"""What a connection showed, as the values Envoy's filter-chain selection reads (filter_chains.py): the
facts the kernel events gave, turned into destination and source addresses, server name, transport and
application protocols according to the listener filters the listener runs; a value that decides the choice
and was not seen raises FactUnknown instead of being guessed."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

__all__ = ["HTTP_INSPECTOR", "ORIGINAL_DST", "PROXY_PROTOCOL", "TLS_INSPECTOR", "ConnectionFacts",
           "FactUnknown", "IpNetwork", "MatchValues", "ip_of", "listener_filter_name", "networks_of"]

TLS_INSPECTOR = "envoy.filters.listener.tls_inspector"
HTTP_INSPECTOR = "envoy.filters.listener.http_inspector"
ORIGINAL_DST = "envoy.filters.listener.original_dst"
PROXY_PROTOCOL = "envoy.filters.listener.proxy_protocol"
_LISTENER_FILTER_TYPES = {  # typed_config type -> filter name (a filter may be named anything)
    "envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector": TLS_INSPECTOR,
    "envoy.extensions.filters.listener.http_inspector.v3.HttpInspector": HTTP_INSPECTOR,
    "envoy.extensions.filters.listener.original_dst.v3.OriginalDst": ORIGINAL_DST,
    "envoy.extensions.filters.listener.proxy_protocol.v3.ProxyProtocol": PROXY_PROTOCOL,
}

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class ConnectionFacts(NamedTuple):
    """What a connection showed, as Envoy's filter-chain match sees it. ``None``: not seen. A named tuple: one
    per connection, made in a third of a frozen dataclass's time."""

    destination_address: str | None
    destination_port: int
    source_address: str
    source_port: int
    tls: bool | None  # its first bytes were a TLS ClientHello; None: no bytes seen
    server_name: str | None = None  # SNI of its ClientHello ("" none)
    alpn: tuple[str, ...] | None = None  # protocols its ClientHello offered, in the client's order
    plaintext_alpn: str | None = None  # what http_inspector would say of its plaintext bytes ("" nothing)


class FactUnknown(Exception):
    """A fact the choice depends on was not seen."""


# ------------------------------------------------------------------------------------------ the facts


@dataclass(frozen=True, slots=True)
class MatchValues:
    """The values Envoy matches on for one connection on one listener (each getter raises FactUnknown)."""

    facts: ConnectionFacts
    filters: frozenset[str]

    def destination_ip(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
        if ORIGINAL_DST in self.filters:
            raise FactUnknown("the original destination (original_dst listener filter) is not seen")
        if PROXY_PROTOCOL in self.filters:
            raise FactUnknown("the destination address given by the PROXY protocol is not seen")
        if not self.facts.destination_address:
            raise FactUnknown("the connection's local address was not seen")
        return ip_of(self.facts.destination_address)

    def destination_port(self) -> int:
        if ORIGINAL_DST in self.filters:
            raise FactUnknown("the original destination (original_dst listener filter) is not seen")
        if PROXY_PROTOCOL in self.filters:
            raise FactUnknown("the destination port given by the PROXY protocol is not seen")
        return self.facts.destination_port

    def server_name(self) -> str:
        if TLS_INSPECTOR not in self.filters:
            return ""
        if self.facts.tls is None:
            raise FactUnknown("the connection's first bytes were not seen")
        if not self.facts.tls:
            return ""
        if self.facts.server_name is None:
            raise FactUnknown("the TLS ClientHello was not captured")
        return self.facts.server_name.lower()

    def transport_protocol(self) -> str:
        if TLS_INSPECTOR not in self.filters:
            return "raw_buffer"  # Envoy's default when no listener filter detected one
        if self.facts.tls is None:
            raise FactUnknown("the connection's first bytes were not seen")
        return "tls" if self.facts.tls else "raw_buffer"

    def application_protocols(self) -> tuple[str, ...]:
        facts = self.facts
        if TLS_INSPECTOR in self.filters and facts.tls:
            if facts.alpn is None:
                raise FactUnknown("the TLS ClientHello was not captured")
            return facts.alpn
        if HTTP_INSPECTOR in self.filters and not facts.tls:
            if facts.tls is None or facts.plaintext_alpn is None:
                raise FactUnknown("the connection's first bytes were not seen")
            return (facts.plaintext_alpn,) if facts.plaintext_alpn else ()
        if TLS_INSPECTOR in self.filters and facts.tls is None:
            raise FactUnknown("the connection's first bytes were not seen")
        return ()

    def direct_source_ip(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
        return ip_of(self.facts.source_address)

    def source_ip(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
        if PROXY_PROTOCOL in self.filters:
            raise FactUnknown("the source address given by the PROXY protocol is not seen")
        return ip_of(self.facts.source_address)

    def source_port(self) -> int:
        if PROXY_PROTOCOL in self.filters:
            raise FactUnknown("the source port given by the PROXY protocol is not seen")
        return self.facts.source_port

    def is_local(self) -> bool:
        """Envoy's source type LOCAL: the source is a loopback address or the destination's own."""
        src = self.source_ip()
        if src.is_loopback:
            return True
        return self.facts.destination_address is not None and src == self.destination_ip()


def ip_of(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        addr = ipaddress.ip_address(text)
    except ValueError as exc:
        raise FactUnknown(f"address {text!r} is not an IP address") from exc
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def networks_of(ranges: Iterable[Any]) -> tuple[IpNetwork, ...]:
    """CidrRange messages -> networks (host bits cleared, as Envoy does)."""
    out = []
    for r in ranges:
        addr = ipaddress.ip_address(r.address_prefix)
        length = r.prefix_len if r.prefix_len is not None else addr.max_prefixlen
        out.append(ipaddress.ip_network((addr, length), strict=False))
    return tuple(out)


def listener_filter_name(f: Mapping[str, Any]) -> str:
    """A listener filter's well-known name, from its type when it has one (it may be named anything)."""
    type_url = str(f.get("type", ""))
    return _LISTENER_FILTER_TYPES.get(type_url.rsplit("/", 1)[-1], str(f.get("name", "")))

"""Which filter chain Envoy handed a downstream connection to, decided from the listener configuration Envoy
reports (``/config_dump``) and what the connection showed.

Envoy picks a listener's filter chain once its listener filters are done, from the connection's destination
address and port, the TLS server name (SNI), the transport protocol and the application protocols (ALPN)
that listener filters detected, and its source address, type and port. Two ways to configure it:

* ``filter_chain_match`` on each chain (the classic way). Envoy narrows the chains level by level in a fixed
  order: destination port, destination IP (longest prefix), server name (exact, then the longest wildcard
  suffix: ``*.example.com`` also matches ``a.b.example.com``), transport protocol, application protocols (the
  client's first offered protocol that some chain lists), directly connected source IP, source type (local:
  loopback or same IP as the destination), source IP (longest prefix), source port. At each level the chains
  that name the connection's value win; only when none does, the chains that leave the field unset go on.
  There is no backtracking: a level that leaves no chain means no match.
* ``filter_chain_matcher``: a matcher tree (xDS ``Matcher``) over the same inputs whose actions name chains.
  Supported: exact and prefix match maps, matcher lists with string matchers (exact, prefix, suffix,
  contains, regex) and and/or/not predicates; not (yet) the IP range and server-name custom matchers, whose
  types the library lacks: such a listener's connections say so.

No match: the listener's ``default_filter_chain``, else Envoy closes the connection.

The values Envoy matches on depend on the listener filters: without ``tls_inspector`` a connection has no
server name, the transport protocol ``raw_buffer`` and no application protocols (``http_inspector`` gives
plaintext HTTP ``http/1.0``, ``http/1.1`` or ``h2c``); ``original_dst`` and ``proxy_protocol`` change the
addresses to ones the kernel events do not show. When a fact that decides the choice is unknown the answer
says so (:class:`ChainChoice` with ``inferred=False`` and the reason) instead of guessing.

The configuration's types come from ``envoy-data-plane`` (the Envoy API as Python dataclasses); only the
parts that select chains are read, so extension types the library does not know elsewhere do not matter.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .chain_facts import (
    ConnectionFacts,
    FactUnknown,
    IpNetwork,
    MatchValues,
    listener_filter_name,
    networks_of,
)
from .chain_matcher import Node, compile_matcher

__all__ = [
    "ChainChoice",
    "ConnectionFacts",
    "FilterChainIndex",
    "ListenerChains",
    "listener_selection_json",
    "load_types",
]

_CACHE_ENTRIES = 4096  # remembered choices per listener (cleared whole when full)


@dataclass(frozen=True, slots=True)
class ChainChoice:
    """The filter chain chosen: ``name`` ("" for a chain without one) when ``inferred``, else ``reason``
    says why it could not be decided. ``default``: the listener's default chain (nothing matched)."""

    name: str | None
    inferred: bool
    reason: str = ""
    default: bool = False



# ---------------------------------------------------------------------- classic filter_chain_match


@dataclass(frozen=True, slots=True)
class _Chain:
    """One chain's filter_chain_match, in plain values (empty: the field is unset)."""

    name: str
    destination_port: int  # 0: any
    prefix_ranges: tuple[IpNetwork, ...]
    server_names: tuple[str, ...]  # lower case; "*.x.com" kept as ".x.com" (Envoy's wildcard key)
    transport_protocol: str
    application_protocols: tuple[str, ...]
    direct_source_prefix_ranges: tuple[IpNetwork, ...]
    source_type: int  # 0 any, 1 local (SAME_IP_OR_LOOPBACK), 2 external
    source_prefix_ranges: tuple[IpNetwork, ...]
    source_ports: tuple[int, ...]

    @classmethod
    def from_proto(cls, chain: Any) -> _Chain:
        m = chain.filter_chain_match
        if m is None:
            return cls(chain.name or "", 0, (), (), "", (), (), 0, (), ())
        names = tuple(n.lower()[1:] if n.startswith("*.") else n.lower() for n in m.server_names)
        return cls(chain.name or "", m.destination_port or 0, networks_of(m.prefix_ranges), names,
                   m.transport_protocol or "", tuple(m.application_protocols),
                   networks_of(m.direct_source_prefix_ranges), int(m.source_type),
                   networks_of(m.source_prefix_ranges), tuple(m.source_ports))


def _narrow_exact(chains: list[_Chain], keys: Callable[[_Chain], Sequence[Any]],
                  wanted: Callable[[], Sequence[Any]]) -> list[_Chain]:
    """The chains listing the first of ``wanted()`` values some chain lists, else those listing none."""
    if any(keys(c) for c in chains):  # the level decides: its value is needed
        for value in wanted():
            hit = [c for c in chains if value in keys(c)]
            if hit:
                return hit
    return [c for c in chains if not keys(c)]


def _narrow_prefix(chains: list[_Chain], ranges: Callable[[_Chain], tuple[IpNetwork, ...]],
                   address: Callable[[], ipaddress.IPv4Address | ipaddress.IPv6Address]) -> list[_Chain]:
    """The chains whose ranges hold the longest prefix containing the address (no ranges: any address)."""
    if not any(ranges(c) for c in chains):
        return chains
    addr = address()
    best, hit = -1, []
    for c in chains:
        own = [n.prefixlen for n in ranges(c) if n.version == addr.version and addr in n]
        length = max(own) if own else (0 if not ranges(c) else -1)
        if length > best:
            best, hit = length, [c]
        elif length == best and length >= 0:
            hit.append(c)
    return hit if best >= 0 else []


def _server_name_keys(sni: str) -> list[str]:
    """Lookup keys in Envoy's order: the exact name, then ".b.c", ".c" suffixes, longest first."""
    keys = [sni] if sni else []
    pos = sni.find(".", 1)
    while 0 <= pos < len(sni) - 1:
        keys.append(sni[pos:])
        pos = sni.find(".", pos + 1)
    return keys


def _source_type(chains: list[_Chain], values: MatchValues) -> list[_Chain]:
    local = [c for c in chains if c.source_type == 1]
    external = [c for c in chains if c.source_type == 2]
    if local or external:
        chosen = local if values.is_local() else external
        if chosen:
            return chosen
    return [c for c in chains if c.source_type == 0]


def _classic_choice(chains: list[_Chain], values: MatchValues) -> _Chain | None:
    steps: list[Callable[[list[_Chain]], list[_Chain]]] = [
        lambda cs: _narrow_exact(cs, lambda c: (c.destination_port,) if c.destination_port else (),
                                 lambda: (values.destination_port(),)),
        lambda cs: _narrow_prefix(cs, lambda c: c.prefix_ranges, values.destination_ip),
        lambda cs: _narrow_exact(cs, lambda c: c.server_names,
                                 lambda: _server_name_keys(values.server_name())),
        lambda cs: _narrow_exact(cs, lambda c: (c.transport_protocol,) if c.transport_protocol else (),
                                 lambda: (values.transport_protocol(),)),
        lambda cs: _narrow_exact(cs, lambda c: c.application_protocols, values.application_protocols),
        lambda cs: _narrow_prefix(cs, lambda c: c.direct_source_prefix_ranges, values.direct_source_ip),
        lambda cs: _source_type(cs, values),
        lambda cs: _narrow_prefix(cs, lambda c: c.source_prefix_ranges, values.source_ip),
        lambda cs: _narrow_exact(cs, lambda c: c.source_ports, lambda: (values.source_port(),)),
    ]
    for step in steps:
        chains = step(chains)
        if not chains:
            return None
    return chains[0]


# -------------------------------------------------------------------------------------------- listeners


@functools.cache
def load_types() -> type:
    """The Listener type of envoy-data-plane, its modules imported (0.4 s the first time: only when used)
    and its parser warmed (the first parse sets up ~0.1 s of validators). The matcher's inputs and actions
    are Any fields: importing their modules registers their types."""
    import envoy_data_plane.envoy.extensions.matching.common_inputs.network.v3
    import envoy_data_plane.google.protobuf
    import envoy_data_plane.xds.type.matcher.v3  # noqa: F401
    from envoy_data_plane.envoy.config.listener.v3 import Listener

    Listener.from_dict({"name": "warm-up", "filter_chains": [{"name": "c", "filter_chain_match": {}}],
                        "default_filter_chain": {"name": "d"}})
    return Listener


@dataclass(slots=True)
class ListenerChains:
    """One listener's chain selection: its filter chains, default chain and listener filters."""

    name: str
    addresses: tuple[tuple[str, int], ...]
    filters: frozenset[str]
    chains: list[_Chain] = field(default_factory=list)
    default_chain: str | None = None  # None: no default chain
    matcher: Node | None = None  # filter_chain_matcher, when set
    problem: str = ""  # why this listener's choices cannot be inferred (an unsupported configuration)
    _cache: dict[tuple, ChainChoice] = field(default_factory=dict, repr=False)
    _levels_used: tuple[bool, bool, bool] | None = field(default=None, repr=False)

    @property
    def chain_names(self) -> set[str]:
        """The names of its filter chains (a matcher's actions name them)."""
        return {c.name for c in self.chains}

    @classmethod
    def from_json(cls, listener: Mapping[str, Any]) -> ListenerChains:
        """From a listener as :func:`listener_selection_json` keeps it."""
        Listener = load_types()
        name = str(listener.get("name", ""))
        filters = frozenset(listener_filter_name(f) for f in listener.get("listener_filters", []))
        addresses = tuple(_addresses(listener))
        try:
            proto = Listener.from_dict({k: v for k, v in listener.items() if k != "listener_filters"})
            out = cls(name, addresses, filters)
            out.chains = [_Chain.from_proto(c) for c in proto.filter_chains]
            if proto.default_filter_chain is not None:
                out.default_chain = proto.default_filter_chain.name or ""
            if proto.filter_chain_matcher is not None:
                out.matcher = compile_matcher(proto.filter_chain_matcher)
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            return cls(name, addresses, filters, problem=f"listener configuration not understood: {exc}")
        return out

    def choose(self, facts: ConnectionFacts) -> ChainChoice:
        """The chain Envoy chose for a connection that showed ``facts``. Classic matches are remembered by
        the facts their levels read (bounded), so connections alike cost one lookup."""
        if self.problem:
            return ChainChoice(None, False, self.problem)
        if self.matcher is not None:
            return self._choose(facts)
        key = self._key(facts)
        choice = self._cache.get(key)
        if choice is None:
            choice = self._choose(facts)
            if len(self._cache) >= _CACHE_ENTRIES:
                self._cache.clear()
            self._cache[key] = choice
        return choice

    def _key(self, facts: ConnectionFacts) -> tuple:
        """The facts the classic levels of this listener's chains can read (the rest cannot matter)."""
        used = self._levels_used
        if used is None:
            chains = self.chains
            used = self._levels_used = (
                any(c.prefix_ranges for c in chains), any(c.direct_source_prefix_ranges or c.source_type
                                                          or c.source_prefix_ranges for c in chains),
                any(c.source_ports for c in chains))
        destination, source, source_port = used
        return (facts.destination_port, facts.destination_address if destination or source else None,
                facts.tls, facts.server_name, facts.alpn, facts.plaintext_alpn,
                facts.source_address if source else None, facts.source_port if source_port else None)

    def _choose(self, facts: ConnectionFacts) -> ChainChoice:
        values = MatchValues(facts, self.filters)
        try:
            if self.matcher is not None:
                out = self.matcher(values)
                if isinstance(out, str):
                    if out not in self.chain_names:  # Envoy looks the name up and finds nothing
                        return ChainChoice(None, True, f"the matcher named {out!r}, which no filter chain is "
                                                       "called (Envoy closes such connections)")
                    return ChainChoice(out, True)
            else:
                chain = _classic_choice(self.chains, values)
                if chain is not None:
                    return ChainChoice(chain.name, True)
        except FactUnknown as exc:
            return ChainChoice(None, False, str(exc))
        if self.default_chain is not None:
            return ChainChoice(self.default_chain, True, default=True)
        return ChainChoice(None, True, "no filter chain matched (Envoy closes such connections)")


def _addresses(listener: Mapping[str, Any]) -> Iterable[tuple[str, int]]:
    addrs = [listener.get("address") or {}]
    addrs += [(a or {}).get("address") or {} for a in listener.get("additional_addresses", [])]
    for a in addrs:
        sa = a.get("socket_address") or {}
        if "port_value" in sa:
            yield str(sa.get("address", "0.0.0.0")), int(sa["port_value"])


def listener_selection_json(config_dump: Mapping[str, Any]) -> list[dict[str, Any]]:
    """From ``/config_dump?resource=...listeners`` bodies' ``configs``: each active listener, reduced to
    what selects its chains (name, addresses, listener filters, chains' names and matches, default chain,
    filter_chain_matcher). Filters and transport sockets are left out: their typed configs are not needed
    (and may be extensions the types library does not know). Sorted by name."""
    out: dict[str, dict[str, Any]] = {}
    for entry in config_dump.get("configs", []):
        listener = entry.get("listener") or (entry.get("active_state") or {}).get("listener")
        if not isinstance(listener, Mapping) or not listener.get("name"):
            continue
        reduced: dict[str, Any] = {"name": listener["name"]}
        for key in ("address", "additional_addresses", "filter_chain_matcher"):
            if key in listener:
                reduced[key] = listener[key]
        reduced["listener_filters"] = [  # name and type only: their settings do not select chains
            {"name": str(f.get("name", "")), "type": str((f.get("typed_config") or {}).get("@type", ""))}
            for f in listener.get("listener_filters", [])]
        reduced["filter_chains"] = [_chain_selection(c) for c in listener.get("filter_chains", [])]
        if "default_filter_chain" in listener:
            reduced["default_filter_chain"] = _chain_selection(listener["default_filter_chain"])
        out[str(listener["name"])] = reduced
    return [out[k] for k in sorted(out)]


def _chain_selection(chain: Mapping[str, Any]) -> dict[str, Any]:
    return {k: chain[k] for k in ("name", "filter_chain_match") if k in chain}


class FilterChainIndex:
    """Every traced Envoy listener's chain selection, found by the address and port a connection came to."""

    def __init__(self, listeners: Iterable[ListenerChains]) -> None:
        self.listeners = list(listeners)
        self._by_address: dict[tuple[str, int], ListenerChains] = {}
        self._by_name: dict[str, ListenerChains] = {}
        for lc in self.listeners:
            self._by_name[lc.name] = lc
            for addr in lc.addresses:
                self._by_address.setdefault(addr, lc)

    @classmethod
    def from_json(cls, listeners: Iterable[Mapping[str, Any]]) -> FilterChainIndex:
        """From :func:`listener_selection_json`'s output."""
        return cls(ListenerChains.from_json(listener) for listener in listeners)

    def find(self, listener_name: str | None, address: str | None, port: int) -> ListenerChains | None:
        """The listener a connection came to: by name when known, else by local address and port."""
        if listener_name and listener_name in self._by_name:
            return self._by_name[listener_name]
        by = self._by_address
        return (by.get((address, port)) if address else None) or by.get(("0.0.0.0", port)) \
            or by.get(("::", port))

    def choose(self, listener_name: str | None, facts: ConnectionFacts) -> ChainChoice | None:
        """The chain of a connection that came to ``listener_name`` (or to its destination address); None
        for a socket that is no listener of Envoy's configuration (its admin endpoint)."""
        listener = self.find(listener_name, facts.destination_address, facts.destination_port)
        if listener is None:
            if listener_name:  # Envoy lists it, its configuration dump did not have it yet
                return ChainChoice(None, False, "the listener is not in Envoy's configuration dump yet")
            return None
        return listener.choose(facts)

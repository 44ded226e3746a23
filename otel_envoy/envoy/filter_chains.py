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

import ipaddress
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "ChainChoice",
    "ConnectionFacts",
    "FilterChainIndex",
    "ListenerChains",
    "listener_selection_json",
]

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
_STRING_VALUE = "type.googleapis.com/google.protobuf.StringValue"
_INPUTS = "envoy.extensions.matching.common_inputs.network.v3."

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
_CACHE_ENTRIES = 4096  # remembered choices per listener (cleared whole when full)


@dataclass(frozen=True, slots=True)
class ConnectionFacts:
    """What a connection showed, as Envoy's filter-chain match sees it. ``None``: not seen."""

    destination_address: str | None
    destination_port: int
    source_address: str
    source_port: int
    tls: bool | None  # its first bytes were a TLS ClientHello; None: no bytes seen
    server_name: str | None = None  # SNI of its ClientHello ("" none)
    alpn: tuple[str, ...] | None = None  # protocols its ClientHello offered, in the client's order
    plaintext_alpn: str | None = None  # what http_inspector would say of its plaintext bytes ("" nothing)


@dataclass(frozen=True, slots=True)
class ChainChoice:
    """The filter chain chosen: ``name`` ("" for a chain without one) when ``inferred``, else ``reason``
    says why it could not be decided. ``default``: the listener's default chain (nothing matched)."""

    name: str | None
    inferred: bool
    reason: str = ""
    default: bool = False


class _Unknown(Exception):
    """A fact the choice depends on was not seen."""


# ------------------------------------------------------------------------------------------ the facts


@dataclass(frozen=True, slots=True)
class _Values:
    """The values Envoy matches on for one connection on one listener (each getter raises _Unknown)."""

    facts: ConnectionFacts
    filters: frozenset[str]

    def destination_ip(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
        if ORIGINAL_DST in self.filters:
            raise _Unknown("the original destination (original_dst listener filter) is not seen")
        if PROXY_PROTOCOL in self.filters:
            raise _Unknown("the destination address given by the PROXY protocol is not seen")
        if not self.facts.destination_address:
            raise _Unknown("the connection's local address was not seen")
        return _ip(self.facts.destination_address)

    def destination_port(self) -> int:
        if ORIGINAL_DST in self.filters:
            raise _Unknown("the original destination (original_dst listener filter) is not seen")
        if PROXY_PROTOCOL in self.filters:
            raise _Unknown("the destination port given by the PROXY protocol is not seen")
        return self.facts.destination_port

    def server_name(self) -> str:
        if TLS_INSPECTOR not in self.filters:
            return ""
        if self.facts.tls is None:
            raise _Unknown("the connection's first bytes were not seen")
        if not self.facts.tls:
            return ""
        if self.facts.server_name is None:
            raise _Unknown("the TLS ClientHello was not captured")
        return self.facts.server_name.lower()

    def transport_protocol(self) -> str:
        if TLS_INSPECTOR not in self.filters:
            return "raw_buffer"  # Envoy's default when no listener filter detected one
        if self.facts.tls is None:
            raise _Unknown("the connection's first bytes were not seen")
        return "tls" if self.facts.tls else "raw_buffer"

    def application_protocols(self) -> tuple[str, ...]:
        facts = self.facts
        if TLS_INSPECTOR in self.filters and facts.tls:
            if facts.alpn is None:
                raise _Unknown("the TLS ClientHello was not captured")
            return facts.alpn
        if HTTP_INSPECTOR in self.filters and not facts.tls:
            if facts.tls is None or facts.plaintext_alpn is None:
                raise _Unknown("the connection's first bytes were not seen")
            return (facts.plaintext_alpn,) if facts.plaintext_alpn else ()
        if TLS_INSPECTOR in self.filters and facts.tls is None:
            raise _Unknown("the connection's first bytes were not seen")
        return ()

    def direct_source_ip(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
        return _ip(self.facts.source_address)

    def source_ip(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
        if PROXY_PROTOCOL in self.filters:
            raise _Unknown("the source address given by the PROXY protocol is not seen")
        return _ip(self.facts.source_address)

    def source_port(self) -> int:
        if PROXY_PROTOCOL in self.filters:
            raise _Unknown("the source port given by the PROXY protocol is not seen")
        return self.facts.source_port

    def is_local(self) -> bool:
        """Envoy's source type LOCAL: the source is a loopback address or the destination's own."""
        src = self.source_ip()
        if src.is_loopback:
            return True
        return self.facts.destination_address is not None and src == self.destination_ip()


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        addr = ipaddress.ip_address(text)
    except ValueError as exc:
        raise _Unknown(f"address {text!r} is not an IP address") from exc
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def _networks(ranges: Iterable[Any]) -> tuple[IpNetwork, ...]:
    """CidrRange messages -> networks (host bits cleared, as Envoy does)."""
    out = []
    for r in ranges:
        addr = ipaddress.ip_address(r.address_prefix)
        length = r.prefix_len if r.prefix_len is not None else addr.max_prefixlen
        out.append(ipaddress.ip_network((addr, length), strict=False))
    return tuple(out)


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
        return cls(chain.name or "", m.destination_port or 0, _networks(m.prefix_ranges), names,
                   m.transport_protocol or "", tuple(m.application_protocols),
                   _networks(m.direct_source_prefix_ranges), int(m.source_type),
                   _networks(m.source_prefix_ranges), tuple(m.source_ports))


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


def _source_type(chains: list[_Chain], values: _Values) -> list[_Chain]:
    local = [c for c in chains if c.source_type == 1]
    external = [c for c in chains if c.source_type == 2]
    if local or external:
        chosen = local if values.is_local() else external
        if chosen:
            return chosen
    return [c for c in chains if c.source_type == 0]


def _classic_choice(chains: list[_Chain], values: _Values) -> _Chain | None:
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


# ---------------------------------------------------------------------------- filter_chain_matcher


def _input_reader(type_url: str) -> Callable[[_Values], str | None]:
    """A network matching input -> how to read it from a connection's values (None: no value)."""
    name = type_url.rsplit("/", 1)[-1].removeprefix(_INPUTS)
    readers: dict[str, Callable[[_Values], str | None]] = {
        "DestinationIPInput": lambda v: str(v.destination_ip()),
        "DestinationPortInput": lambda v: str(v.destination_port()),
        "SourceIPInput": lambda v: str(v.source_ip()),
        "DirectSourceIPInput": lambda v: str(v.direct_source_ip()),
        "SourcePortInput": lambda v: str(v.source_port()),
        "SourceTypeInput": lambda v: "local" if v.is_local() else None,
        "ServerNameInput": lambda v: v.server_name() or None,
        "TransportProtocolInput": lambda v: v.transport_protocol() or None,
        "ApplicationProtocolInput": lambda v: ",".join(f"'{p}'" for p in v.application_protocols()) or None,
    }
    try:
        return readers[name]
    except KeyError:
        raise ValueError(f"matcher input {name} is not supported") from None


class _NoMatch:
    """Sentinel: the matcher did not match (its parent's on_no_match applies)."""


Action = str | None  # a chain name, or None: no match
Node = Callable[[_Values], Action | type[_NoMatch]]


def _string_matcher(m: Any) -> Callable[[str], bool]:
    ignore_case = bool(getattr(m, "ignore_case", False))

    def norm(s: str) -> str:
        return s.lower() if ignore_case else s

    if m.exact is not None:
        want = norm(m.exact)
        return lambda s: norm(s) == want
    if m.prefix is not None:
        want = norm(m.prefix)
        return lambda s: norm(s).startswith(want)
    if m.suffix is not None:
        want = norm(m.suffix)
        return lambda s: norm(s).endswith(want)
    if m.contains is not None:
        want = norm(m.contains)
        return lambda s: want in norm(s)
    if m.safe_regex is not None:
        pattern = re.compile(m.safe_regex.regex)
        return lambda s: pattern.fullmatch(s) is not None
    raise ValueError("string matcher kind is not supported")


def _predicate(p: Any) -> Callable[[_Values], bool]:
    if p.single_predicate is not None:
        single = p.single_predicate
        read = _input_reader(single.input.typed_config.type_url)
        if single.value_match is None:
            raise ValueError("custom predicate matchers are not supported")
        match = _string_matcher(single.value_match)

        def test(v: _Values) -> bool:
            value = read(v)
            return value is not None and match(value)

        return test
    if p.or_matcher is not None:
        parts = [_predicate(q) for q in p.or_matcher.predicate]
        return lambda v: any(t(v) for t in parts)
    if p.and_matcher is not None:
        parts = [_predicate(q) for q in p.and_matcher.predicate]
        return lambda v: all(t(v) for t in parts)
    if p.not_matcher is not None:
        inner = _predicate(p.not_matcher)
        return lambda v: not inner(v)
    raise ValueError("predicate kind is not supported")


def _on_match(om: Any) -> Node:
    if om.matcher is not None:
        return _compile_matcher(om.matcher)
    action = om.action
    if action is None or action.typed_config is None or action.typed_config.type_url != _STRING_VALUE:
        raise ValueError("an action other than a filter chain name")
    name = action.typed_config.unpack().value
    return lambda _v: name


def _compile_matcher(m: Any) -> Node:
    """An xDS Matcher -> a function of a connection's values: the chain name, or _NoMatch."""
    on_no_match: Node = _on_match(m.on_no_match) if m.on_no_match is not None else (lambda _v: _NoMatch)
    if m.matcher_list is not None:
        rules = [(_predicate(fm.predicate), _on_match(fm.on_match)) for fm in m.matcher_list.matchers]

        def first_rule(v: _Values) -> Action | type[_NoMatch]:
            for test, then in rules:
                if test(v):
                    out = then(v)
                    if out is not _NoMatch:
                        return out
            return on_no_match(v)

        return first_rule
    tree = m.matcher_tree
    if tree is None:
        return on_no_match
    if tree.custom_match is not None:  # (envoy-data-plane 2.2 does not know xds IPMatcher: not reached)
        raise ValueError("custom matchers are not supported")
    read = _input_reader(tree.input.typed_config.type_url)
    if tree.exact_match_map is not None:
        exact = {k: _on_match(v) for k, v in tree.exact_match_map.map.items()}

        def by_value(v: _Values) -> Action | type[_NoMatch]:
            value = read(v)
            then = exact.get(value) if value is not None else None
            out = then(v) if then is not None else _NoMatch
            return out if out is not _NoMatch else on_no_match(v)

        return by_value
    if tree.prefix_match_map is not None:
        prefixes = sorted(((k, _on_match(v)) for k, v in tree.prefix_match_map.map.items()),
                          key=lambda kv: -len(kv[0]))

        def by_prefix(v: _Values) -> Action | type[_NoMatch]:
            value = read(v)
            if value is not None:
                for key, then in prefixes:
                    if value.startswith(key):
                        out = then(v)
                        if out is not _NoMatch:
                            return out
            return on_no_match(v)

        return by_prefix
    raise ValueError("matcher tree kind is not supported")


# -------------------------------------------------------------------------------------------- listeners


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
        # 0.5 s to import: only when used. The matcher's inputs and actions are Any fields: their modules
        # register their types.
        import envoy_data_plane.envoy.extensions.matching.common_inputs.network.v3
        import envoy_data_plane.google.protobuf
        import envoy_data_plane.xds.type.matcher.v3  # noqa: F401
        from envoy_data_plane.envoy.config.listener.v3 import Listener

        name = str(listener.get("name", ""))
        filters = frozenset(_filter_name(f) for f in listener.get("listener_filters", []))
        addresses = tuple(_addresses(listener))
        try:
            proto = Listener.from_dict({k: v for k, v in listener.items() if k != "listener_filters"})
            out = cls(name, addresses, filters)
            out.chains = [_Chain.from_proto(c) for c in proto.filter_chains]
            if proto.default_filter_chain is not None:
                out.default_chain = proto.default_filter_chain.name or ""
            if proto.filter_chain_matcher is not None:
                out.matcher = _compile_matcher(proto.filter_chain_matcher)
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
        values = _Values(facts, self.filters)
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
        except _Unknown as exc:
            return ChainChoice(None, False, str(exc))
        if self.default_chain is not None:
            return ChainChoice(self.default_chain, True, default=True)
        return ChainChoice(None, True, "no filter chain matched (Envoy closes such connections)")


def _filter_name(f: Mapping[str, Any]) -> str:
    type_url = str(f.get("type", ""))
    return _LISTENER_FILTER_TYPES.get(type_url.rsplit("/", 1)[-1], str(f.get("name", "")))


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

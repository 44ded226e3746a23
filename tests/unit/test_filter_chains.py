"""Filter-chain choice from listener configuration and connection facts (Envoy's matching rules)."""

from __future__ import annotations

from typing import Any

import pytest

from otel_envoy.envoy.filter_chains import (
    ConnectionFacts,
    FilterChainIndex,
    ListenerChains,
    listener_selection_json,
)

TLS_INSPECTOR = {"name": "envoy.filters.listener.tls_inspector", "typed_config": {
    "@type": "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector"}}
HTTP_INSPECTOR = {"name": "http_inspector", "typed_config": {
    "@type": "type.googleapis.com/envoy.extensions.filters.listener.http_inspector.v3.HttpInspector"}}
UNKNOWN = "type.googleapis.com/some.extension.v3.NobodyRegisteredIt"
INPUT = "type.googleapis.com/envoy.extensions.matching.common_inputs.network.v3."


def listener(chains: list[dict[str, Any]], *, filters: tuple[dict, ...] = (TLS_INSPECTOR,),
             default: str | None = "dflt", **extra: Any) -> ListenerChains:
    """A listener as Envoy's configuration dump shows it, through the same reduction the daemon uses
    (filters and transport sockets are dropped: a typed config nobody registered must not matter)."""
    raw: dict[str, Any] = {
        "name": "l", "address": {"socket_address": {"address": "10.0.0.1", "port_value": 443}},
        "listener_filters": list(filters),
        "filter_chains": [{**c, "filters": [{"name": "x", "typed_config": {"@type": UNKNOWN}}]}
                          for c in chains],
        **extra,
    }
    if default is not None:
        raw["default_filter_chain"] = {"name": default}
    [reduced] = listener_selection_json({"configs": [{"listener": raw}]})
    return ListenerChains.from_json(reduced)


def tls(sni: str = "", alpn: tuple[str, ...] = (), dst: str = "10.0.0.1", port: int = 443,
        src: str = "192.0.2.7", sport: int = 40000) -> ConnectionFacts:
    return ConnectionFacts(dst, port, src, sport, True, sni, alpn)


def plain(first_line_alpn: str = "http/1.1", dst: str = "10.0.0.1", port: int = 443,
          src: str = "192.0.2.7", sport: int = 40000) -> ConnectionFacts:
    return ConnectionFacts(dst, port, src, sport, False, None, None, first_line_alpn)


SNI_CHAINS = [
    {"name": "exact", "filter_chain_match": {"server_names": ["api.example.com"]}},
    {"name": "wild", "filter_chain_match": {"server_names": ["*.example.com"]}},
    {"name": "wild_deeper", "filter_chain_match": {"server_names": ["*.b.example.com"]}},
    {"name": "any_name", "filter_chain_match": {}},
]


@pytest.mark.parametrize(("sni", "chain"), [
    ("api.example.com", "exact"),
    ("API.Example.COM", "exact"),  # SNI is lowered before matching
    ("www.example.com", "wild"),
    ("a.b.example.com", "wild_deeper"),  # the longest wildcard suffix first
    ("x.a.b.example.com", "wild_deeper"),  # a wildcard matches any depth
    ("example.com", "any_name"),  # *.example.com does not match example.com itself
    ("", "any_name"),  # no SNI: only chains without server_names
])
def test_server_names_exact_then_longest_wildcard_then_none(sni: str, chain: str) -> None:
    choice = listener(SNI_CHAINS).choose(tls(sni))
    assert (choice.name, choice.inferred, choice.default) == (chain, True, False)


def test_no_backtracking_a_level_that_leaves_nothing_means_the_default_chain() -> None:
    chains = [
        {"name": "port_h2", "filter_chain_match": {"destination_port": 443, "application_protocols": ["h2"]}},
        {"name": "any_port", "filter_chain_match": {}},
    ]
    lc = listener(chains)
    assert lc.choose(tls(alpn=("h2",))).name == "port_h2"
    # port 443 has its own chain: Envoy commits to it and never tries the chain without a port
    choice = lc.choose(tls(alpn=("http/1.1",)))
    assert (choice.name, choice.default) == ("dflt", True)
    assert lc.choose(tls(alpn=("http/1.1",), port=8443)).name == "any_port"


def test_application_protocols_in_the_client_s_order() -> None:
    lc = listener([{"name": "h2", "filter_chain_match": {"application_protocols": ["h2"]}},
                   {"name": "h1", "filter_chain_match": {"application_protocols": ["http/1.1"]}}])
    assert lc.choose(tls(alpn=("http/1.1", "h2"))).name == "h1"
    assert lc.choose(tls(alpn=("h2", "http/1.1"))).name == "h2"
    assert lc.choose(tls(alpn=("spdy/3",))).default


def test_transport_protocol_defaults_to_raw_buffer() -> None:
    chains = [{"name": "tls", "filter_chain_match": {"transport_protocol": "tls"}},
              {"name": "raw", "filter_chain_match": {"transport_protocol": "raw_buffer"}}]
    assert listener(chains).choose(tls()).name == "tls"
    assert listener(chains).choose(plain()).name == "raw"
    # without tls_inspector nothing detects TLS: Envoy's default "raw_buffer" even for a ClientHello
    assert listener(chains, filters=()).choose(tls("api.example.com")).name == "raw"
    # and no server name is known to Envoy
    assert listener(SNI_CHAINS, filters=()).choose(tls("api.example.com")).name == "any_name"


def test_http_inspector_gives_plaintext_alpn() -> None:
    chains = [{"name": "h2c", "filter_chain_match": {"application_protocols": ["h2c"]}},
              {"name": "h10", "filter_chain_match": {"application_protocols": ["http/1.0"]}},
              {"name": "other", "filter_chain_match": {}}]
    lc = listener(chains, filters=(TLS_INSPECTOR, HTTP_INSPECTOR))
    assert lc.choose(plain("h2c")).name == "h2c"
    assert lc.choose(plain("http/1.0")).name == "h10"
    assert lc.choose(plain("")).name == "other"
    assert listener(chains).choose(plain("h2c")).name == "other"  # no http_inspector: no ALPN


def test_prefix_ranges_longest_prefix_and_source_type() -> None:
    chains = [
        {"name": "ten", "filter_chain_match": {"prefix_ranges": [{"address_prefix": "10.0.0.0",
                                                                   "prefix_len": 8}]}},
        {"name": "ten_host", "filter_chain_match": {"prefix_ranges": [{"address_prefix": "10.0.0.1",
                                                                        "prefix_len": 32}]}},
        {"name": "anywhere", "filter_chain_match": {}},
    ]
    lc = listener(chains)
    assert lc.choose(tls(dst="10.0.0.1")).name == "ten_host"
    assert lc.choose(tls(dst="10.9.9.9")).name == "ten"
    assert lc.choose(tls(dst="172.16.0.1")).name == "anywhere"
    assert lc.choose(tls(dst="::ffff:10.1.2.3")).name == "ten"  # a v4-mapped address is its IPv4 one

    by_type = listener([
        {"name": "local", "filter_chain_match": {"source_type": "SAME_IP_OR_LOOPBACK"}},
        {"name": "external", "filter_chain_match": {"source_type": "EXTERNAL",
                                                    "source_ports": [5000]}},
        {"name": "any", "filter_chain_match": {}},
    ])
    assert by_type.choose(tls(src="127.0.0.1")).name == "local"
    assert by_type.choose(tls(src="10.0.0.1")).name == "local"  # the destination's own address
    assert by_type.choose(tls(sport=5000)).name == "external"
    # an external connection commits to the EXTERNAL chains: their source port decides, no fall back to ANY
    assert by_type.choose(tls(sport=5001)).default


def test_unknown_facts_are_said_not_guessed() -> None:
    lc = listener(SNI_CHAINS)
    unseen = ConnectionFacts("10.0.0.1", 443, "192.0.2.7", 40000, None)
    choice = lc.choose(unseen)
    assert (choice.name, choice.inferred) == (None, False)
    assert "first bytes" in choice.reason
    no_hello = ConnectionFacts("10.0.0.1", 443, "192.0.2.7", 40000, True, None, None)
    assert lc.choose(no_hello).reason == "the TLS ClientHello was not captured"
    # a level no chain uses needs no fact: an unseen local address is fine when no chain matches on it
    assert lc.choose(tls("api.example.com", dst="")).name == "exact"
    ranged = listener([{"name": "r", "filter_chain_match": {"prefix_ranges": [{"address_prefix": "10.0.0.0",
                                                                              "prefix_len": 8}]}}])
    assert not ranged.choose(tls(dst="")).inferred
    original_dst = {"name": "od", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.listener.original_dst.v3.OriginalDst"}}
    by_port = listener([{"name": "p", "filter_chain_match": {"destination_port": 80}}],
                       filters=(TLS_INSPECTOR, original_dst))
    choice = by_port.choose(tls())
    assert not choice.inferred and "original_dst" in choice.reason


def test_no_match_without_a_default_chain() -> None:
    choice = listener([{"name": "h2", "filter_chain_match": {"application_protocols": ["h2"]}}],
                      default=None).choose(tls())
    assert (choice.name, choice.inferred) == (None, True)
    assert "closes" in choice.reason


def _action(name: str) -> dict[str, Any]:
    return {"action": {"name": name, "typed_config": {
        "@type": "type.googleapis.com/google.protobuf.StringValue", "value": name}}}


def _input(name: str) -> dict[str, Any]:
    return {"name": name, "typed_config": {"@type": INPUT + name}}


def test_filter_chain_matcher_over_network_inputs() -> None:
    matcher = {
        "matcher_tree": {"input": _input("DestinationPortInput"),
                         "exact_match_map": {"map": {"8443": _action("alt_port")}}},
        "on_no_match": {"matcher": {"matcher_list": {"matchers": [
            {"predicate": {"single_predicate": {"input": _input("ServerNameInput"),
                                                "value_match": {"suffix": ".example.com"}}},
             "on_match": _action("sni")},
            {"predicate": {"and_matcher": {"predicate": [
                {"single_predicate": {"input": _input("ApplicationProtocolInput"),
                                      "value_match": {"exact": "'h2','http/1.1'"}}},
                {"not_matcher": {"single_predicate": {"input": _input("SourceTypeInput"),
                                                      "value_match": {"exact": "local"}}}}]}},
             "on_match": _action("h2_first_external")},
            {"predicate": {"single_predicate": {"input": _input("ServerNameInput"),
                                                "value_match": {"exact": "ghost"}}},
             "on_match": _action("not_a_chain")},
        ]}, "on_no_match": {"matcher": {"matcher_tree": {
            "input": _input("SourceIPInput"),
            "prefix_match_map": {"map": {"192.0.2.": _action("lab"), "192.0.2.2": _action("lab_upper")}}}}}}},
    }
    names = ["alt_port", "sni", "h2_first_external", "lab", "lab_upper"]
    lc = listener([{"name": n} for n in names], filter_chain_matcher=matcher)
    assert lc.choose(tls("www.example.com", port=8443)).name == "alt_port"
    assert lc.choose(tls("www.example.com")).name == "sni"
    assert lc.choose(tls(alpn=("h2", "http/1.1"))).name == "h2_first_external"
    assert lc.choose(tls(alpn=("h2", "http/1.1"), src="127.0.0.1")).default  # local: the not_matcher fails
    assert lc.choose(tls(src="192.0.2.7")).name == "lab"
    assert lc.choose(tls(src="192.0.2.200")).name == "lab_upper"  # the longest prefix first
    assert lc.choose(tls(src="198.51.100.1")).default
    ghost = lc.choose(tls("ghost"))  # Envoy looks the named chain up, finds none and closes
    assert (ghost.name, ghost.inferred) == (None, True) and "not_a_chain" in ghost.reason


def test_an_unsupported_matcher_says_so() -> None:
    matcher = {"matcher_tree": {"input": _input("FilterStateInput"),
                                "exact_match_map": {"map": {"x": _action("a")}}}}
    choice = listener([{"name": "a"}], filter_chain_matcher=matcher).choose(tls())
    assert not choice.inferred and "FilterStateInput" in choice.reason
    ip_ranges = {"matcher_tree": {"input": _input("SourceIPInput"), "custom_match": {
        "name": "ip", "typed_config": {"@type": "type.googleapis.com/xds.type.matcher.v3.IPMatcher",
                                       "range_matchers": []}}}}
    choice = listener([{"name": "a"}], filter_chain_matcher=ip_ranges).choose(tls())
    assert not choice.inferred and "IPMatcher" in choice.reason


def test_index_finds_listeners_by_name_then_address() -> None:
    raw = {"name": "web", "address": {"socket_address": {"address": "0.0.0.0", "port_value": 8080}},
           "additional_addresses": [{"address": {"socket_address": {"address": "::", "port_value": 8081}}}],
           "filter_chains": [{"name": "only"}]}
    dump = {"configs": [{"active_state": {"version_info": "3", "listener": raw}}]}
    index = FilterChainIndex.from_json(listener_selection_json(dump))
    assert index.choose("web", plain(port=1)).name == "only"
    assert index.choose(None, plain(port=8080)).name == "only"
    assert index.choose(None, plain(port=8081)).name == "only"
    assert index.choose(None, plain(port=9)) is None  # not an Envoy listener (its admin endpoint)


def test_the_context_record_round_trips_and_rejects_damage() -> None:
    from otel_envoy.events.recording_context import FilterChainsContext

    dump = {"configs": [{"listener": {"name": "a", "filter_chains": [{"name": "x"}]}}]}
    listeners = listener_selection_json(dump)
    record = FilterChainsContext(listeners).to_json()
    assert FilterChainsContext.from_json(record).listeners == listeners
    with pytest.raises(TypeError):
        FilterChainsContext.from_json({"type": "filter_chains", "listeners": "a"})
    with pytest.raises(KeyError):
        FilterChainsContext.from_json({"type": "filter_chains"})


@pytest.mark.parametrize(("first", "alpn"), [
    (b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", "http/1.1"),
    (b"GET / HTTP/1.0\r\n\r\n", "http/1.0"),
    (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", "h2c"),
    (b"GET / HTTP/1.1", ""),  # the request line not complete: http_inspector cannot tell
    (b"hello\r\n", ""),
])
def test_plaintext_alpn_as_http_inspector_sees_it(first: bytes, alpn: str) -> None:
    from otel_envoy.correlate.downstream import plaintext_alpn
    from otel_envoy.protocols.detect import detect_protocol

    assert plaintext_alpn(detect_protocol(first), first) == alpn

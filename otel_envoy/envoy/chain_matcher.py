"""Envoy's ``filter_chain_matcher`` (an xDS matcher tree whose actions name filter chains) compiled into a
function of a connection's MatchValues: exact and prefix match maps, matcher lists with string matchers and
and/or/not predicates, over the network matching inputs."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from .chain_facts import MatchValues

__all__ = ["NoMatch", "Node", "compile_matcher"]

_STRING_VALUE = "type.googleapis.com/google.protobuf.StringValue"
_INPUTS = "envoy.extensions.matching.common_inputs.network.v3."



def _input_reader(type_url: str) -> Callable[[MatchValues], str | None]:
    """A network matching input -> how to read it from a connection's values (None: no value)."""
    name = type_url.rsplit("/", 1)[-1].removeprefix(_INPUTS)
    readers: dict[str, Callable[[MatchValues], str | None]] = {
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


class NoMatch:
    """Sentinel: the matcher did not match (its parent's on_no_match applies)."""


Action = str | None  # a chain name, or None: no match
Node = Callable[[MatchValues], Action | type[NoMatch]]


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


def _predicate(p: Any) -> Callable[[MatchValues], bool]:
    if p.single_predicate is not None:
        single = p.single_predicate
        read = _input_reader(single.input.typed_config.type_url)
        if single.value_match is None:
            raise ValueError("custom predicate matchers are not supported")
        match = _string_matcher(single.value_match)

        def test(v: MatchValues) -> bool:
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
        return compile_matcher(om.matcher)
    action = om.action
    if action is None or action.typed_config is None or action.typed_config.type_url != _STRING_VALUE:
        raise ValueError("an action other than a filter chain name")
    name = action.typed_config.unpack().value
    return lambda _v: name


def compile_matcher(m: Any) -> Node:
    """An xDS Matcher -> a function of a connection's values: the chain name, or NoMatch."""
    on_no_match: Node = _on_match(m.on_no_match) if m.on_no_match is not None else (lambda _v: NoMatch)
    if m.matcher_list is not None:
        rules = [(_predicate(fm.predicate), _on_match(fm.on_match)) for fm in m.matcher_list.matchers]

        def first_rule(v: MatchValues) -> Action | type[NoMatch]:
            for test, then in rules:
                if test(v):
                    out = then(v)
                    if out is not NoMatch:
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

        def by_value(v: MatchValues) -> Action | type[NoMatch]:
            value = read(v)
            then = exact.get(value) if value is not None else None
            out = then(v) if then is not None else NoMatch
            return out if out is not NoMatch else on_no_match(v)

        return by_value
    if tree.prefix_match_map is not None:
        prefixes = sorted(((k, _on_match(v)) for k, v in tree.prefix_match_map.map.items()),
                          key=lambda kv: -len(kv[0]))

        def by_prefix(v: MatchValues) -> Action | type[NoMatch]:
            value = read(v)
            if value is not None:
                for key, then in prefixes:
                    if value.startswith(key):
                        out = then(v)
                        if out is not NoMatch:
                            return out
            return on_no_match(v)

        return by_prefix
    raise ValueError("matcher tree kind is not supported")

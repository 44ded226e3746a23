"""Records grouped as an OTLP request nests them: by resource, then by instrumentation scope."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from otel_envoy.spans.model import SpanRecord

__all__ = ["ResourceGroup", "group_records"]

#: ``(resource attributes, resource schema url, [((scope name, scope version), records), ...])``
ResourceGroup = tuple[dict[str, Any], str, list[tuple[tuple[str, str], list[SpanRecord]]]]


def group_records(records: Sequence[SpanRecord]) -> list[ResourceGroup]:
    """Group records by resource (attributes and schema url), then by scope, in order of first appearance.

    Equal resources in distinct dicts land in one group.  The common case -- every record sharing one
    resource dict and one scope, as the span builder makes them -- costs one pass of identity checks.
    """
    if not records:
        return []
    first = records[0]
    attrs, schema = first.resource_attributes, first.resource_schema_url
    name, version = first.scope_name, first.scope_version
    for r in records:
        if (
            r.resource_attributes is not attrs
            or r.scope_name != name
            or r.scope_version != version
            or r.resource_schema_url != schema
        ):
            break
    else:
        return [(attrs, schema, [((name, version), list(records))])]
    groups: list[tuple[dict[str, Any], str, dict[tuple[str, str], list[SpanRecord]]]] = []
    by_id: dict[tuple[int, str], tuple[dict[str, Any], str, dict[tuple[str, str], list[SpanRecord]]]] = {}
    for r in records:
        attrs, schema = r.resource_attributes, r.resource_schema_url
        key = (id(attrs), schema)  # the records keep the dicts alive: ids are not reused meanwhile
        group = by_id.get(key)
        if group is None:
            for g in groups:
                if g[1] == schema and g[0] == attrs:
                    group = g
                    break
            else:
                group = (attrs, schema, {})
                groups.append(group)
            by_id[key] = group
        scopes = group[2]
        scope_key = (r.scope_name, r.scope_version)
        members = scopes.get(scope_key)
        if members is None:
            members = scopes[scope_key] = []
        members.append(r)
    return [(attrs, schema, list(scopes.items())) for attrs, schema, scopes in groups]

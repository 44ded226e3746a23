"""group_records: by resource, then scope, in order of first appearance; equal resources share a group."""

from __future__ import annotations

from otel_envoy.export.grouping import group_records
from tests.support.span_samples import SHARED_RESOURCE, record


def test_one_resource_and_scope_is_one_group_of_every_record() -> None:
    records = [record("a", 1), record("b", 2)]
    assert group_records(records) == [(SHARED_RESOURCE, "", [(("otel-envoy", "0.1.0"), records)])]
    assert group_records([]) == []


def test_equal_resources_group_together_and_scopes_split() -> None:
    a = record("a", 1)
    b = record("b", 2, resource_attributes=dict(SHARED_RESOURCE))  # equal, another dict
    c = record("c", 3, scope_name="other", scope_version="")
    d = record("d", 4, resource_attributes={"service.name": "x"}, resource_schema_url="https://s")
    e = record("e", 5)
    groups = group_records([a, b, c, d, e])
    assert [(attrs, schema, [(scope, [r.name for r in members]) for scope, members in scopes])
            for attrs, schema, scopes in groups] == [
        (SHARED_RESOURCE, "", [(("otel-envoy", "0.1.0"), ["a", "b", "e"]), (("other", ""), ["c"])]),
        ({"service.name": "x"}, "https://s", [(("otel-envoy", "0.1.0"), ["d"])]),
    ]

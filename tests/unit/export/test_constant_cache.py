"""ConstantCache: one encoding per shared object, by identity, re-encoded when a dict changed, bounded."""

from __future__ import annotations

from otel_envoy.export.constant_cache import ConstantCache


def test_objects_are_encoded_once_by_identity_and_the_cache_is_bounded() -> None:
    shared = ("TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384")
    calls: list[tuple] = []
    cache = ConstantCache(lambda t: calls.append(t) or str(t), limit=4, snapshot=None)
    counted = cache.get
    assert counted(shared) == counted(shared) == str(shared) and calls == [shared]
    assert counted(tuple(list(shared))) == str(shared) and len(calls) == 2  # equal, but another object
    for i in range(10):
        t = (f"v{i}",)
        assert counted(t) == str(t)
        assert len(cache) <= 4


def test_a_changed_dict_is_encoded_again() -> None:
    calls: list[dict] = []
    cache = ConstantCache(lambda d: calls.append(dict(d)) or sorted(d.items()))
    resource = {"service.name": "a"}
    assert cache.get(resource) == cache.get(resource) == [("service.name", "a")] and len(calls) == 1
    resource["service.name"] = "b"
    assert cache.get(resource) == [("service.name", "b")] and len(calls) == 2

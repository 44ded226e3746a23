"""The lab's tests share one running lab per module (root and an Envoy binary needed)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from otel_envoy.lab import EnvoyLab
from tests.support.lab import ENVOY, is_root


@pytest.fixture(scope="module")
def lab() -> Iterator[EnvoyLab]:
    """One lab for the module: Envoy with two workers in front of the backend."""
    if not is_root or ENVOY is None:
        pytest.skip("needs root and an Envoy binary")
    with EnvoyLab(concurrency=2) as the_lab:
        yield the_lab


"""Fixtures shared by the stack symbolization tests: the compiled C++ test server, built once."""

from __future__ import annotations

import pytest

from tests.support.cxx_build import CxxServerBuild, build_cxx_server, have_toolchain


@pytest.fixture(scope="session")
def build(tmp_path_factory: pytest.TempPathFactory) -> CxxServerBuild:
    """The server with symbols, stripped, and as a split debug file (one build-id)."""
    if not have_toolchain():
        pytest.skip("g++/strip/objcopy not installed")
    return build_cxx_server(tmp_path_factory.mktemp("cxx"))

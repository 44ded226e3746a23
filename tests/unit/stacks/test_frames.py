"""Frame text (stacks/frames.py)."""

from __future__ import annotations

from otel_envoy.stacks import UNKNOWN, Frame
from tests.support.cxx_build import WAIT_FOR_CLIENT


def test_frame_text_forms() -> None:
    assert str(Frame("server", 0x1181, WAIT_FOR_CLIENT, 0x4)) == f"{WAIT_FOR_CLIENT}+0x4 (server)"
    assert str(Frame("envoy", 0x2A3F1C4)) == "envoy+0x2a3f1c4"
    assert str(Frame("[vdso]", 0x9D3)) == "[vdso]+0x9d3"
    assert str(UNKNOWN) == "[unknown]"

"""events.h is the one definition of the kernel->user records: prove Python reads it like a C compiler."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from otel_envoy.events.decode import Decoder
from otel_envoy.events.layout import EVENTS_H, load_layout, parse_header

pytestmark = pytest.mark.skipif(shutil.which("cc") is None, reason="needs a host C compiler")


def _c_program(layout) -> str:
    lines = [
        "#include <stdio.h>",
        "#include <stddef.h>",
        "#include <linux/types.h>",
        f'#include "{EVENTS_H}"',
        "int main(void) {",
    ]
    for name, st in layout.structs.items():
        lines.append(f'printf("{name} sizeof %zu\\n", sizeof(struct {name}));')
        for f in st.fields:
            path = f.path or f.name  # a nested struct's field by its member path ("hdr.ts_ns")
            lines.append(f'printf("{name} {path} %zu\\n", offsetof(struct {name}, {path}));')
    for const, value in layout.constants.items():
        lines.append(f'printf("const {const} %lld\\n", (long long)({const}));')
        assert isinstance(value, int)
    lines.append("return 0; }")
    return "\n".join(lines)


def test_python_layout_matches_the_c_compiler(tmp_path):
    layout = load_layout()
    src = tmp_path / "layout.c"
    src.write_text(_c_program(layout))
    exe = tmp_path / "layout"
    subprocess.run(["cc", "-Wall", "-Werror", "-o", str(exe), str(src)], check=True)
    got = {}
    for line in subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout.splitlines():
        a, b, value = line.split()
        got[(a, b)] = int(value)
    checked = 0
    for name, st in layout.structs.items():
        assert got[(name, "sizeof")] == st.size, name
        for f in st.fields:
            assert got[(name, f.path or f.name)] == f.offset, f"{name}.{f.path or f.name}"
            checked += 1
    for const, value in layout.constants.items():
        assert got[("const", const)] == value, const
    assert checked > 60


def test_every_event_struct_is_mirrored_by_a_python_type():
    decoder = Decoder()  # raises if a struct's fields and its NamedTuple disagree
    assert decoder.data_offset == load_layout().structs["data_event"].offset_of("data")


def test_unsupported_declarations_are_rejected():
    with pytest.raises(ValueError, match="unsupported"):
        parse_header("struct bad { union { __u32 a; } u; };")
    with pytest.raises(ValueError, match="unsupported type"):
        parse_header("struct bad { int a; };")

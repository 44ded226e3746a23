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
            if name != "event_header" and f.name in layout.structs["event_header"].unpacker()[1]:
                path = f"hdr.{f.name}"
            else:
                path = f.name
            lines.append(f'printf("{name} {f.name} %zu\\n", offsetof(struct {name}, {path}));')
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
            assert got[(name, f.name)] == f.offset, f"{name}.{f.name}"
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


def test_decoder_counts_short_and_unknown_records():
    decoder = Decoder()
    assert decoder.decode(b"\x00" * 4) is None
    assert decoder.decode(b"\x00" * 8 + (99).to_bytes(4, "little") + b"\x00" * 20) is None
    accept_kind = load_layout().constants["EV_ACCEPT"]
    assert decoder.decode(b"\x00" * 8 + accept_kind.to_bytes(4, "little") + b"\x00" * 10) is None
    assert decoder.errors == {"short_record": 2, "unknown_kind": 1}


def _data_record(ret: int, payload: bytes, held: int = 0, held_data: bytes = b"") -> bytes:
    """A raw EV_DATA record as the kernel lays it out (packed with events.h's layout)."""
    layout = load_layout()
    packer, names = layout.structs["data_event"].unpacker(upto="data")
    c = layout.constants
    values = {"ts_ns": 1, "kind": c["EV_DATA"], "tgid": 2, "tid": 3, "round": 4, "fd": 5,
              "direction": c["DIR_READ"], "syscall": c["IO_READ"], "flags": 0, "role": c["ROLE_DOWNSTREAM"],
              "ret": ret, "msg_seq": 0, "held": held, "held_captured": len(held_data),
              "held_data": held_data.ljust(8, b"\0"), "captured": len(payload)}
    return packer.pack(*(values[n] for n in names)) + payload


def test_decoder_puts_a_held_tls_record_header_in_front_of_the_next_read():
    decoder = Decoder()
    header = b"\x16\x03\x01\x02\x00"
    body = b"\x01\x00\x01\xfc" + b"x" * 40
    # the kernel added the held read's 5 bytes to ret; the decoder makes data the stream as read
    ev = decoder.decode(_data_record(5 + len(body), body, held=5, held_data=header))
    assert ev.data == header + body and ev.captured == 5 + len(body) and ev.ret == 5 + len(body)
    # a header whose body was not captured (the handshake ended with that header): the header alone
    ev = decoder.decode(_data_record(74, b"", held=5, held_data=b"\x17\x03\x03\x00\x45"))
    assert ev.data == b"\x17\x03\x03\x00\x45" and ev.captured == 5 and ev.ret == 74
    # past the handshake nothing is captured: neither bytes nor a misaligned body
    ev = decoder.decode(_data_record(82, b"", held=5))
    assert ev.data == b"" and ev.captured == 0
    ev = decoder.decode(_data_record(3, b"abc"))
    assert ev.data == b"abc" and ev.held == 0
    assert not decoder.errors

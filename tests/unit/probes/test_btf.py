"""probes/btf.py against the running kernel's BTF (readable without root) and against a hand-built blob."""

from __future__ import annotations

import struct

import pytest

from otel_envoy.probes.btf import VMLINUX_BTF, BtfError, KernelTypes


def _blob() -> bytes:
    """A BTF blob: int (id 1), struct inner {int a; int b;} (id 2), struct outer {int x; union {struct inner;}
    (anonymous); int y;} (ids 3 and 4: the union, then outer)."""
    names = b"\0int\0inner\0a\0b\0outer\0x\0y\0"

    def off(name: str) -> int:
        return names.index(b"\0" + name.encode() + b"\0") + 1

    types = b""
    types += struct.pack("<III", off("int"), 1 << 24, 4) + struct.pack("<I", 32)  # INT, 32 bits
    types += struct.pack("<III", off("inner"), (4 << 24) | 2, 8)  # STRUCT inner
    types += struct.pack("<III", off("a"), 1, 0) + struct.pack("<III", off("b"), 1, 32)
    types += struct.pack("<III", 0, (5 << 24) | 1, 8)  # UNION (anonymous) { struct inner; }
    types += struct.pack("<III", 0, 2, 0)
    types += struct.pack("<III", off("outer"), (4 << 24) | 3, 16)  # STRUCT outer
    types += struct.pack("<III", off("x"), 1, 0) + struct.pack("<III", 0, 3, 32) + \
        struct.pack("<III", off("y"), 1, 96)
    header = struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 24, 0, len(types), len(types), len(names))
    return header + types + names


def test_members_are_found_directly_and_through_anonymous_members() -> None:
    types = KernelTypes(_blob())
    assert types.member_offset("outer", "x") == 0
    assert types.member_offset("outer", "y") == 12
    assert types.member_offset("outer", "b") == 8  # outer's anonymous union at 4, then inner.b at 4
    assert types.member_offset("inner", "b") == 4
    assert types.member_offset("outer", "z") is None
    assert types.member_offset("nosuch", "x") is None


def test_bad_data_is_a_one_line_error() -> None:
    with pytest.raises(BtfError, match="bad magic"):
        KernelTypes(b"\0" * 64)
    with pytest.raises(BtfError, match="too short"):
        KernelTypes(b"")


@pytest.mark.skipif(not VMLINUX_BTF.exists(), reason="this kernel has no BTF")
def test_the_running_kernels_socket_layout() -> None:
    """struct sock starts with struct sock_common, whose address pair and port pair lead it (a layout stable
    since 2.6, so it checks the parser, not the kernel)."""
    types = KernelTypes.running_kernel()
    assert types.member_offset("sock", "__sk_common") == 0
    assert types.member_offset("sock_common", "skc_daddr") == 0
    assert types.member_offset("sock_common", "skc_rcv_saddr") == 4
    dport = types.member_offset("sock_common", "skc_dport")
    assert dport is not None and types.member_offset("sock_common", "skc_num") == dport + 2
    assert (types.member_offset("sock", "sk_protocol") or 0) > 0

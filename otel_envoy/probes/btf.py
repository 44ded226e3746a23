"""Offsets of kernel struct members, read from the running kernel's BTF (``/sys/kernel/btf/vmlinux``).

The BPF programs are compiled against older kernel headers than the kernel they run on (docs/architecture.md),
so they never dereference a kernel struct by its C definition. Where a program must read a struct (a raw
tracepoint hands it pointers, not the fields a classic tracepoint copies out), it reads bytes at offsets this
module finds in the kernel's own type information and the loader passes as ``-D`` constants.

Only what that needs is parsed: the BTF header, the string table and the type table (every kind's record
size, so the walk stays aligned), and struct/union members by name, anonymous members followed.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

__all__ = ["BtfError", "KernelTypes", "member_offset"]

VMLINUX_BTF = Path("/sys/kernel/btf/vmlinux")
_MAGIC = 0xEB9F
# BTF kinds (include/uapi/linux/btf.h) and the bytes that follow each btf_type record
_INT, _PTR, _ARRAY, _STRUCT, _UNION, _ENUM, _FWD, _TYPEDEF = 1, 2, 3, 4, 5, 6, 7, 8
_VOLATILE, _CONST, _RESTRICT, _FUNC, _FUNC_PROTO, _VAR, _DATASEC, _FLOAT = 9, 10, 11, 12, 13, 14, 15, 16
_DECL_TAG, _TYPE_TAG, _ENUM64 = 17, 18, 19
_MODIFIERS = (_TYPEDEF, _VOLATILE, _CONST, _RESTRICT, _TYPE_TAG)


class BtfError(RuntimeError):
    """The kernel's BTF is missing or not understood (message is one line)."""


@dataclass(frozen=True, slots=True)
class _Type:
    kind: int
    name: str
    size_or_type: int
    vlen: int
    kind_flag: bool
    extra: int  # offset of the kind-specific data in the type section


class KernelTypes:
    """The kernel's type table, indexed for member lookups."""

    def __init__(self, data: bytes) -> None:
        """Parse a raw BTF blob (the content of /sys/kernel/btf/vmlinux)."""
        if len(data) < 24:
            raise BtfError("BTF data too short")
        magic, _version, _flags, hdr_len = struct.unpack_from("<HBBI", data, 0)
        if magic != _MAGIC:
            raise BtfError("not BTF data (bad magic; a big-endian kernel is not supported)")
        type_off, type_len, str_off, str_len = struct.unpack_from("<IIII", data, 8)
        self._types_data = data[hdr_len + type_off: hdr_len + type_off + type_len]
        self._strings = data[hdr_len + str_off: hdr_len + str_off + str_len]
        self._types: list[_Type | None] = [None]  # type id 0 is void
        self._structs: dict[str, int] = {}
        self._parse()

    @classmethod
    def running_kernel(cls, path: Path = VMLINUX_BTF) -> KernelTypes:
        """The running kernel's types."""
        try:
            return cls(path.read_bytes())
        except OSError as exc:
            raise BtfError(f"cannot read {path} ({exc.strerror}): the kernel needs CONFIG_DEBUG_INFO_BTF"
                           ) from exc

    def _name(self, off: int) -> str:
        end = self._strings.find(b"\0", off)
        return self._strings[off:end].decode("ascii", "replace")

    def _parse(self) -> None:
        data, pos, n = self._types_data, 0, len(self._types_data)
        unpack = struct.unpack_from
        while pos + 12 <= n:
            name_off, info, size_or_type = unpack("<III", data, pos)
            kind = (info >> 24) & 0x1F
            vlen = info & 0xFFFF
            extra = pos + 12
            if kind in (_INT, _VAR, _DECL_TAG):
                size = 4
            elif kind == _ARRAY:
                size = 12
            elif kind in (_STRUCT, _UNION, _DATASEC, _ENUM64):
                size = 12 * vlen
            elif kind in (_ENUM, _FUNC_PROTO):
                size = 8 * vlen
            elif kind in (_PTR, _FWD, _FUNC, _FLOAT) or kind in _MODIFIERS:
                size = 0
            else:
                raise BtfError(f"BTF kind {kind} not understood")
            name = self._name(name_off) if kind in (_STRUCT, _UNION) else ""
            self._types.append(_Type(kind, name, size_or_type, vlen, bool(info >> 31), extra))
            if kind == _STRUCT and name and name not in self._structs:
                self._structs[name] = len(self._types) - 1
            pos = extra + size

    def _resolved(self, type_id: int) -> _Type | None:
        """The type behind typedefs and qualifiers."""
        t = self._types[type_id]
        while t is not None and t.kind in _MODIFIERS:
            t = self._types[t.size_or_type]
        return t

    def _members(self, t: _Type) -> list[tuple[str, int, int]]:
        """(name, type id, bit offset) of a struct's or union's members."""
        out = []
        for i in range(t.vlen):
            name_off, type_id, offset = struct.unpack_from("<III", self._types_data, t.extra + 12 * i)
            bits = offset & 0xFFFFFF if t.kind_flag else offset  # a kind_flag struct packs the bitfield size
            out.append((self._name(name_off), type_id, bits))
        return out

    def _find(self, t: _Type, member: str) -> int | None:
        """Bit offset of ``member`` in ``t``, looking into anonymous struct/union members."""
        for name, type_id, bits in self._members(t):
            if name == member:
                return bits
            if not name:
                inner = self._resolved(type_id)
                if inner is not None and inner.kind in (_STRUCT, _UNION):
                    found = self._find(inner, member)
                    if found is not None:
                        return bits + found
        return None

    def member_offset(self, struct_name: str, member: str) -> int | None:
        """Byte offset of ``member`` (a direct or anonymous-nested member) in ``struct struct_name``; None
        when the struct or the member does not exist in this kernel."""
        type_id = self._structs.get(struct_name)
        if type_id is None:
            return None
        t = self._types[type_id]
        assert t is not None
        bits = self._find(t, member)
        if bits is None or bits % 8:
            return None
        return bits // 8


def member_offset(struct_name: str, member: str) -> int | None:
    """Byte offset of a member of a struct of the running kernel (see :meth:`KernelTypes.member_offset`)."""
    return KernelTypes.running_kernel().member_offset(struct_name, member)

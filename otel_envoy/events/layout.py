"""Reads ``bpf/events.h`` — the one definition of every kernel->user record — into Python.

The header is deliberately restricted (fixed-width scalars, char/u8 arrays, nested structs, ``#define``
and enum constants, one per line), so a small parser is enough and C and Python can never drift apart.
``tests/unit/events/test_layout.py`` proves it by compiling the header with the host compiler and comparing
every ``sizeof``/``offsetof`` with what this module computes.
"""

from __future__ import annotations

import os
import re
import struct
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

__all__ = ["BPF_DIR", "EVENTS_H", "Field", "Layout", "StructLayout", "load_layout"]

# The BPF sources live next to the package in a checkout; an installed copy (the container image) names them.
BPF_DIR = Path(os.environ.get("OTEL_ENVOY_BPF_DIR") or Path(__file__).resolve().parents[2] / "bpf")
EVENTS_H = BPF_DIR / "events.h"

# C scalar type -> (struct format char, size). Little-endian, natural alignment == size.
_SCALARS: dict[str, tuple[str, int]] = {
    "__u8": ("B", 1),
    "__s8": ("b", 1),
    "char": ("b", 1),
    "__u16": ("H", 2),
    "__s16": ("h", 2),
    "__u32": ("I", 4),
    "__s32": ("i", 4),
    "__u64": ("Q", 8),
    "__s64": ("q", 8),
}

_DEFINE = re.compile(r"^\s*#define\s+([A-Z_][A-Z0-9_]*)\s+(\(?[-\w\s*+()]+\)?)\s*(?:/\*.*)?$")
_ENUM = re.compile(r"enum\s+(\w+)\s*\{(.*?)\};", re.S)
_STRUCT = re.compile(r"struct\s+(\w+)\s*\{(.*?)\};", re.S)
_FIELD = re.compile(r"^(struct\s+\w+|\w+)\s+(\w+)(?:\[(\w+)\])?$")
_COMMENT = re.compile(r"/\*.*?\*/", re.S)


@dataclass(frozen=True, slots=True)
class Field:
    """One flattened field: nested struct fields are inlined (the header's fields come first)."""

    name: str
    offset: int
    size: int
    fmt: str  # struct format of this field ("I", "16s", ...)
    path: str = ""  # a nested struct's field: its C member path ("hdr.ts_ns"); "" for a direct field


@dataclass(slots=True)
class StructLayout:
    """The layout of one C struct, flattened, with a precompiled little-endian unpacker."""

    name: str
    size: int
    align: int
    fields: list[Field] = field(default_factory=list)

    def unpacker(self, upto: str | None = None) -> tuple[struct.Struct, list[str]]:
        """Return a ``struct.Struct`` reading the fields in order and their names.

        Gaps and ``_pad`` fields are skipped.
        ``upto`` stops before the named field (used for the variable-length ``data`` tail).
        """
        fmt, names, pos = ["<"], [], 0
        for f in self.fields:
            if f.name == upto:
                break
            if f.name.startswith("_"):  # explicit padding: skipped, like the gaps
                continue
            if f.offset > pos:
                fmt.append(f"{f.offset - pos}x")
            fmt.append(f.fmt)
            names.append(f.name)
            pos = f.offset + f.size
        return struct.Struct("".join(fmt)), names

    def offset_of(self, name: str) -> int:
        """Return the byte offset of a (flattened) field."""
        for f in self.fields:
            if f.name == name:
                return f.offset
        raise KeyError(name)


@dataclass(slots=True)
class Layout:
    """Everything the header defines: integer constants (defines and enumerators) and structs."""

    constants: dict[str, int]
    enums: dict[str, dict[str, int]]
    structs: dict[str, StructLayout]


def _eval_const(expr: str, constants: dict[str, int]) -> int:
    tokens = re.findall(r"\w+|[-+*()]", expr)
    resolved = " ".join(str(constants[t]) if t in constants else t for t in tokens)
    if not re.fullmatch(r"[\d\s+\-*()]+", resolved):
        raise ValueError(f"events.h: cannot evaluate constant expression {expr!r}")
    return int(eval(resolved, {"__builtins__": {}}, {}))  # digits and + - * ( ) only


def parse_header(text: str) -> Layout:
    """Parse the restricted C of events.h. Raises ValueError on anything outside the subset."""
    constants: dict[str, int] = {}
    for line in text.splitlines():
        m = _DEFINE.match(line)
        if m:
            constants[m.group(1)] = _eval_const(m.group(2), constants)
    body = _COMMENT.sub("", text)
    enums: dict[str, dict[str, int]] = {}
    for m in _ENUM.finditer(body):
        members: dict[str, int] = {}
        nxt = 0
        for item in filter(None, (x.strip() for x in m.group(2).split(","))):
            name, _, value = (p.strip() for p in item.partition("="))
            nxt = _eval_const(value, constants) if value else nxt
            members[name] = nxt
            constants[name] = nxt
            nxt += 1
        enums[m.group(1)] = members
    structs: dict[str, StructLayout] = {}
    for m in _STRUCT.finditer(body):
        structs[m.group(1)] = _layout_struct(m.group(1), m.group(2), constants, structs)
    return Layout(constants, enums, structs)


def _layout_struct(
    name: str, body: str, constants: dict[str, int], known: dict[str, StructLayout]
) -> StructLayout:
    out = StructLayout(name=name, size=0, align=1)
    pos = 0
    for decl in filter(None, (d.strip() for d in body.split(";"))):
        m = _FIELD.match(" ".join(decl.split()))
        if not m:
            raise ValueError(f"events.h: struct {name}: unsupported declaration {decl!r}")
        ctype, fname, count = m.groups()
        if ctype.startswith("struct "):
            inner = known[ctype.split()[1]]
            pos = _align(pos, inner.align)
            out.fields.extend(Field(f.name, pos + f.offset, f.size, f.fmt, f"{fname}.{f.path or f.name}")
                              for f in inner.fields)
            pos += inner.size
            out.align = max(out.align, inner.align)
            continue
        if ctype not in _SCALARS:
            raise ValueError(f"events.h: struct {name}: unsupported type {ctype!r}")
        fmt, size = _SCALARS[ctype]
        pos = _align(pos, size)
        if count is not None:
            n = int(count) if count.isdigit() else constants[count]
            out.fields.append(Field(fname, pos, size * n, f"{n}s" if size == 1 else f"{n}{fmt}"))
            pos += size * n
        else:
            out.fields.append(Field(fname, pos, size, fmt))
            pos += size
        out.align = max(out.align, size)
    out.size = _align(pos, out.align)
    return out


def _align(pos: int, align: int) -> int:
    return (pos + align - 1) // align * align


@cache
def load_layout(path: Path = EVENTS_H) -> Layout:
    """Parse events.h once per process."""
    return parse_header(path.read_text())

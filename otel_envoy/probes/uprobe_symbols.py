"""Where the uprobe tier attaches: SSL_read, SSL_write, SSL_do_handshake (and Envoy functions) in a binary.

BoringSSL is linked statically into Envoy, so its functions are plain C symbols of the binary's ``.symtab``
when it has one (debug builds, ``envoyproxy/envoy:debug-*``, Istio symbol builds), or of a ``--symbols`` file
(an unstripped copy or ``objcopy --only-keep-debug`` file) whose GNU build-id is the binary's. A stripped
release binary has neither: the tier is unavailable and tracing stays kernel-only.

Envoy's own functions are looked up by DEMANGLED pattern (``...::SslSocket::doRead(...)``), never by one
version's mangled name: a cheap pre-filter keeps the symbols whose raw name holds every identifier of the
pattern (Itanium mangling spells each identifier as it is), and only those are demangled.

Addresses: every value here is an ELF virtual address (``st_value``). bcc 0.26's
``attach_uprobe(name=PATH, addr=VADDR)`` takes exactly that and turns it into a file offset through the
PT_LOAD headers of PATH (checked by a real attach on a PIE whose text's vaddr != file offset, as in Envoy's
lld-linked build: tests/e2e/test_uprobes.py). A debug file has the binary's layout (same build-id), so its
addresses are attached to the *running binary*.
"""

from __future__ import annotations

import os
import re
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from ..stacks.elf import ElfFacts, NotElfError, SymbolSection, read_elf_facts
from ..stacks.symtab import demangle

__all__ = ["ATTACHED", "ENVOY_FUNCTIONS", "SSL_FUNCTIONS", "BinaryUprobes", "UprobeFunction", "UprobeSite",
           "discover", "plan_uprobes", "uprobe_sites"]

#: BoringSSL's C functions (same names in OpenSSL): what each gives the tier
SSL_FUNCTIONS = {
    "SSL_read": "plaintext read on a TLS connection",
    "SSL_write": "plaintext written on a TLS connection",
    "SSL_do_handshake": "ties an SSL object to its socket before its first read",
}
#: the functions the tier needs; without them it is unavailable
REQUIRED = ("SSL_read", "SSL_write")
#: Envoy functions by demangled pattern (found and reported by doctor; not attached yet)
ENVOY_FUNCTIONS = {
    "SslSocket::doRead": r"::SslSocket::doRead\(",
    "SslSocket::doWrite": r"::SslSocket::doWrite\(",
    "SslSocket::doHandshake": r"::SslSocket::doHandshake\(",
}
#: what the kernel side attaches: function -> (entry program, return program or None)
ATTACHED = {
    "SSL_read": ("ssl_read_enter", "ssl_read_return"),
    "SSL_write": ("ssl_write_enter", "ssl_write_return"),
    "SSL_do_handshake": ("ssl_handshake_enter", None),
}

_STT_FUNC, _STT_GNU_IFUNC = 2, 10
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True, slots=True)
class UprobeFunction:
    """One function found: its symbol and ELF virtual address."""

    name: str  # the role: "SSL_read", "SslSocket::doRead", ...
    symbol: str  # demangled symbol name
    vaddr: int
    size: int


@dataclass(frozen=True, slots=True)
class UprobeSite:
    """One place to attach: the running binary, the function's ELF virtual address, the BPF programs."""

    binary: str
    vaddr: int
    function: str
    entry: str
    ret: str | None


@dataclass(frozen=True, slots=True)
class BinaryUprobes:
    """What the uprobe tier can do on one binary, and why not."""

    binary: str  # the running binary's path
    build_id: str | None
    symbols_from: str | None  # the file whose symbol table was read (the binary or a --symbols file)
    functions: dict[str, UprobeFunction] = field(default_factory=dict)
    reason: str = ""  # why the tier is unavailable ("" when it is available)

    @property
    def available(self) -> bool:
        """True when every required function was found."""
        return not self.reason

    def sites(self) -> list[UprobeSite]:
        """The uprobes and uretprobes to attach (empty when unavailable)."""
        if not self.available:
            return []
        return [UprobeSite(self.binary, fn.vaddr, name, *ATTACHED[name])
                for name, fn in self.functions.items() if name in ATTACHED]

    def summary(self) -> str:
        """One line for doctor and the log."""
        found = ", ".join(f"{name} @ {fn.vaddr:#x}" for name, fn in self.functions.items()) or "none"
        source = f" (symbols from {self.symbols_from})" if self.symbols_from else ""
        if self.available:
            return f"available{source}: {found}"
        return f"unavailable: {self.reason}{source}" + (f"; found {found}" if self.functions else "")


def _read_section(path: str, section: SymbolSection) -> tuple[bytes, bytes]:
    with open(path, "rb") as f:
        f.seek(section.offset)
        raw = f.read(section.size)
        f.seek(section.strtab_offset)
        strtab = f.read(section.strtab_size)
    return raw, strtab


def _string_at(strtab: bytes, off: int) -> bytes:
    end = strtab.find(b"\0", off)
    return strtab[off:end if end >= 0 else len(strtab)]


def _candidate_offsets(strtab: bytes, identifiers: Iterable[str]) -> set[int]:
    """Every offset inside a string of ``strtab`` that contains the first identifier (names may start
    inside another string: linkers merge common suffixes)."""
    out: set[int] = set()
    first = next(iter(identifiers), "").encode()
    if not first:
        return out
    pos = strtab.find(first)
    while pos >= 0:
        start = strtab.rfind(b"\0", 0, pos) + 1
        end = strtab.find(b"\0", pos)
        out.update(range(start, pos + 1))
        pos = strtab.find(first, end if end >= 0 else len(strtab))
    return out


def find_functions(path: str, facts: ElfFacts, section: SymbolSection) -> dict[str, UprobeFunction]:
    """The SSL_FUNCTIONS and ENVOY_FUNCTIONS defined in one symbol table of ``path``."""
    raw, strtab = _read_section(path, section)
    wanted_c = {name.encode(): name for name in SSL_FUNCTIONS}
    c_offsets: dict[int, str] = {}
    for encoded, name in wanted_c.items():
        pos = strtab.find(b"\0" + encoded + b"\0")
        while pos >= 0:
            c_offsets[pos + 1] = name
            pos = strtab.find(b"\0" + encoded + b"\0", pos + 1)
    patterns = {role: (re.compile(rx), _IDENT.findall(rx.replace(r"\(", ""))) for role, rx in
                ENVOY_FUNCTIONS.items()}
    cxx_offsets: set[int] = set()
    for _rx, idents in patterns.values():
        cxx_offsets |= _candidate_offsets(strtab, idents)
    endian = "<" if facts.little_endian else ">"
    fmt, size = (endian + "IBBHQQ", 24) if facts.is64 else (endian + "IIIBBH", 16)
    if section.entsize != size:
        return {}
    found: dict[str, UprobeFunction] = {}
    for fields in struct.iter_unpack(fmt, raw[: len(raw) - len(raw) % size]):
        if facts.is64:
            name_off, info, _other, shndx, value, sym_size = fields
        else:
            name_off, value, sym_size, info, _other, shndx = fields
        if name_off not in c_offsets and name_off not in cxx_offsets:
            continue
        if (info & 0xF) not in (_STT_FUNC, _STT_GNU_IFUNC) or shndx == 0 or value == 0:
            continue
        name = c_offsets.get(name_off)
        if name is not None:
            if name not in found or info >> 4 == 1:  # a GLOBAL definition wins over a LOCAL one
                found[name] = UprobeFunction(name, name, value, sym_size)
            continue
        mangled = _string_at(strtab, name_off).decode("utf-8", "replace")
        for role, (rx, idents) in patterns.items():
            if role in found or not all(i in mangled for i in idents):
                continue
            symbol = demangle(mangled)
            if rx.search(symbol):
                found[role] = UprobeFunction(role, symbol, value, sym_size)
    order = [*SSL_FUNCTIONS, *ENVOY_FUNCTIONS]
    return {name: found[name] for name in order if name in found}


def discover(binary: str, symbols_files: Sequence[str] = ()) -> BinaryUprobes:
    """The uprobe tier on ``binary``: its own ``.symtab``, else a ``symbols_files`` entry with its build-id.

    Never raises for a missing or odd file: the reason says what is wrong.
    """
    try:
        facts = read_elf_facts(binary)
    except (OSError, NotElfError) as exc:
        return BinaryUprobes(binary, None, None, reason=f"not a readable ELF file ({exc})")
    source, section = binary, facts.symtab
    if section is None:
        match = None
        for path in symbols_files:
            try:
                other = read_elf_facts(path)
            except (OSError, NotElfError):
                continue
            if facts.build_id is not None and other.build_id == facts.build_id and other.symtab is not None:
                match = (path, other)
                break
        if match is None:
            dynamic = facts.dynsym.count if facts.dynsym else 0
            why = (f"stripped (only {dynamic} .dynsym entries) and no --symbols file with its build-id "
                   f"{facts.build_id}" if facts.build_id else
                   f"stripped (only {dynamic} .dynsym entries) and no build-id to match a --symbols file")
            functions = find_functions(binary, facts, facts.dynsym) if facts.dynsym else {}
            if all(name in functions for name in REQUIRED):  # exported (unusual for a static BoringSSL)
                return BinaryUprobes(binary, facts.build_id, binary, functions)
            return BinaryUprobes(binary, facts.build_id, None, functions, reason=why)
        source, facts_of_source = match
        section = facts_of_source.symtab
        functions = find_functions(source, facts_of_source, section)  # type: ignore[arg-type]
    else:
        functions = find_functions(binary, facts, section)
    missing = [name for name in REQUIRED if name not in functions]
    reason = f"no {' or '.join(missing)} in {source}'s symbols (no SSL library linked in)" if missing else ""
    return BinaryUprobes(binary, facts.build_id, source, functions, reason)


def _binary_of(pid: int) -> tuple[str, tuple[int, int]] | None:
    path = f"/proc/{pid}/exe"
    try:
        st = os.stat(path)
    except OSError:
        return None
    return path, (st.st_dev, st.st_ino)


def plan_uprobes(pids: Iterable[int], symbols_files: Sequence[str] = ()) -> list[BinaryUprobes]:
    """The uprobe tier of each distinct binary the processes run (one entry per file: several processes
    of one binary share its uprobes, which the kernel filters by target)."""
    seen: set[tuple[int, int]] = set()
    out: list[BinaryUprobes] = []
    for pid in pids:
        found = _binary_of(pid)
        if found is None or found[1] in seen:
            continue
        seen.add(found[1])
        out.append(discover(found[0], symbols_files))
    return out


def uprobe_sites(pids: Iterable[int], symbols_files: Sequence[str] = ()) -> tuple[UprobeSite, ...]:
    """Every uprobe site of the processes' binaries, each binary's tier logged in one line (the daemon's
    call: an empty tuple leaves the kernel tier exactly as it is without symbols)."""
    import logging

    log = logging.getLogger("otel_envoy.probes")
    sites: list[UprobeSite] = []
    for plan in plan_uprobes(pids, symbols_files):
        log.info("uprobe tier on %s: %s", plan.binary, plan.summary())
        sites.extend(plan.sites())
    return tuple(sites)

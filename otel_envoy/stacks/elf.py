"""Cheap ELF facts for symbolization and `doctor`: GNU build-id, PT_LOAD segments, where symbol tables are.

:func:`read_elf_facts` reads only the ELF header, the program and section headers and the build-id note
(a few KB, even for a 100+ MB stripped Envoy), so it is fine to call for every mapped module. Symbol
tables are parsed later, on demand, by :mod:`otel_envoy.stacks.symtab`.

Address convention: a runtime address inside a mapping becomes a *file offset*
(``addr - mapping.start + mapping.offset``) and then an *ELF virtual address* through the PT_LOAD segment
holding that offset (``offset - p_offset + p_vaddr``). The ELF virtual address is what ``.symtab`` /
``.dynsym`` values, ``addr2line -e FILE 0xVADDR`` and ``llvm-symbolizer --obj=FILE 0xVADDR`` use, for
PIE executables, shared libraries and fixed-address executables alike.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import BinaryIO

__all__ = ["ElfFacts", "LoadSegment", "NotElfError", "SymbolSection", "read_build_id", "read_debuglink",
           "read_elf_facts"]

_PF_X = 0x1


class NotElfError(ValueError):
    """The file is not a (readable) ELF file; the message is one line."""


@dataclass(frozen=True, slots=True)
class LoadSegment:
    """One PT_LOAD program header."""

    offset: int
    vaddr: int
    filesz: int
    memsz: int
    executable: bool


@dataclass(frozen=True, slots=True)
class SymbolSection:
    """Where a symbol table (``.symtab`` or ``.dynsym``) and its string table lie in the file."""

    name: str
    offset: int
    size: int
    entsize: int
    strtab_offset: int
    strtab_size: int

    @property
    def count(self) -> int:
        """Number of entries, including the null entry 0."""
        return self.size // self.entsize if self.entsize else 0


@dataclass(frozen=True, slots=True)
class ElfFacts:
    """Header-level facts about one ELF file."""

    path: str
    build_id: str | None  # lowercase hex of NT_GNU_BUILD_ID, None if the file has none
    elf_type: str  # "ET_DYN" (PIE / shared object), "ET_EXEC", ...
    is64: bool
    little_endian: bool
    segments: tuple[LoadSegment, ...]
    symtab: SymbolSection | None  # a non-empty .symtab (absent in stripped files)
    dynsym: SymbolSection | None  # a non-empty .dynsym (exported / imported symbols only)

    @property
    def has_symtab(self) -> bool:
        """True when the file carries a full ``.symtab`` (i.e. is not stripped)."""
        return self.symtab is not None

    def vaddr_for_offset(self, file_offset: int, executable: bool = True) -> int | None:
        """The ELF virtual address of ``file_offset`` through the PT_LOAD segment that maps it.

        Adjacent segments may share a file page; ``executable`` prefers the segment whose PF_X flag
        matches the mapping's. None if no segment holds the offset.
        """
        fallback = None
        for seg in self.segments:
            if seg.offset <= file_offset < seg.offset + max(seg.filesz, 1):
                vaddr = file_offset - seg.offset + seg.vaddr
                if seg.executable == executable:
                    return vaddr
                if fallback is None:
                    fallback = vaddr
        return fallback


class _RawHeaders:
    """Program and section headers by index, parsed from the header tables with pyelftools' public structs.

    ``ELFFile.iter_segments``/``iter_sections`` (and ``get_segment``/``get_section``) build Segment and
    Section objects, and some of those parse whole tables on construction (e.g. ``.gnu.hash``): measured with
    pyelftools 0.33, that makes reading the facts of libc 1.5 -> 5.8 ms and of libcrypto 0.9 -> 4.3 ms, paid
    for every module mapped into a traced process. ``ELFFile.structs`` and ``struct_parse`` read the same
    headers the way pyelftools does internally, without the objects.
    """

    def __init__(self, elf) -> None:
        from elftools.common.exceptions import ELFError
        from elftools.common.utils import struct_parse

        self.elf = elf
        self._parse = struct_parse
        self._stream = elf.stream
        self._phdr, self._shdr = elf.structs.Elf_Phdr, elf.structs.Elf_Shdr
        self._phoff, self._phentsize = elf["e_phoff"], elf["e_phentsize"]
        self._shoff, self._shentsize = elf["e_shoff"], elf["e_shentsize"]
        if self._phoff > 0 and self._phentsize < self._phdr.sizeof():
            raise ELFError(f"too small e_phentsize: {self._phentsize}")
        if self._shoff > 0 and self._shentsize < self._shdr.sizeof():
            raise ELFError(f"too small e_shentsize: {self._shentsize}")
        self._shstrtab = None

    def segment(self, index: int):
        """The program header (Elf_Phdr) at ``index``."""
        return self._parse(self._phdr, self._stream, self._phoff + index * self._phentsize)

    def section(self, index: int):
        """The section header (Elf_Shdr) at ``index``."""
        return self._parse(self._shdr, self._stream, self._shoff + index * self._shentsize)

    def section_name(self, header) -> str:
        """A section's name, from the section-header string table."""
        if self._shstrtab is None:
            from elftools.elf.sections import StringTableSection

            self._shstrtab = StringTableSection(self.section(self.elf.get_shstrndx()), "", self.elf)
        return self._shstrtab.get_string(header.sh_name)


def _symbol_section(headers: _RawHeaders, header) -> SymbolSection | None:
    elf = headers.elf
    entsize = header.sh_entsize or (24 if elf.elfclass == 64 else 16)
    if header.sh_size <= entsize:  # only the null symbol
        return None
    if not 0 < header.sh_link < elf.num_sections():
        return None
    strtab = headers.section(header.sh_link)
    if strtab.sh_type != "SHT_STRTAB":
        return None
    return SymbolSection(
        name=headers.section_name(header),
        offset=header.sh_offset,
        size=header.sh_size,
        entsize=entsize,
        strtab_offset=strtab.sh_offset,
        strtab_size=strtab.sh_size,
    )


def _build_id(elf, offset: int, size: int) -> str | None:
    from elftools.elf.notes import iter_notes

    for note in iter_notes(elf, offset, size):
        if note["n_type"] == "NT_GNU_BUILD_ID":
            desc = note["n_desc"]
            return desc.hex() if isinstance(desc, bytes) else str(desc).lower()
    return None


def _facts_from_stream(stream: BinaryIO, path: str) -> ElfFacts:
    from elftools.elf.elffile import ELFFile

    try:
        elf = ELFFile(stream)
        headers = _RawHeaders(elf)
        segments = []
        note_segments = []
        for i in range(elf.num_segments()):
            h = headers.segment(i)
            if h.p_type == "PT_LOAD":
                segments.append(
                    LoadSegment(h.p_offset, h.p_vaddr, h.p_filesz, h.p_memsz, bool(h.p_flags & _PF_X))
                )
            elif h.p_type == "PT_NOTE":
                note_segments.append((h.p_offset, h.p_filesz))
        build_id = None
        symtab = dynsym = None
        for i in range(elf.num_sections()):
            h = headers.section(i)
            if h.sh_type == "SHT_SYMTAB" and symtab is None:
                symtab = _symbol_section(headers, h)
            elif h.sh_type == "SHT_DYNSYM" and dynsym is None:
                dynsym = _symbol_section(headers, h)
            elif h.sh_type == "SHT_NOTE" and build_id is None:
                build_id = _build_id(elf, h.sh_offset, h.sh_size)
        if build_id is None and elf.num_sections() == 0:
            # No section headers (unusual): the PT_NOTE segments still carry the note.
            for offset, size in note_segments:
                build_id = _build_id(elf, offset, size)
                if build_id:
                    break
        return ElfFacts(
            path=path,
            build_id=build_id,
            elf_type=str(elf.header.e_type),
            is64=elf.elfclass == 64,
            little_endian=elf.little_endian,
            segments=tuple(segments),
            symtab=symtab,
            dynsym=dynsym,
        )
    except OSError:
        raise
    except Exception as exc:  # ELFError, and the assorted errors pyelftools/construct raise on junk input
        raise NotElfError(f"{path}: not a readable ELF file ({exc or type(exc).__name__})") from exc


def read_elf_facts(path: str | os.PathLike[str]) -> ElfFacts:
    """Read the header-level :class:`ElfFacts` of ``path``.

    Raises OSError if the file cannot be opened, :class:`NotElfError` if it is not ELF.
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        if f.read(4) != b"\x7fELF":
            raise NotElfError(f"{path}: not an ELF file")
        f.seek(0)
        return _facts_from_stream(f, path)


def read_build_id(path: str | os.PathLike[str]) -> str | None:
    """The GNU build-id of ``path`` as lowercase hex (None if it has none). Reads headers only."""
    return read_elf_facts(path).build_id


def read_debuglink(path: str | os.PathLike[str]) -> str | None:
    """The file name in ``.gnu_debuglink`` (where a separate debug file of ``path`` is looked for), None if
    the file has no such section. Parses every section header (fine for `doctor`, not per mapped module).

    Raises OSError if the file cannot be opened, :class:`NotElfError` if it is not ELF.
    """
    from elftools.elf.elffile import ELFFile

    path = os.fspath(path)
    with open(path, "rb") as f:
        try:
            section = ELFFile(f).get_section_by_name(".gnu_debuglink")
            data = None if section is None else section.data()
        except OSError:
            raise
        except Exception as exc:  # as in _facts_from_stream
            raise NotElfError(f"{path}: not a readable ELF file ({exc or type(exc).__name__})") from exc
    return None if data is None else data.split(b"\0", 1)[0].decode(errors="replace")

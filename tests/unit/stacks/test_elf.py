"""ELF facts (stacks/elf.py) of real binaries: the compiled C++ server (conftest.py) and system libraries."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from otel_envoy.stacks import NotElfError, read_build_id, read_debuglink, read_elf_facts, read_maps
from otel_envoy.stacks.elf import SymbolSection
from tests.support.cxx_build import CxxServerBuild

HEX40 = re.compile(r"[0-9a-f]{40}")


def test_builds_share_one_build_id(build: CxxServerBuild) -> None:
    ids = {p.name: read_build_id(p) for p in (build.unstripped, build.stripped, build.debug)}
    assert HEX40.fullmatch(ids["server"]), ids
    assert len(set(ids.values())) == 1, ids
    assert read_elf_facts(build.unstripped).has_symtab
    assert not read_elf_facts(build.stripped).has_symtab
    assert read_elf_facts(build.debug).has_symtab


def test_debuglink_is_read_only_where_there_is_one(build: CxxServerBuild, tmp_path: Path) -> None:
    linked = tmp_path / "server-linked"
    subprocess.run(["objcopy", f"--add-gnu-debuglink={build.debug}", str(build.stripped), str(linked)],
                   check=True)
    assert read_debuglink(linked) == build.debug.name
    assert read_debuglink(build.unstripped) is None
    assert read_build_id(linked) == read_build_id(build.stripped)


def test_junk_is_not_elf(tmp_path: Path) -> None:
    text = tmp_path / "text"
    text.write_text("not an ELF\n")
    truncated = tmp_path / "truncated"
    truncated.write_bytes(Path(sys.executable).resolve().read_bytes()[:100])
    for path in (text, truncated):
        for read in (read_elf_facts, read_debuglink):
            with pytest.raises(NotElfError, match=f"^{re.escape(str(path))}: not a"):
                read(path)
    with pytest.raises(OSError):
        read_elf_facts(tmp_path / "missing")


def _public_api_facts(path: Path) -> tuple:
    """What read_elf_facts reports, read the slow way, through pyelftools' Section and Segment objects."""
    from elftools.elf.elffile import ELFFile

    def table(section) -> tuple | None:
        if section is None or section["sh_size"] <= section["sh_entsize"]:
            return None
        strtab = elf.get_section(section["sh_link"])
        return (section.name, section["sh_offset"], section["sh_size"], section["sh_entsize"],
                strtab["sh_offset"], strtab["sh_size"])

    with open(path, "rb") as f:
        elf = ELFFile(f)
        loads = tuple((s["p_offset"], s["p_vaddr"], s["p_filesz"], s["p_memsz"], bool(s["p_flags"] & 1))
                      for s in elf.iter_segments("PT_LOAD"))
        build_id = next((n["n_desc"] for s in elf.iter_sections("SHT_NOTE") for n in s.iter_notes()
                         if n["n_type"] == "NT_GNU_BUILD_ID"), None)
        return (build_id, loads, table(next(elf.iter_sections("SHT_SYMTAB"), None)),
                table(next(elf.iter_sections("SHT_DYNSYM"), None)))


def _as_tuple(table: SymbolSection | None) -> tuple | None:
    if table is None:
        return None
    return (table.name, table.offset, table.size, table.entsize, table.strtab_offset, table.strtab_size)


def test_raw_headers_agree_with_pyelftools_sections(build: CxxServerBuild) -> None:
    libs = [m.file_path for m in read_maps(os.getpid()) if ".so" in m.file_path]
    paths = sorted({Path(p) for p in libs if Path(p).is_file()})[:8]
    assert paths
    for path in [build.unstripped, build.stripped, build.debug, *paths]:
        facts = read_elf_facts(path)
        loads = tuple((s.offset, s.vaddr, s.filesz, s.memsz, s.executable) for s in facts.segments)
        got = (facts.build_id, loads, _as_tuple(facts.symtab), _as_tuple(facts.dynsym))
        assert got == _public_api_facts(path), path

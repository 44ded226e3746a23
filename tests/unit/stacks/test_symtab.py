"""Symbol tables (stacks/symtab.py): demangling, and lookups in the stripped Envoy's exports."""

from __future__ import annotations

import re

import pytest

from otel_envoy.stacks import SymbolTable, demangle, read_elf_facts
from tests.support.cxx_build import WAIT_FOR_CLIENT, WAIT_MANGLED

HEX40 = re.compile(r"[0-9a-f]{40}")


def test_stripped_envoy_build_id_and_exports() -> None:
    from otel_envoy.lab.lab import find_envoy_binary

    try:
        envoy = find_envoy_binary()
    except RuntimeError as exc:
        pytest.skip(str(exc))
    facts = read_elf_facts(envoy)
    assert HEX40.fullmatch(facts.build_id or ""), facts.build_id
    assert not facts.has_symtab
    if facts.dynsym is None:
        return
    table = SymbolTable.load(envoy, facts, facts.dynsym)
    from elftools.elf.elffile import ELFFile

    with open(envoy, "rb") as f:
        exports = [
            s
            for s in ELFFile(f).get_section_by_name(".dynsym").iter_symbols()
            if s["st_info"]["type"] == "STT_FUNC" and s["st_shndx"] != "SHN_UNDEF" and s["st_size"] > 1
        ]
    if not exports:
        return
    value = exports[0]["st_value"]
    aliases = {demangle(s.name) for s in exports if s["st_value"] == value}
    found = table.lookup(value + 1)
    assert found is not None and found[0] in aliases and found[1] == 1, (found, aliases)
    assert read_elf_facts(envoy).build_id == facts.build_id


def test_demangle_keeps_what_it_cannot_demangle() -> None:
    assert demangle(WAIT_MANGLED) == WAIT_FOR_CLIENT
    assert demangle("_Zxx_not_a_name") == "_Zxx_not_a_name"
    assert demangle("main") == "main"

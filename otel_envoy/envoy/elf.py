"""ELF facts about a target binary with pyelftools: build-id, symbol counts, debug link."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["BinaryInfo", "describe_binary"]


@dataclass(slots=True)
class BinaryInfo:
    """What `doctor` and symbolization need to know about a binary."""

    path: str
    build_id: str | None = None
    symbols: int = 0  # entries in .symtab (0 = stripped)
    dynamic_symbols: int = 0
    debuglink: str | None = None
    error: str | None = None


def describe_binary(path: str) -> BinaryInfo:
    """Read the ELF headers of ``path``; errors are reported in ``.error``, never raised."""
    from elftools.common.exceptions import ELFError
    from elftools.elf.elffile import ELFFile

    info = BinaryInfo(path)
    try:
        with open(path, "rb") as f:
            elf = ELFFile(f)
            for section in elf.iter_sections():
                if section.name == ".symtab":
                    info.symbols = section.num_symbols()
                elif section.name == ".dynsym":
                    info.dynamic_symbols = section.num_symbols()
                elif section.name == ".gnu_debuglink":
                    info.debuglink = section.data().split(b"\0", 1)[0].decode(errors="replace")
                elif section.header.sh_type == "SHT_NOTE":
                    for note in section.iter_notes():
                        if note["n_type"] == "NT_GNU_BUILD_ID":
                            info.build_id = note["n_desc"]
    except (OSError, ELFError) as exc:
        info.error = f"{path}: not a readable ELF file ({exc})"
    return info

"""``--symbols FILE``: an unstripped copy of a binary or its ``objcopy --only-keep-debug`` file.

The file is matched to a mapped module by GNU build-id, so it must have one, and it must carry a
``.symtab``. Any problem is a :class:`SymbolsFileError` with a one-line message (the CLI prints
``error: <message>`` and exits 1).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .elf import ElfFacts, NotElfError, read_elf_facts

__all__ = ["SymbolsFile", "SymbolsFileError", "load_symbols_file"]


class SymbolsFileError(ValueError):
    """A ``--symbols`` file is missing, unreadable, not ELF, or unusable; the message is one line."""


@dataclass(frozen=True, slots=True)
class SymbolsFile:
    """A validated symbols file."""

    path: str
    build_id: str
    facts: ElfFacts


def load_symbols_file(path: str | os.PathLike[str]) -> SymbolsFile:
    """Validate ``path`` as a symbols file (headers only; the symbol table is parsed when first needed)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise SymbolsFileError(f"--symbols {path}: no such file")
    if not os.path.isfile(path):
        raise SymbolsFileError(f"--symbols {path}: not a regular file")
    try:
        facts = read_elf_facts(path)
    except NotElfError:
        raise SymbolsFileError(f"--symbols {path}: not an ELF file") from None
    except OSError as exc:
        raise SymbolsFileError(f"--symbols {path}: cannot be read ({exc.strerror or exc})") from None
    if facts.build_id is None:
        raise SymbolsFileError(
            f"--symbols {path}: has no GNU build-id, so it cannot be matched to a running binary"
        )
    if facts.symtab is None:
        raise SymbolsFileError(f"--symbols {path}: has no symbol table (.symtab); it is stripped")
    return SymbolsFile(path=path, build_id=facts.build_id, facts=facts)

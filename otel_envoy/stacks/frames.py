"""Stack frames and their text form (one string per frame, for ``list[str]`` span attributes).

Text forms (a stack is a list of them, innermost frame first):

* ``demo::wait_for_client(int)+0x1a (server)`` -- user frame named by a symbol table: demangled function,
  hex offset into it, module basename in parentheses.
* ``envoy+0x2a3f1c4`` -- no symbol covers the address (stripped binary): module basename + ELF virtual
  address, to give later to ``addr2line -f -C -e <unstripped or .debug file> 0x2a3f1c4`` or
  ``llvm-symbolizer --obj=<file> 0x2a3f1c4`` (pick the file by the module's GNU build-id,
  :attr:`Frame.build_id`). For a mapped file that is not ELF the number is the file offset.
* ``[vdso]+0x9d3`` -- code pseudo mapping (``[vdso]``, ``[vsyscall]``, ``[uprobes]``): offset from its start.
* ``[unknown]`` -- anonymous memory (JIT), heap/stack, an unmapped address, or a process that is gone.
* ``schedule+0x4`` -- kernel frame in vmlinux; ``nft_do_chain+0x44 (nf_tables)`` -- in a kernel module.

Offsets are lowercase hex with ``0x``; the function offset is always written, ``+0x0`` included.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["UNKNOWN", "UNKNOWN_TEXT", "Frame", "kernel_frame_text"]

UNKNOWN_TEXT = "[unknown]"


@dataclass(frozen=True, slots=True)
class Frame:
    """One resolved user-space frame; ``str(frame)`` is its text form (see the module docstring)."""

    module: str | None = None  # basename of the mapped file, or "[vdso]"-like; None when unknown
    offset: int | None = None  # ELF virtual address in module (pseudo mapping: offset from its start)
    function: str | None = None  # demangled function name, None if no symbol covers the address
    function_offset: int = 0  # offset of the address from the function's start
    build_id: str | None = None  # GNU build-id (hex) of the module, when it has one
    path: str | None = None  # the module's path as mapped in the process

    @property
    def symbolized(self) -> bool:
        """True when the frame names a function."""
        return self.function is not None

    def __str__(self) -> str:
        if self.function is not None:
            return f"{self.function}+0x{self.function_offset:x} ({self.module})"
        if self.module is not None and self.offset is not None:
            return f"{self.module}+0x{self.offset:x}"
        return UNKNOWN_TEXT


UNKNOWN = Frame()


def kernel_frame_text(name: str, offset: int, module: str | None = None) -> str:
    """``name+0xoff`` for vmlinux, ``name+0xoff (module)`` for a kernel module."""
    text = f"{name}+0x{offset:x}"
    return f"{text} ({module})" if module else text

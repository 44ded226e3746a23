"""Stack symbolization: kernel and user stack addresses (from bcc stack traces) to readable frames.

>>> sym = Symbolizer(symbols=["/opt/envoy.debug"])   # doctest: +SKIP
>>> sym.user_stack(pid, [0x55d0c0a1b2c3, 0x7f3a2b1c4d5e])   # doctest: +SKIP
['Envoy::Event::DispatcherImpl::run(...)+0x5c (envoy)', 'read+0x12 (libc.so.6)']
>>> sym.kernel_frames([0xffffffff821f8be4])   # doctest: +SKIP
['schedule+0x4']

Modules: ``elf`` (build-id, segments, address convention), ``symtab`` (function symbols + demangling),
``maps`` (/proc/<pid>/maps), ``kernel`` (/proc/kallsyms), ``symbols_file`` (``--symbols``), ``frames``
(frame text format), ``symbolize`` (the cached :class:`Symbolizer`).
"""

from .elf import ElfFacts, NotElfError, read_build_id, read_debuglink, read_elf_facts
from .frames import UNKNOWN, UNKNOWN_TEXT, Frame, kernel_frame_text
from .kernel import KernelSymbols
from .maps import Mapping, ProcessMaps, parse_maps, read_maps
from .symbolize import ModuleInfo, Symbolizer, SymbolizerStats
from .symbols_file import SymbolsFile, SymbolsFileError, load_symbols_file
from .symtab import SymbolTable, demangle

__all__ = [
    "UNKNOWN",
    "UNKNOWN_TEXT",
    "ElfFacts",
    "Frame",
    "KernelSymbols",
    "Mapping",
    "ModuleInfo",
    "NotElfError",
    "ProcessMaps",
    "SymbolTable",
    "Symbolizer",
    "SymbolizerStats",
    "SymbolsFile",
    "SymbolsFileError",
    "demangle",
    "kernel_frame_text",
    "load_symbols_file",
    "parse_maps",
    "read_build_id",
    "read_debuglink",
    "read_elf_facts",
    "read_maps",
]

"""``Symbolizer``: stack addresses (bcc ``BPF_STACK_TRACE`` entries) to frames, cached, off the hot path.

Kernel addresses are looked up in ``/proc/kallsyms`` (read once). A user address of a pid is found in the
pid's ``/proc/<pid>/maps`` (cached per pid, re-read when an address falls outside the known mappings, at
most once per ``maps_refresh_interval``), turned into an ELF virtual address of the mapped file (see
:mod:`otel_envoy.stacks.elf`) and resolved with, in order of preference:

1. a ``--symbols`` file whose GNU build-id equals the module's,
2. the module's own ``.symtab``,
3. the module's ``.dynsym`` (exported functions only; a stripped Envoy still names its few exports),

else it stays ``module+0xVADDR`` and the frame carries the module's build-id for later symbolization.
Mapped files are opened through ``/proc/<pid>/map_files`` (then ``/proc/<pid>/root``), so binaries in
other mount namespaces and deleted-but-mapped files work when running as root.

Caching: modules are keyed by (device, inode, path) from the maps line, symbol tables by build-id, and
resolved frames by (module, file offset) in an LRU, so a repeated address costs one bisect in the pid's
maps plus one dict lookup. Frame text formats are described in :mod:`otel_envoy.stacks.frames`.

Limitation: a pid reused by a new process, or an ``exec`` in the same pid, keeps the old maps until an
address misses them; call :meth:`Symbolizer.forget` when a traced process exits. Return addresses are
resolved as given (not ``addr - 1``), like bcc does.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass

from .cache import LRUCache
from .elf import ElfFacts, NotElfError, SymbolSection, read_elf_facts
from .frames import UNKNOWN, UNKNOWN_TEXT, Frame, kernel_frame_text
from .kernel import KernelSymbols
from .maps import Mapping, ProcessMaps, read_maps
from .symbols_file import SymbolsFile, load_symbols_file
from .symtab import SymbolTable

__all__ = ["ModuleInfo", "Symbolizer", "SymbolizerStats"]

log = logging.getLogger("otel_envoy.stacks")

# Pseudo mappings that hold code (named in frames); [heap], [stack], [anon:...] do not, and give [unknown].
_CODE_PSEUDO_MAPPINGS = frozenset({"[vdso]", "[vsyscall]", "[uprobes]"})


@dataclass(slots=True)
class SymbolizerStats:
    """Counters of the work done (file reads, cache use): for tests and ``doctor``-style output."""

    maps_reads: int = 0  # /proc/<pid>/maps reads
    elf_reads: int = 0  # ELF header reads, one per new module
    symtab_loads: int = 0  # symbol tables parsed
    kallsyms_loads: int = 0  # /proc/kallsyms reads
    cache_hits: int = 0  # user + kernel frame cache
    cache_misses: int = 0

    @property
    def file_reads(self) -> int:
        """All file reads so far."""
        return self.maps_reads + self.elf_reads + self.symtab_loads + self.kallsyms_loads


@dataclass(frozen=True, slots=True)
class ModuleInfo:
    """What the symbolizer knows about one mapped file."""

    path: str
    name: str  # basename, as written in frames
    build_id: str | None
    symbol_source: str | None  # "symbols-file", "symtab", "dynsym" (exports only), or None
    symbols_file: str | None = None  # the matching --symbols file
    error: str | None = None  # why the file could not be read as ELF

    @property
    def symbolized(self) -> bool:
        """True when every function of the module can be named (a full symbol table is available)."""
        return self.symbol_source in ("symbols-file", "symtab")


@dataclass(slots=True)
class _Module:
    key: tuple[str, int, str]
    name: str
    path: str
    candidates: tuple[str, ...]  # paths to open, best first
    facts: ElfFacts | None
    error: str | None
    symbols_file: SymbolsFile | None
    table: SymbolTable | None = None
    table_loaded: bool = False

    def _empty_table(self) -> bool:
        # A loaded .dynsym without a defined function (a stripped executable's imports) names nothing.
        return self.table_loaded and (self.table is None or len(self.table) == 0)

    def info(self) -> ModuleInfo:
        if self.symbols_file is not None:
            source: str | None = "symbols-file"
        elif self.facts is not None and self.facts.symtab is not None:
            source = "symtab"
        elif self.facts is not None and self.facts.dynsym is not None and not self._empty_table():
            source = "dynsym"
        else:
            source = None
        return ModuleInfo(
            path=self.path,
            name=self.name,
            build_id=self.facts.build_id if self.facts else None,
            symbol_source=source,
            symbols_file=self.symbols_file.path if self.symbols_file else None,
            error=self.error,
        )


@dataclass(slots=True)
class _PidMaps:
    maps: ProcessMaps
    read_at: float


class Symbolizer:
    """Resolve kernel and user stack addresses to frames. Thread-safe; every method may block on file I/O,
    so call it from an executor, not the event loop's hot path."""

    def __init__(
        self,
        symbols: Iterable[str | os.PathLike[str]] = (),
        *,
        cache_size: int = 65536,
        max_pids: int = 1024,
        maps_refresh_interval: float = 1.0,
        proc: str = "/proc",
        kallsyms: str = "/proc/kallsyms",
    ) -> None:
        """``symbols``: ``--symbols`` files; raises :class:`SymbolsFileError` for a bad one."""
        self._symbols: dict[str, SymbolsFile] = {}
        for path in symbols:
            sf = load_symbols_file(path)
            if sf.build_id in self._symbols:
                log.warning(
                    "--symbols %s: same build-id as %s; ignored", sf.path, self._symbols[sf.build_id].path
                )
                continue
            self._symbols[sf.build_id] = sf
        self._proc = proc
        self._kallsyms_path = kallsyms
        self._refresh = maps_refresh_interval
        self._pids: LRUCache[int, _PidMaps] = LRUCache(max_pids)
        self._modules: dict[tuple[str, int, str], _Module] = {}
        self._tables: dict[tuple[str, str, str], SymbolTable | None] = {}
        self._frames: LRUCache[tuple[tuple[str, int, str], int, bool], Frame] = LRUCache(cache_size)
        self._kframes: LRUCache[int, str] = LRUCache(cache_size)
        self._kernel: KernelSymbols | None = None
        self._lock = threading.RLock()
        self.stats = SymbolizerStats()

    @property
    def symbols_files(self) -> tuple[SymbolsFile, ...]:
        """The validated ``--symbols`` files."""
        return tuple(self._symbols.values())

    # -- kernel ---------------------------------------------------------------------------------------

    def kernel_frames(self, addrs: Iterable[int]) -> list[str]:
        """Kernel addresses to ``name+0xoff`` / ``name+0xoff (module)`` / ``[unknown]``."""
        with self._lock:
            out = []
            for addr in addrs:
                text = self._kframes.get(addr)
                if text is None:
                    self.stats.cache_misses += 1
                    hit = self._kernel_symbols().lookup(addr)
                    text = kernel_frame_text(*hit) if hit else UNKNOWN_TEXT
                    self._kframes.put(addr, text)
                else:
                    self.stats.cache_hits += 1
                out.append(text)
            return out

    def load_kernel_symbols(self) -> int:
        """Read ``/proc/kallsyms`` now instead of at the first kernel stack (~0.1 s of CPU: start-up work,
        not the traced load's); returns the number of symbols."""
        with self._lock:
            return len(self._kernel_symbols())

    def _kernel_symbols(self) -> KernelSymbols:
        if self._kernel is None:
            self.stats.kallsyms_loads += 1
            self._kernel = KernelSymbols.load(self._kallsyms_path)
            if not len(self._kernel):
                log.warning("%s has no readable addresses (not root, or kptr_restrict)", self._kallsyms_path)
        return self._kernel

    # -- user -----------------------------------------------------------------------------------------

    def user_frames(self, pid: int, addrs: Iterable[int]) -> list[Frame]:
        """User addresses of ``pid`` to :class:`Frame` objects (``str(frame)`` is the text form).

        Never raises for a vanished process or an unreadable file: such frames are ``[unknown]`` or
        ``module+0xOFFSET``.
        """
        with self._lock:
            return [self._user_frame(pid, addr) for addr in addrs]

    def user_stack(self, pid: int, addrs: Iterable[int]) -> list[str]:
        """Like :meth:`user_frames`, as strings (ready for a ``list[str]`` span attribute)."""
        return [str(f) for f in self.user_frames(pid, addrs)]

    def _user_frame(self, pid: int, addr: int) -> Frame:
        mapping = self._mapping_for(pid, addr)
        if mapping is None:
            return UNKNOWN
        if not mapping.file_backed:
            if mapping.path in _CODE_PSEUDO_MAPPINGS:
                return Frame(module=mapping.path, offset=addr - mapping.start)
            return UNKNOWN
        module = self._module_for(pid, mapping)
        file_offset = mapping.file_offset(addr)
        key = (module.key, file_offset, mapping.executable)
        frame = self._frames.get(key)
        if frame is not None:
            self.stats.cache_hits += 1
            return frame
        self.stats.cache_misses += 1
        frame = self._resolve(module, file_offset, mapping.executable)
        self._frames.put(key, frame)
        return frame

    def _resolve(self, module: _Module, file_offset: int, executable: bool) -> Frame:
        facts = module.facts
        if facts is None:  # not ELF / unreadable: the file offset is all we can give
            return Frame(module=module.name, offset=file_offset, path=module.path)
        vaddr = facts.vaddr_for_offset(file_offset, executable)
        if vaddr is None:
            return Frame(module=module.name, offset=file_offset, build_id=facts.build_id, path=module.path)
        table = self._table_for(module)
        hit = table.lookup(vaddr) if table is not None else None
        return Frame(
            module=module.name,
            offset=vaddr,
            function=hit[0] if hit else None,
            function_offset=hit[1] if hit else 0,
            build_id=facts.build_id,
            path=module.path,
        )

    def _mapping_for(self, pid: int, addr: int) -> Mapping | None:
        state = self._pids.get(pid)
        if state is not None:
            mapping = state.maps.find(addr)
            if mapping is not None or time.monotonic() - state.read_at < self._refresh:
                return mapping
        return self._read_maps(pid, state).maps.find(addr)

    def _read_maps(self, pid: int, previous: _PidMaps | None) -> _PidMaps:
        self.stats.maps_reads += 1
        try:
            maps = read_maps(pid, self._proc)
        except OSError:  # gone: keep what we knew (late events still resolve), else nothing
            maps = previous.maps if previous is not None else ProcessMaps([])
        state = _PidMaps(maps, time.monotonic())
        self._pids.put(pid, state)
        return state

    def _module_for(self, pid: int, mapping: Mapping) -> _Module:
        key = (mapping.dev, mapping.inode, mapping.path)
        module = self._modules.get(key)
        if module is not None:
            return module
        path = mapping.file_path
        candidates = (
            f"{self._proc}/{pid}/map_files/{mapping.start:x}-{mapping.end:x}",
            f"{self._proc}/{pid}/root{path}",
            path,
        )
        facts, error, opened = None, None, None
        for candidate in candidates:
            try:
                self.stats.elf_reads += 1
                facts = read_elf_facts(candidate)
                opened = candidate
                break
            except NotElfError as exc:
                error = f"{path}: {str(exc).split(': ', 1)[-1]}"
                break
            except OSError as exc:
                error = f"{path}: cannot be read ({exc.strerror or exc})"
        if opened is not None:
            error = None
            # The map_files / root paths die with the process; keep them first, the plain path last.
            candidates = (opened, *(c for c in candidates if c != opened))
        symbols_file = self._symbols.get(facts.build_id) if facts and facts.build_id else None
        module = _Module(
            key=key,
            name=os.path.basename(path) or path,
            path=path,
            candidates=candidates,
            facts=facts,
            error=error,
            symbols_file=symbols_file,
        )
        self._modules[key] = module
        return module

    def _table_for(self, module: _Module) -> SymbolTable | None:
        if module.table_loaded:
            return module.table
        module.table_loaded = True
        facts = module.facts
        assert facts is not None
        if module.symbols_file is not None:
            sf = module.symbols_file
            assert sf.facts.symtab is not None
            module.table = self._load_table(
                ("file", sf.build_id, sf.path), [sf.path], sf.facts, sf.facts.symtab
            )
        elif facts.symtab is not None or facts.dynsym is not None:
            section = facts.symtab or facts.dynsym
            assert section is not None
            ident = facts.build_id or f"{module.key[0]}:{module.key[1]}:{module.path}"
            module.table = self._load_table(("own", ident, section.name), module.candidates, facts, section)
        return module.table

    def _load_table(
        self, key: tuple[str, str, str], paths: Iterable[str], facts: ElfFacts, section: SymbolSection
    ) -> SymbolTable | None:
        if key in self._tables:
            return self._tables[key]
        table = None
        for path in paths:
            try:
                if path != facts.path and facts.build_id and read_elf_facts(path).build_id != facts.build_id:
                    continue  # the plain path now names another file (upgraded on disk)
                self.stats.symtab_loads += 1
                table = SymbolTable.load(path, facts, section)
                break
            except (OSError, ValueError) as exc:
                log.debug("symbol table of %s: %s", path, exc)
        self._tables[key] = table
        return table

    # -- modules --------------------------------------------------------------------------------------

    def describe_modules(self, pid: int) -> list[ModuleInfo]:
        """The executable file mappings of ``pid`` (re-reads its maps; reads ELF headers, and ``.dynsym`` of
        files without ``.symtab`` -- never a full ``.symtab``).

        Empty if the process is gone.
        """
        with self._lock:
            state = self._read_maps(pid, self._pids.get(pid))
            seen: dict[tuple[str, int, str], ModuleInfo] = {}
            for mapping in state.maps:
                if mapping.executable and mapping.file_backed:
                    module = self._module_for(pid, mapping)
                    if (
                        module.facts is not None
                        and module.facts.symtab is None
                        and module.symbols_file is None
                    ):
                        self._table_for(module)  # a .dynsym (exports only) is small: see if it names anything
                    if module.key not in seen:
                        seen[module.key] = module.info()
            return list(seen.values())

    def modules(self) -> list[ModuleInfo]:
        """Every module met so far (in stacks or :meth:`describe_modules`)."""
        with self._lock:
            return [m.info() for m in self._modules.values()]

    def unmatched_symbols_files(self, pids: Iterable[int]) -> list[SymbolsFile]:
        """The ``--symbols`` files whose build-id matches no module mapped by ``pids``; each is logged as a
        warning (it will be ignored)."""
        build_ids = {info.build_id for pid in pids for info in self.describe_modules(pid)}
        unmatched = [sf for sf in self._symbols.values() if sf.build_id not in build_ids]
        for sf in unmatched:
            log.warning(
                "--symbols %s: build-id %s matches no binary of the traced processes; ignored",
                sf.path,
                sf.build_id,
            )
        return unmatched

    def forget(self, pid: int) -> None:
        """Drop the cached maps of ``pid`` (call when it exits; modules and symbol tables stay cached)."""
        with self._lock:
            self._pids.pop(pid)

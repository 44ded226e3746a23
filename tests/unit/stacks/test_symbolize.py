"""Stack symbolization (stacks/symbolize.py) against real binaries: a compiled C++ server (with symbols,
stripped, split debug file; the ``build`` fixture of conftest.py), libc and the running kernel's
/proc/kallsyms."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from otel_envoy.stacks import UNKNOWN, Symbolizer, SymbolsFileError, read_build_id, read_maps
from tests.support.cxx_build import WAIT_FOR_CLIENT, WAIT_MANGLED, CxxServerBuild, run_server

RET = 4  # a "return address" a few bytes into the function


# -- helpers ----------------------------------------------------------------------------------------


def symbol_value(path: Path, name: str) -> int:
    """A symbol's value from .symtab, read with pyelftools (independently of the code under test)."""
    from elftools.elf.elffile import ELFFile

    with open(path, "rb") as f:
        sym = ELFFile(f).get_section_by_name(".symtab").get_symbol_by_name(name)
        return sym[0]["st_value"]


def fresh(**kwargs) -> Symbolizer:
    return Symbolizer(maps_refresh_interval=0.0, **kwargs)


# -- the compiled server ------------------------------------------------------------------------------


def test_unstripped_server_frames_are_demangled(build: CxxServerBuild) -> None:
    sym = fresh()
    with run_server(build.unstripped) as srv:
        frames = sym.user_frames(srv.pid, [srv.addresses["wait_for_client"] + RET, srv.addresses["sum"]])
    wait, total = frames
    assert str(wait) == f"{WAIT_FOR_CLIENT}+0x{RET:x} (server)"
    assert wait.function == WAIT_FOR_CLIENT and wait.function_offset == RET
    assert wait.offset == symbol_value(build.unstripped, WAIT_MANGLED) + RET
    assert wait.build_id == read_build_id(build.unstripped)
    assert wait.path == str(build.unstripped)
    assert str(total).startswith("demo::Accumulator<long>::sum(std::vector<long")
    assert str(total).endswith("+0x0 (server)")


def test_stripped_server_gives_module_offset_and_build_id(build: CxxServerBuild) -> None:
    sym = fresh()
    with run_server(build.stripped) as srv:
        [frame] = sym.user_frames(srv.pid, [srv.addresses["wait_for_client"] + RET])
        modules = {m.name: m for m in sym.describe_modules(srv.pid)}
    vaddr = symbol_value(build.unstripped, WAIT_MANGLED) + RET
    assert str(frame) == f"server-stripped+0x{vaddr:x}"
    assert not frame.symbolized
    assert frame.build_id == read_build_id(build.unstripped)
    info = modules["server-stripped"]
    assert info.build_id == frame.build_id
    assert info.symbol_source is None and not info.symbolized  # its .dynsym holds imports only


def test_stripped_offset_is_what_addr2line_accepts(build: CxxServerBuild) -> None:
    if not shutil.which("addr2line"):
        pytest.skip("addr2line not installed")
    with run_server(build.stripped) as srv:
        [frame] = fresh().user_frames(srv.pid, [srv.addresses["wait_for_client"] + RET])
    out = subprocess.run(
        ["addr2line", "-f", "-C", "-e", str(build.unstripped), f"0x{frame.offset:x}"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert out.splitlines()[0] == WAIT_FOR_CLIENT


@pytest.mark.parametrize("which", ["unstripped", "debug"])
def test_symbols_override_resolves_the_stripped_server(build: CxxServerBuild, which: str) -> None:
    symbols = getattr(build, which)
    sym = fresh(symbols=[symbols])
    with run_server(build.stripped) as srv:
        frames = sym.user_stack(srv.pid, [srv.addresses["wait_for_client"] + RET])
        modules = {m.name: m for m in sym.describe_modules(srv.pid)}
        assert sym.unmatched_symbols_files([srv.pid]) == []
    assert frames == [f"{WAIT_FOR_CLIENT}+0x{RET:x} (server-stripped)"]
    info = modules["server-stripped"]
    assert info.symbol_source == "symbols-file" and info.symbolized
    assert info.symbols_file == str(symbols)


def test_symbols_file_matching_nothing_is_reported(build: CxxServerBuild, caplog) -> None:
    sym = fresh(symbols=[build.debug])
    with caplog.at_level("WARNING", logger="otel_envoy.stacks"):
        unmatched = sym.unmatched_symbols_files([os.getpid()])  # this Python maps no server
    assert [sf.path for sf in unmatched] == [str(build.debug)]
    assert "matches no binary" in caplog.text


def test_bad_symbols_files_raise_one_line_errors(build: CxxServerBuild, tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("not an ELF\n")
    no_id = tmp_path / "server-no-build-id"
    subprocess.run(
        ["objcopy", "--remove-section", ".note.gnu.build-id", str(build.unstripped), str(no_id)], check=True
    )
    cases = {
        tmp_path / "missing": "no such file",
        tmp_path: "not a regular file",
        text: "not an ELF file",
        build.stripped: "no symbol table",
        no_id: "no GNU build-id",
    }
    for path, reason in cases.items():
        with pytest.raises(SymbolsFileError) as err:
            Symbolizer(symbols=[path])
        message = str(err.value)
        assert "\n" not in message
        assert message.startswith(f"--symbols {path}: ") and reason in message, message


def test_deleted_binary_still_resolves_through_map_files(build: CxxServerBuild, tmp_path: Path) -> None:
    copy = tmp_path / "server"
    shutil.copy2(build.unstripped, copy)
    with run_server(copy) as srv:
        if not os.access(f"/proc/{srv.pid}/map_files", os.R_OK | os.X_OK):
            pytest.skip("/proc/<pid>/map_files needs root")
        copy.unlink()
        frames = fresh().user_stack(srv.pid, [srv.addresses["wait_for_client"] + RET])
    assert frames == [f"{WAIT_FOR_CLIENT}+0x{RET:x} (server)"]


# -- libc, vdso, anonymous memory ---------------------------------------------------------------------


def test_libc_addresses_resolve_through_dynsym(build: CxxServerBuild) -> None:
    sym = fresh()
    with run_server(build.unstripped) as srv:
        [read] = sym.user_frames(srv.pid, [srv.addresses["read"] + RET])
        # The real user pc of the blocked read(2): the kernel's view of the sleeping thread.
        pc = int(Path(f"/proc/{srv.pid}/syscall").read_text().split()[-1], 16)
        [blocked] = sym.user_frames(srv.pid, [pc])
        libc_path = next(m.file_path for m in read_maps(srv.pid) if m.file_path.endswith(read.module or "?"))
    assert read.module is not None and read.module.startswith("libc.so")
    assert read.function in {"read", "__read", "__libc_read"}
    assert str(read) == f"{read.function}+0x{RET:x} ({read.module})"
    assert blocked.module == read.module
    assert blocked.build_id == read.build_id == read_build_id(libc_path)


def test_pseudo_and_anonymous_mappings(build: CxxServerBuild) -> None:
    sym = fresh()
    with run_server(build.unstripped) as srv:
        maps = {m.path: m for m in read_maps(srv.pid)}
        addrs = [maps[name].start + 0x10 for name in ("[vdso]", "[stack]") if name in maps]
        frames = sym.user_stack(srv.pid, [*addrs, 0x10])
    expected = ["[vdso]+0x10", "[unknown]"][: len(addrs)]
    assert frames == [*expected, "[unknown]"]


def test_exited_process_gives_unknown_frames() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    sym = fresh()
    assert sym.user_frames(proc.pid, [0x401000, 0x7F0000001000]) == [UNKNOWN, UNKNOWN]
    assert sym.user_stack(proc.pid, [0x401000]) == ["[unknown]"]
    assert sym.describe_modules(proc.pid) == []


def test_maps_seen_before_exit_still_resolve(build: CxxServerBuild) -> None:
    sym = fresh()
    with run_server(build.unstripped) as srv:
        addr = srv.addresses["wait_for_client"] + RET
        before = sym.user_stack(srv.pid, [addr])
    after = sym.user_stack(srv.pid, [addr, 0x10])  # late events of a process that just exited
    assert after == [*before, "[unknown]"]
    sym.forget(srv.pid)
    assert sym.user_stack(srv.pid, [addr]) == ["[unknown]"]


# -- caching --------------------------------------------------------------------------------------------


def test_second_lookup_reads_no_file(build: CxxServerBuild) -> None:
    sym = fresh()
    with run_server(build.unstripped) as srv:
        addrs = [srv.addresses["wait_for_client"] + RET, srv.addresses["sum"], srv.addresses["read"]]
        first = sym.user_stack(srv.pid, addrs)
        reads, hits = sym.stats.file_reads, sym.stats.cache_hits
        assert sym.stats.symtab_loads == 2  # the server's .symtab and libc's .dynsym, once each
        second = sym.user_stack(srv.pid, addrs)
    assert second == first
    assert sym.stats.file_reads == reads
    assert sym.stats.cache_hits == hits + len(addrs)


def test_maps_are_reread_only_on_a_miss_and_rate_limited(build: CxxServerBuild) -> None:
    with run_server(build.unstripped) as srv:
        addr = srv.addresses["wait_for_client"]
        eager, lazy = fresh(), Symbolizer(maps_refresh_interval=3600.0)
        for sym in (eager, lazy):
            sym.user_stack(srv.pid, [addr])
            sym.user_stack(srv.pid, [addr + 1])
            assert sym.stats.maps_reads == 1  # both addresses are in the known maps
            sym.user_stack(srv.pid, [0x10])  # outside every mapping
        assert eager.stats.maps_reads == 2
        assert lazy.stats.maps_reads == 1


# -- kernel --------------------------------------------------------------------------------------------


def _kallsyms() -> dict[int, set[str]]:
    by_addr: dict[int, set[str]] = {}
    for line in Path("/proc/kallsyms").read_text().splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[1] in "tTwW":
            by_addr.setdefault(int(parts[0], 16), set()).add(parts[2])
    return by_addr


@pytest.fixture(scope="module")
def kallsyms() -> dict[int, set[str]]:
    by_addr = _kallsyms()
    if 0 in by_addr or not by_addr:
        pytest.skip("/proc/kallsyms addresses are hidden (not root, or kptr_restrict)")
    return by_addr


@pytest.mark.parametrize("name", ["schedule", "do_syscall_64"])
def test_kernel_address_resolves_to_function_plus_offset(kallsyms: dict[int, set[str]], name: str) -> None:
    addr = next((a for a, names in kallsyms.items() if name in names), None)
    if addr is None:
        pytest.skip(f"{name} not in /proc/kallsyms")
    sym = Symbolizer()
    [frame] = sym.kernel_frames([addr + 4])
    chosen, _, offset = frame.partition("+")
    assert chosen in kallsyms[addr] and offset == "0x4", frame
    assert sym.kernel_frames([addr + 4, 1]) == [frame, "[unknown]"]
    assert sym.stats.kallsyms_loads == 1


def test_kernel_symbols_can_be_loaded_before_the_first_stack(kallsyms: dict[int, set[str]]) -> None:
    """The daemon reads kallsyms at start-up: the first stack under load does not pay for it."""
    addr = next(a for a, names in kallsyms.items() if "schedule" in names)
    sym = Symbolizer()
    assert sym.load_kernel_symbols() >= len(kallsyms) // 2  # text symbols only
    assert sym.stats.kallsyms_loads == 1
    assert sym.kernel_frames([addr])[0].partition("+")[0] in kallsyms[addr]
    assert sym.load_kernel_symbols() and sym.stats.kallsyms_loads == 1  # read once


def test_kernel_frames_agree_with_bcc(kallsyms: dict[int, set[str]]) -> None:
    bcc = pytest.importorskip("bcc")
    addr = next(a for a, names in kallsyms.items() if "schedule" in names)
    ours = Symbolizer().kernel_frames([addr + 8])[0].partition("+")[0]
    theirs = bcc.BPF.ksym(addr + 8).decode()
    assert {ours, theirs} <= kallsyms[addr]


"""Symbol discovery of the uprobe tier (probes/uprobe_symbols.py) on a C++ program built here.

The program (tests/e2e/uprobe_target/tls_server.cpp) defines BoringSSL's SSL_read/SSL_write/SSL_do_handshake
and Envoy's SslSocket::doRead/doWrite with the same names and signatures: these tests check the mechanism
(find by name, by demangled pattern, by build-id), not Envoy's own binary.
"""

from __future__ import annotations

import subprocess

import pytest

from otel_envoy.probes.uprobe_symbols import ENVOY_FUNCTIONS, discover, plan_uprobes, uprobe_sites
from otel_envoy.stacks.elf import read_elf_facts
from tests.support.uprobe_target import TEXT_VADDR, build_uprobe_target, run_target


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    return build_uprobe_target(tmp_path_factory.mktemp("uprobe-target"))


def _nm(path) -> dict[str, int]:
    """Symbol -> address, as binutils' nm reads them (the reference)."""
    out = subprocess.run(["nm", "--defined-only", str(path)], check=True, capture_output=True, text=True)
    return {parts[2]: int(parts[0], 16) for parts in (line.split() for line in out.stdout.splitlines())
            if len(parts) == 3}


def test_the_unstripped_binary_names_every_function_at_nm_s_address(target):
    tier = discover(str(target.unstripped))
    assert tier.available, tier.reason
    assert tier.symbols_from == str(target.unstripped)
    nm = _nm(target.unstripped)
    for name in ("SSL_read", "SSL_write", "SSL_do_handshake"):
        assert tier.functions[name].vaddr == nm[name]
        assert tier.functions[name].vaddr >= TEXT_VADDR  # linked where vaddr != file offset
    read = tier.functions["SslSocket::doRead"]
    assert read.symbol == ("Envoy::Extensions::TransportSockets::Tls::SslSocket::doRead("
                           "Envoy::Buffer::Instance&)")
    mangled = "_ZN5Envoy10Extensions16TransportSockets3Tls9SslSocket6doReadERNS_6Buffer8InstanceE"
    assert read.vaddr == nm[mangled]
    assert tier.functions["SslSocket::doWrite"].symbol.endswith(
        "::SslSocket::doWrite(Envoy::Buffer::Instance&, bool)")
    assert "SslSocket::doHandshake" not in tier.functions  # the target has none: not invented
    sites = {s.function: s for s in tier.sites()}
    assert set(sites) == {"SSL_read", "SSL_write", "SSL_do_handshake"}  # Envoy's are found, not attached
    assert (sites["SSL_read"].entry, sites["SSL_read"].ret) == ("ssl_read_enter", "ssl_read_return")
    assert sites["SSL_do_handshake"].ret is None
    assert "available" in tier.summary() and "SSL_read @ " in tier.summary()


def test_the_stripped_binary_says_why_the_tier_is_unavailable(target):
    tier = discover(str(target.stripped))
    assert not tier.available and tier.sites() == []
    build_id = read_elf_facts(target.stripped).build_id
    assert "stripped" in tier.reason and build_id in tier.reason
    assert tier.summary().startswith("unavailable: stripped")


def test_a_debug_file_matched_by_build_id_gives_the_addresses_for_the_running_binary(target):
    tier = discover(str(target.stripped), [str(target.unstripped.parent / "nothing"), str(target.debug)])
    assert tier.available, tier.reason
    assert tier.symbols_from == str(target.debug)
    assert {s.binary for s in tier.sites()} == {str(target.stripped)}  # attached to the binary that runs
    assert tier.functions["SSL_write"].vaddr == _nm(target.unstripped)["SSL_write"]


def test_a_debug_file_of_another_build_is_not_used(target, tmp_path):
    other = tmp_path / "other"
    _build_plain(tmp_path, other)
    subprocess.run(["objcopy", "--only-keep-debug", str(other), f"{other}.debug"], check=True)
    tier = discover(str(target.stripped), [f"{other}.debug"])
    assert not tier.available and "no --symbols file with its build-id" in tier.reason


def _build_plain(tmp_path, binary) -> None:
    source = tmp_path / "plain.c"
    source.write_text("int main(void) { return 0; }\n")
    subprocess.run(["gcc", "-g", "-Wl,--build-id", "-o", str(binary), str(source)], check=True)


def test_a_binary_without_an_ssl_library_is_unavailable_with_its_reason(tmp_path):
    binary = tmp_path / "plain"
    _build_plain(tmp_path, binary)
    tier = discover(str(binary))
    assert not tier.available and tier.reason.startswith("no SSL_read or SSL_write in ")
    assert discover(str(tmp_path / "missing")).reason.startswith("not a readable ELF file")


def test_envoy_functions_are_patterns_not_mangled_names():
    assert all(not rx.startswith("_Z") and "(" in rx for rx in ENVOY_FUNCTIONS.values())


def test_processes_of_one_binary_share_its_uprobes(target):
    with run_target(target.unstripped, target.cert) as running:
        plans = plan_uprobes([running.pid, running.pid])
        sites = uprobe_sites([running.pid])
    assert len(plans) == 1 and plans[0].available, plans
    assert {s.binary for s in sites} == {f"/proc/{running.pid}/exe"}  # the file the process runs
    assert uprobe_sites([]) == ()

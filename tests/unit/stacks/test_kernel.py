"""Kernel symbols (stacks/kernel.py): /proc/kallsyms text parsed into address lookups."""

from __future__ import annotations

from otel_envoy.stacks import KernelSymbols, kernel_frame_text


def test_kernel_symbols_parse_modules_aliases_and_hidden_addresses() -> None:
    text = (
        "ffffffff81000000 T _stext\n"
        "ffffffff81000000 T startup_64\n"
        "ffffffff81000100 D some_data\n"
        "ffffffff81000200 t helper\n"
        "ffffffffc0001000 t nft_do_chain\t[nf_tables]\n"
    )
    ks = KernelSymbols.parse(text)
    assert ks.lookup(0xFFFFFFFF81000010) == ("startup_64", 0x10, None)  # fewer leading underscores wins
    assert ks.lookup(0xFFFFFFFF81000150) == ("startup_64", 0x150, None)  # data symbols are ignored
    assert ks.lookup(0xFFFFFFFFC0001044) == ("nft_do_chain", 0x44, "nf_tables")
    assert ks.lookup(0xFFFFFFFF80000000) is None
    assert kernel_frame_text("nft_do_chain", 0x44, "nf_tables") == "nft_do_chain+0x44 (nf_tables)"
    assert len(KernelSymbols.parse("0000000000000000 T schedule\n")) == 0

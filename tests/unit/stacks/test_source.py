"""SymbolizedStacks (stacks/source.py): cached frames by stack id, collisions counted, and the sweep that
keeps the kernel's stack table from filling with stacks no record names any more."""

from __future__ import annotations

import errno

from otel_envoy.stacks.source import IDLE_S, SymbolizedStacks
from otel_envoy.stacks.symbolize import Symbolizer


class Table:
    """The kernel's stack table, as the loader shows it: id -> addresses."""

    def __init__(self, stacks: dict[int, list[int]]) -> None:
        self.stacks = dict(stacks)
        self.reads = 0

    def addresses(self, stack_id: int) -> list[int]:
        self.reads += 1
        return list(self.stacks.get(stack_id, []))

    def delete(self, stack_id: int) -> None:
        del self.stacks[stack_id]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_an_idle_stack_leaves_the_table_and_the_cache_and_a_reused_id_reads_afresh() -> None:
    table, clock = Table({1: [0x10], 2: [0x20], 3: [0x30]}), Clock()
    stacks = SymbolizedStacks(table.addresses, Symbolizer(), clock=clock)
    stacks.kernel(1)
    stacks.kernel(2)
    assert stacks.sweep(table.stacks, keep=set(), delete=table.delete) == 0  # all young (3 first met now)
    clock.now += IDLE_S / 2
    stacks.kernel(2)  # 2 stays in use
    clock.now += IDLE_S / 2 + 1
    assert stacks.sweep(list(table.stacks), keep={3}, delete=table.delete) == 1  # 1 idle; 3 kept
    assert set(table.stacks) == {2, 3} and stacks.swept == 1
    table.stacks[1] = [0x99]  # the kernel puts another stack in the freed slot
    reads = table.reads
    stacks.kernel(1)
    assert table.reads == reads + 1  # read afresh, not the old cached frames
    stacks.kernel(2)
    assert table.reads == reads + 1  # a stack still in use stays cached


def test_collisions_are_counted_once_per_stack_named() -> None:
    table = Table({})
    stacks = SymbolizedStacks(table.addresses, Symbolizer(), clock=Clock())
    assert stacks.kernel(-errno.EEXIST) == []
    stacks.user(-errno.EEXIST, 123)
    stacks.user_build_ids(-errno.EEXIST, 123)  # the same stack's build ids: not another collision
    stacks.kernel(-errno.EFAULT)  # not captured for another reason: not a collision
    assert stacks.collisions == 2

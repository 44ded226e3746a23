"""A BPF ring buffer read through mmap, a batch at a time, without a ctypes callback per record.

bcc's ``open_ring_buffer`` calls back into Python once per record through ctypes (~2 us each). Reading the
shared pages directly costs a struct unpack and a slice per record. Layout (kernel/bpf/ringbuf.c, stable ABI,
the same one libbpf's ring_buffer__consume reads):
  offset 0:          the consumer position page (read-write)
  offset PAGE_SIZE:  the producer position page, then the data area mapped twice (read-only), so a record
                     that wraps around the end is contiguous in the mapping.
Each record starts with an 8-byte header: u32 length with the BUSY (still being written) and DISCARD bits,
u32 page offset; records are 8-byte aligned. x86-64's ordering (TSO) makes the plain loads and stores here
behave as the acquire/release pairs the protocol needs.
"""

from __future__ import annotations

import mmap
import select
import struct
from collections.abc import Callable

__all__ = ["MmapRingBuffer"]

_BUSY = 1 << 31
_DISCARD = 1 << 30
_HDR = 8
_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")


class MmapRingBuffer:
    """Consumer side of one BPF_MAP_TYPE_RINGBUF map, given its fd and data size in bytes."""

    def __init__(self, map_fd: int, data_size: int) -> None:
        if data_size <= 0 or data_size & (data_size - 1):
            raise ValueError(f"ring buffer size {data_size} is not a power of two")
        page = mmap.PAGESIZE
        self.mask = data_size - 1
        self._consumer = mmap.mmap(map_fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
        self._data = mmap.mmap(map_fd, page + 2 * data_size, mmap.MAP_SHARED, mmap.PROT_READ, offset=page)
        self._base = page  # the data area starts after the producer page
        self._epoll = select.epoll()
        self._epoll.register(map_fd, select.EPOLLIN)

    def consume(self, on_record: Callable[[bytes], None], limit: int = 65536) -> int:
        """Deliver the records available now (at most ``limit``); returns how many."""
        data, base, mask = self._data, self._base, self.mask
        cons = _U64.unpack_from(self._consumer, 0)[0]
        prod = _U64.unpack_from(data, 0)[0]
        n = 0
        while cons < prod and n < limit:
            off = base + (cons & mask)
            length = _U32.unpack_from(data, off)[0]
            if length & _BUSY:
                break
            size = length & ~(_BUSY | _DISCARD)
            if not length & _DISCARD:
                on_record(data[off + _HDR : off + _HDR + size])
                n += 1
            cons += (size + _HDR + 7) & ~7
            _U64.pack_into(self._consumer, 0, cons)  # hand the space back as we go
            if cons >= prod:
                prod = _U64.unpack_from(data, 0)[0]
        return n

    def poll(self, on_record: Callable[[bytes], None], timeout_ms: int) -> int:
        """Wait up to ``timeout_ms`` for records if there are none, then deliver what is there."""
        n = self.consume(on_record)
        if n == 0:
            self._epoll.poll(timeout_ms / 1000.0)
            n = self.consume(on_record)
        return n

    def close(self) -> None:
        """Unmap and stop watching the map."""
        self._epoll.close()
        self._data.close()
        self._consumer.close()

"""The sampler's tables in the kernel (SAMPLING builds): its ratio, its parent-based and summary switches,
the listeners whose connections are sampled whole, the thresholds of what is kept all the same, and the
counts of what it decided. A part of :class:`~.loader.ConnectionProbes`."""

from __future__ import annotations

import ctypes
from collections.abc import Mapping
from typing import Any

from .errors import ProbeError

__all__ = ["SamplingTables"]

_SAMPLED_WHOLE = {"tls": 0, "h2c": 2, "other": 4}  # conn_sample_counts: each kind's (traced, not) slots
_KEPT_SLOTS = 5  # conn_kept_counts: slot 0 and enum connection_keep_reason 1..4


class SamplingTables:
    """The sampler's kernel tables of a loaded program (``self.bpf``, built with ``self.config``)."""

    bpf: Any
    config: Any

    def _need_sampling(self) -> None:
        if not self.config.sampling:
            raise ProbeError("request sampling is not in this build (ProbeConfig.sampling)")

    def _per_cpu_sums(self, table: bytes, slots: int) -> list[int]:
        """Slots 0 .. ``slots`` - 1 of a per-CPU counter array, each summed over the CPUs."""
        per_cpu = self.bpf[table]
        return [int(sum(per_cpu[ctypes.c_int(i)])) for i in range(slots)]

    def set_sample_threshold(self, threshold: int) -> None:
        """Trace a plaintext HTTP/1.x request when a 32-bit random number is below ``threshold``
        (0: none, 2**32: all). Needs a build with ``sampling``."""
        self._need_sampling()
        table = self.bpf[b"sample_threshold"]
        table[ctypes.c_int(0)] = ctypes.c_uint64(max(0, min(int(threshold), 2**32)))

    def set_parent_based(self, parent_based: bool) -> None:
        """Let a request's valid traceparent decide (its sampled flag) before the ratio does: the
        ``parentbased_*`` samplers. Needs a build with ``sampling``."""
        self._need_sampling()
        self.bpf[b"sample_parent_based"][ctypes.c_int(0)] = ctypes.c_uint32(1 if parent_based else 0)

    def set_request_summary(self, summary: bool) -> None:
        """Report a sampled plaintext HTTP/1.x request as one record at its answer's first write (its first
        bytes, traceparent, method, status and times) instead of its reads and writes. Needs a build with
        ``sampling``."""
        self._need_sampling()
        self.bpf[b"request_summary"][ctypes.c_int(0)] = ctypes.c_uint32(1 if summary else 0)

    def set_tls_handshake_summary(self, summary: bool) -> None:
        """Report the handshake of a traced TLS connection as one record at its end (bpf/conn_keep.bpf.h:
        the held ClientHello and server's flight) instead of a record per handshake transfer. Needs a build
        with ``sampling``; a no-op for an older bpf/ a benchmark compares, which has no such table."""
        self._need_sampling()
        try:
            table = self.bpf[b"tls_handshake_summary"]
        except KeyError:
            return
        table[ctypes.c_int(0)] = ctypes.c_uint32(1 if summary else 0)

    def sample_connections_of(self, listeners: Mapping[tuple[int, int], int]) -> None:
        """Sample whole the downstream connections of these listening sockets ((tgid, fd) -> port, added to
        those named before) with the ratio: the kernel cannot see their requests (TLS). Needs ``sampling``.
        A listening socket's entry holds its port: its traced connections' TCP facts are kept by it until
        their close (bpf/conn_sampling.bpf.h close_facts)."""
        self._need_sampling()
        one = ctypes.c_uint8(1)
        ports, fds = self.bpf[b"conn_sampled_ports"], self.bpf[b"conn_sampled_listeners"]
        for (tgid, fd), port in listeners.items():
            ports[ctypes.c_uint16(port)] = one
            fds[ctypes.c_uint64((tgid << 32) | (fd & 0xFFFFFFFF))] = ctypes.c_uint16(port)

    def connection_sample_counts(self, kind: str = "tls") -> dict[str, int]:
        """Connections decided whole, traced and not (empty without ``sampling``): ``tls`` (listeners named
        TLS), ``h2c`` and ``other`` (not HTTP): plaintext ones decided at their first transfer."""
        if not self.config.sampling:
            return {}
        per_cpu, at = self.bpf[b"conn_sample_counts"], _SAMPLED_WHOLE[kind]
        traced, not_traced = (int(sum(per_cpu[ctypes.c_int(at + i)])) for i in (0, 1))
        return {"traced": traced, "not_traced": not_traced}

    def set_keep_slow(self, threshold_ns: int) -> None:
        """Keep (report) a request that was not sampled when its answer takes at least ``threshold_ns``
        (0: never for its duration; 5xx and closed ones are kept anyway). Needs a build with ``sampling``."""
        self._need_sampling()
        self.bpf[b"keep_slow_ns"][ctypes.c_int(0)] = ctypes.c_uint64(max(0, int(threshold_ns)))

    def sample_counts(self) -> dict[str, int]:
        """Downstream requests the kernel decided, summed over CPUs (empty without ``sampling``): sampled
        and not sampled by the ratio, and by their traceparent's flag."""
        if not self.config.sampling:
            return {}
        names = ("sampled", "not_sampled", "parent_sampled", "parent_not_sampled")
        return dict(zip(names, self._per_cpu_sums(b"sample_counts", len(names)), strict=True))

    def set_keep_slow_connections(self, handshake_ns: int, accept_ns: int) -> None:
        """Keep (report at its close) a connection sampled whole and not traced whose TLS handshake took at
        least ``handshake_ns``, or that waited at least ``accept_ns`` in the accept queue (0: never for that
        reason; failed handshakes and resets are kept anyway). Needs a build with ``sampling``."""
        self._need_sampling()
        self.bpf[b"keep_slow_handshake_ns"][ctypes.c_int(0)] = ctypes.c_uint64(max(0, int(handshake_ns)))
        self.bpf[b"keep_slow_accept_ns"][ctypes.c_int(0)] = ctypes.c_uint64(max(0, int(accept_ns)))

    def set_keep_rate(self, per_second: int) -> None:
        """Send at most ``per_second`` kept records a second (requests and connections the sampler left out,
        kept for what became of them; 0: no limit); the others are counted (:meth:`keep_counts`).
        Needs a build with ``sampling``."""
        self._need_sampling()
        self.bpf[b"keep_rate"][ctypes.c_int(0)] = ctypes.c_uint64(max(0, int(per_second)))

    def keep_counts(self) -> dict[str, int]:
        """Kept requests and connections the rate refused, and the kept records sent (empty without
        ``sampling``)."""
        if not self.config.sampling:
            return {}
        names = ("requests", "connections", "sent")  # KEEP_LIMITED_REQUESTS, _CONNECTIONS, KEEP_SENT
        return dict(zip(names, self._per_cpu_sums(b"keep_counts", len(names)), strict=True))

    def kept_connection_counts(self) -> dict[int, int]:
        """Connections sampled whole and not traced that the kernel kept at their close, by enum
        connection_keep_reason, and at 0 how many of them lacked their held handshake bytes (empty without
        ``sampling``)."""
        if not self.config.sampling:
            return {}
        return dict(enumerate(self._per_cpu_sums(b"conn_kept_counts", _KEPT_SLOTS)))

"""Typed kernel events. Field names and order mirror the flattened structs of ``bpf/events.h``.

The decoder checks at import time that every struct's (non-padding) fields match these names exactly, so a
change to the header that is not mirrored here fails loudly instead of decoding garbage.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

__all__ = [
    "AcceptEvent",
    "CloseEvent",
    "ConnectEvent",
    "ConnectionKeptEvent",
    "DataEvent",
    "Event",
    "ListenEvent",
    "OffcpuEvent",
    "ProcessEvent",
    "RequestKeptEvent",
    "RoundEvent",
    "SockStateEvent",
    "SocketSetupEvent",
    "TcpEvent",
]


_SOCKOPT = struct.Struct("<iii")  # one kept socket option in CloseEvent.sockopts
#: CloseEvent.socket_options' tuples by their bytes (bounded: emptied when full)
_SOCKET_OPTIONS: dict[bytes, tuple[tuple[int, int, int], ...]] = {}
_SOCKET_OPTIONS_MAX = 256


class AcceptEvent(NamedTuple):
    """accept/accept4 returned ``fd`` to the target (``comm`` is the accepting thread's name)."""

    ts_ns: int
    kind: int
    tgid: int
    tid: int
    round: int
    fd: int
    listen_fd: int
    family: int
    peer_port: int
    local_family: int  # of local_addr; 0: its handshake's completion was not seen (or a build without it)
    peer_addr: bytes
    comm: bytes
    # its TCP handshake's completion as the kernel kept it for the accept (0: not seen), and the local address
    # the peer reached: a traced connection of a listener sampled whole sends no ESTABLISHED record
    established_ns: int
    local_addr: bytes


class ConnectEvent(NamedTuple):
    """The target connected ``fd`` to an inet address (``ret`` 0 or -errno)."""

    ts_ns: int
    kind: int
    tgid: int
    tid: int
    round: int
    fd: int
    ret: int
    family: int
    peer_port: int
    peer_addr: bytes
    comm: bytes


class CloseEvent(NamedTuple):
    """The target closed a tracked connection fd; byte and call totals come from the kernel."""

    ts_ns: int
    kind: int
    tgid: int
    tid: int
    round: int
    fd: int
    role: int
    open_ts_ns: int
    bytes_rx: int
    bytes_tx: int
    reads: int
    writes: int
    tls_records_rx: int
    tls_records_tx: int
    tls_app_records_rx: int
    tls_app_records_tx: int
    tls_max_record_rx: int
    tls_max_record_tx: int
    tls_flags: int
    sampled_out: int  # 1: decided whole, not traced, after its accept was sent (h2c or not HTTP: first bytes)
    kept: int  # a sampled_out one the kernel kept all the same (enum connection_keep_reason); 0: not kept
    epoll_first_add_ns: int  # the fd's epoll_ctl ADDs before its first real I/O: the first two (0: none)
    epoll_second_add_ns: int
    epoll_adds: int
    sockopt_count: int  # setsockopt calls on the fd; the first SOCKOPTS_KEPT in ``sockopts``
    sockopts: bytes  # (level, optname, value) as 3 little-endian __s32 each
    # a traced connection decided whole: what the kernel learned in softirq before its close, instead of an
    # EV_SOCK_STATE / EV_TCP record each (0: nothing, or sent as its own record)
    peer_fin_ns: int  # CLOSE_WAIT: the peer's FIN arrived
    reset_rx_ns: int  # the first reset received

    def socket_options(self) -> tuple[tuple[int, int, int], ...]:
        """The kept socket options, in the order they were set: (level, optname, value). One shared tuple
        per combination (a listener's connections are given the same ones): read-only."""
        kept = min(self.sockopt_count, len(self.sockopts) // 12)
        raw = self.sockopts[: kept * 12]
        options = _SOCKET_OPTIONS.get(raw)
        if options is None:
            if len(_SOCKET_OPTIONS) >= _SOCKET_OPTIONS_MAX:
                _SOCKET_OPTIONS.clear()
            options = _SOCKET_OPTIONS[raw] = tuple(_SOCKOPT.iter_unpack(raw))
        return options


class DataEvent(NamedTuple):
    """A read/write on a tracked fd returned ``ret``; ``data`` holds its first ``captured`` bytes.

    A read of a lone TLS record header rides on the connection's next read record (``held`` bytes, 5): the
    decoder puts its bytes (``held_data``) in front of ``data`` and counts them in ``captured`` (the kernel
    already counted them in ``ret``), so that ``data`` is the connection's byte stream as read, as if one read
    had read both.
    """

    ts_ns: int
    kind: int
    tgid: int
    tid: int
    round: int
    fd: int
    direction: int
    syscall: int
    flags: int
    role: int
    ret: int
    msg_seq: int
    held: int
    held_captured: int
    held_data: bytes
    captured: int
    data: bytes


class SockStateEvent(NamedTuple):
    """sock:inet_sock_set_state of a watched socket (tgid/tid: whatever task the kernel ran in)."""

    ts_ns: int
    kind: int
    tgid: int
    tid: int
    round: int
    skaddr: int
    oldstate: int
    newstate: int
    sport: int
    dport: int
    family: int
    saddr: bytes
    daddr: bytes


class TcpEvent(NamedTuple):
    """A retransmit, reset or SYN-ACK retransmit on a watched socket."""

    ts_ns: int
    kind: int
    tgid: int
    tid: int
    round: int
    skaddr: int
    type: int
    state: int
    sport: int
    dport: int
    family: int
    saddr: bytes
    daddr: bytes


class ListenEvent(NamedTuple):
    """The target called listen(fd, backlog)."""

    ts_ns: int
    kind: int
    tgid: int
    tid: int
    round: int
    fd: int
    backlog: int


class SocketSetupEvent(NamedTuple):
    """A step of a listening socket's setup (``op``: enum setup_op): bind, SO_REUSEPORT, dup, the epoll
    registration by the thread that will accept on it (``comm``: that thread's name), close."""

    ts_ns: int
    kind: int
    tgid: int
    tid: int
    round: int
    fd: int
    other_fd: int
    result: int
    op: int
    family: int
    port: int
    addr: bytes
    comm: bytes


class ProcessEvent(NamedTuple):
    """A process that exec'd into the followed comm (EV_EXEC), or a target whose last thread exited
    (EV_EXIT)."""

    ts_ns: int
    kind: int
    tgid: int
    tid: int
    round: int
    old_pid: int
    comm: bytes


class OffcpuEvent(NamedTuple):
    """A target thread was off CPU from ``start_ns`` to ``ts_ns`` (one wait above the kernel's threshold)."""

    ts_ns: int
    kind: int
    tgid: int
    tid: int
    round: int
    start_ns: int
    runnable_ns: int
    prev_state: int
    reason: int
    syscall: int
    kstack_id: int
    ustack_id: int
    waker_kstack_id: int
    other_pid: int
    other_tgid: int
    cpu: int
    other_comm: bytes


class RoundEvent(NamedTuple):
    """One event-loop round of a target thread: epoll_wait returned at ``start_ns``, was called again at
    ``ts_ns``."""

    ts_ns: int
    kind: int
    tgid: int
    tid: int
    round: int
    start_ns: int
    offcpu_ns: int
    runnable_ns: int
    ready: int
    waits: int
    cpu: int
    waker_kstack_id: int  # who ended the idle wait before the round (-1: the wait was short, not taken)
    idle_ns: int  # asleep in the epoll_wait that started the round
    waker_pid: int
    waker_tgid: int
    waker_comm: bytes


class RequestKeptEvent(NamedTuple):
    """A plaintext HTTP/1.x request reported as one record: sampled (``sampled``: request summaries), or not
    sampled but kept (``reason``: a 5xx, closed before an answer, or slow). Its first bytes, traceparent,
    status and times. ``ts_ns``: its answer's first write (or the close)."""

    ts_ns: int
    kind: int
    tgid: int
    tid: int
    round: int
    start_ns: int
    fd: int
    listen_fd: int
    status: int
    method: int
    reason: int
    head_len: int
    head: bytes
    sampled: int
    context_len: int
    context: bytes  # from its traceparent's value on: the value, then maybe its tracestate line


class ConnectionKeptEvent(NamedTuple):
    """A downstream connection sampled whole and not traced (no record of it was sent), kept at its close for
    ``reason`` (enum connection_keep_reason: a failed or slow TLS handshake, a reset, a slow accept): what its
    accept, its handshake's data records and its close would have said. ``hello`` / ``flight``: the first
    bytes of its ClientHello's read (``hello_peeked``: a listener filter's peek) and of the server's hello
    flight the kernel held (``hello_ret`` / ``flight_ret``: what those calls moved; all zero: none held).
    ``ts_ns``: the close."""

    ts_ns: int
    kind: int
    tgid: int
    tid: int
    round: int
    fd: int
    listen_fd: int
    family: int
    peer_port: int
    reason: int
    hs_state: int
    hs_resumed: int
    close_flags: int
    peer_addr: bytes
    comm: bytes
    open_ts_ns: int
    established_ns: int
    hs_start_ns: int
    hs_end_ns: int
    hs_version: int
    bytes_rx: int
    bytes_tx: int
    reads: int
    writes: int
    tls_records_rx: int
    tls_records_tx: int
    tls_app_records_rx: int
    tls_app_records_tx: int
    tls_max_record_rx: int
    tls_max_record_tx: int
    tls_flags: int
    epoll_adds: int
    epoll_first_add_ns: int
    epoll_second_add_ns: int
    sockopt_count: int
    sockopts: bytes
    hello_ns: int
    flight_ns: int
    hello_ret: int
    hello_len: int
    flight_ret: int
    flight_len: int
    hello_peeked: int
    hello: bytes
    flight: bytes


Event = (
    ProcessEvent
    | SocketSetupEvent
    | AcceptEvent
    | ConnectEvent
    | CloseEvent
    | DataEvent
    | SockStateEvent
    | TcpEvent
    | ListenEvent
    | OffcpuEvent
    | RoundEvent
    | RequestKeptEvent
    | ConnectionKeptEvent
)

"""Builders of typed kernel events (otel_envoy.events.types) for correlator and pipeline tests.

Every builder returns the NamedTuple the decoder would produce, with the constants of ``bpf/events.h``
(via :func:`load_layout`), so tests read like the kernel's story of a connection::

    established(1_000, pport=40000)          # SYN_RECV -> ESTABLISHED of the child socket (softirq)
    accept(2_000, fd=30, port=40000)         # accept4() returned fd 30 to Envoy
    data(4_000, fd=30, direction=DIR_READ, ret=79, data=b"GET / ...")
    close(8_000, fd=30, rx=79, tx=185, epoll_adds=(3_000,))  # its one epoll ADD, kept for the close

Defaults describe one Envoy (``TGID``/``TID``) listening on ``LOCAL``:``LPORT`` through ``LISTEN_FD``,
with IPv4 peers. :func:`encode` packs an event back into the raw record layout, so the same stories can be
fed to :class:`otel_envoy.event_pipeline.EventPipeline` as bytes.
"""

from __future__ import annotations

import socket
import struct

from otel_envoy.envoy.listen_socket import ListenSocket
from otel_envoy.events.layout import load_layout
from otel_envoy.events.types import (
    AcceptEvent,
    CloseEvent,
    ConnectionKeptEvent,
    DataEvent,
    Event,
    SockStateEvent,
    TcpEvent,
)

__all__ = [
    "DIR_READ",
    "DIR_WRITE",
    "LISTEN_FD",
    "LOCAL",
    "LPORT",
    "PEER",
    "TGID",
    "TID",
    "C",
    "accept",
    "addr",
    "close",
    "connection_kept",
    "data",
    "encode",
    "established",
    "listen_sockets",
    "read",
    "state",
    "tcp",
    "write",
]

LAYOUT = load_layout()
C = LAYOUT.constants
DIR_READ, DIR_WRITE = C["DIR_READ"], C["DIR_WRITE"]

TGID, TID = 1000, 1001
LISTEN_FD = 10
LOCAL, LPORT = "10.0.0.1", 8080
PEER = "10.0.0.2"
COMM = "wrk:worker_0"


def addr(ip: str) -> tuple[int, bytes]:
    """(family, 16-byte address field) of an IPv4 or IPv6 text address."""
    if ":" in ip:
        return socket.AF_INET6, socket.inet_pton(socket.AF_INET6, ip)
    return socket.AF_INET, socket.inet_pton(socket.AF_INET, ip).ljust(16, b"\0")


def _comm(name: str) -> bytes:
    return name.encode()[: C["COMM_LEN"] - 1].ljust(C["COMM_LEN"], b"\0")


def listen_sockets(*entries: tuple[int, int, str, int, str | None]) -> dict[tuple[int, int], ListenSocket]:
    """The correlator's (tgid, listen fd) table from ``(tgid, fd, address, port, listener name)`` rows."""
    return {(tgid, fd): ListenSocket(address, port, name) for tgid, fd, address, port, name in entries}


#: the msg_seq the next data record of (tgid, fd) carries, as the kernel numbers them: from 0 per connection
_NEXT_SEQ: dict[tuple[int, int], int] = {}


def accept(ts: int, fd: int, port: int, *, tgid: int = TGID, tid: int = TID, listen_fd: int = LISTEN_FD,
           peer: str = PEER, comm: str = COMM, round: int = 1, established: int = 0,
           local: str = LOCAL) -> AcceptEvent:
    """accept4() returned ``fd`` for a connection from ``peer``:``port`` (its data records count from 0).
    ``established``: the handshake's completion the kernel carried on the accept (a listener sampled whole,
    whose connections send no ESTABLISHED record), with ``local`` as its local address; 0: none."""
    _NEXT_SEQ[(tgid, fd)] = 0
    family, raw = addr(peer)
    local_family, local_raw = addr(local) if established else (0, bytes(16))
    return AcceptEvent(ts, C["EV_ACCEPT"], tgid, tid, round, fd, listen_fd, family, port, local_family, raw,
                       _comm(comm), established, local_raw)


def state(ts: int, pport: int, old: int, new: int, *, peer: str = PEER, local: str = LOCAL,
          lport: int = LPORT, tgid: int = 0, tid: int = 0, skaddr: int | None = None) -> SockStateEvent:
    """inet_sock_set_state of the downstream socket ``local``:``lport`` <-> ``peer``:``pport``."""
    family, praw = addr(peer)
    _, lraw = addr(local)
    sk = skaddr if skaddr is not None else 0xFFFF_0000_0000_0000 | pport
    return SockStateEvent(ts, C["EV_SOCK_STATE"], tgid, tid, 0, sk, old, new, lport, pport, family,
                          lraw, praw)


def established(ts: int, pport: int, *, peer: str = PEER, local: str = LOCAL, lport: int = LPORT,
                tgid: int = 0) -> SockStateEvent:
    """The kernel completed the TCP handshake (child socket SYN_RECV -> ESTABLISHED)."""
    return state(ts, pport, C["TCP_SYN_RECV"], C["TCP_ESTABLISHED"], peer=peer, local=local, lport=lport,
                 tgid=tgid)


def tcp(ts: int, type: int | str, pport: int, *, tcp_state: int = 0, peer: str = PEER, local: str = LOCAL,
        lport: int = LPORT, tgid: int = 0) -> TcpEvent:
    """A retransmit / reset / SYN-ACK retransmit; ``type`` is a value or a name like "TCP_RESET_SENT"."""
    family, praw = addr(peer)
    _, lraw = addr(local)
    kind = C[type] if isinstance(type, str) else type
    sk = 0xFFFF_0000_0000_0000 | pport
    return TcpEvent(ts, C["EV_TCP"], tgid, 0, 0, sk, kind, tcp_state, lport, pport, family, lraw, praw)


def data(ts: int, fd: int, direction: int, ret: int, payload: bytes = b"", *, peek: bool = False,
         role: int | None = None, tgid: int = TGID, tid: int = TID, seq: int | None = None,
         syscall: int | None = None) -> DataEvent:
    """A read (``DIR_READ``) or write returned ``ret``; ``payload`` is what was captured of it. ``seq``:
    its msg_seq, by default the connection's next (a record left out of a replay is a gap)."""
    if seq is None:
        seq = _NEXT_SEQ.get((tgid, fd), 0)
    _NEXT_SEQ[(tgid, fd)] = seq + 1
    if syscall is None:
        syscall = C["IO_RECVFROM"] if direction == DIR_READ else C["IO_SENDTO"]
    return DataEvent(ts, C["EV_DATA"], tgid, tid, 1, fd, direction, syscall,
                     C["DATA_FLAG_PEEK"] if peek else 0, C["ROLE_DOWNSTREAM"] if role is None else role,
                     ret, seq, 0, 0, bytes(8), len(payload), payload)


def read(ts: int, fd: int, payload: bytes, *, ret: int | None = None, peek: bool = False,
         tgid: int = TGID) -> DataEvent:
    """Envoy read ``payload`` (``ret`` defaults to its length; 0 bytes = EOF)."""
    return data(ts, fd, DIR_READ, len(payload) if ret is None else ret, payload, peek=peek, tgid=tgid)


def write(ts: int, fd: int, payload: bytes, *, ret: int | None = None, tgid: int = TGID) -> DataEvent:
    """Envoy wrote ``payload``."""
    return data(ts, fd, DIR_WRITE, len(payload) if ret is None else ret, payload, tgid=tgid)


def close(ts: int, fd: int, rx: int = 0, tx: int = 0, *, tgid: int = TGID, tid: int = TID,
          role: int | None = None, open_ts: int = 0, reads: int = 0, writes: int = 0,
          tls: tuple[int, int, int, int, int, int, int] = (0, 0, 0, 0, 0, 0, 0),
          epoll_adds: tuple[int, ...] = (), sockopts: tuple[tuple[int, int, int], ...] = (),
          sockopt_count: int | None = None, sampled_out: int = 0, kept: int = 0, peer_fin_ns: int = 0,
          reset_rx_ns: int = 0) -> CloseEvent:
    """Envoy closed ``fd``; the kernel's byte totals (and TLS record counts, in CloseEvent order) come
    with it, and what the kernel kept of the fd before its first real I/O: the times of its epoll_ctl ADDs
    (the first two are kept; more count) and its socket options (level, optname, value). ``sampled_out``:
    the kernel decided the connection whole at its first bytes (h2c) and traced none of it. ``peer_fin_ns``,
    ``reset_rx_ns``: the peer's FIN and first reset, folded into the close (a traced connection decided
    whole)."""
    options = b"".join(struct.pack("<iii", *o) for o in sockopts[: C["SOCKOPTS_KEPT"]])
    return CloseEvent(ts, C["EV_CLOSE"], tgid, tid, 1, fd, C["ROLE_DOWNSTREAM"] if role is None else role,
                      open_ts, rx, tx, reads, writes, *tls, sampled_out, kept,
                      epoll_adds[0] if epoll_adds else 0, epoll_adds[1] if len(epoll_adds) > 1 else 0,
                      len(epoll_adds), len(sockopts) if sockopt_count is None else sockopt_count,
                      options.ljust(C["SOCKOPT_BYTES"], b"\0"), peer_fin_ns, reset_rx_ns)


def connection_kept(ts: int, fd: int, port: int, reason: str, *, open_ts: int = 0, established_ns: int = 0,
                    hello: bytes = b"", hello_ts: int = 0, peeked: bool = True, flight: bytes = b"",
                    flight_ts: int = 0, hs_start: int = 0, hs_end: int = 0, hs_state: int = 0,
                    hs_version: int = 0, rx: int = 0, tx: int = 0, peer: str = PEER,
                    tgid: int = TGID, tid: int = TID, listen_fd: int = LISTEN_FD, close_flags: int = 0,
                    round_: int = 0) -> ConnectionKeptEvent:
    """The kernel kept a connection the sampler left out at its close, for ``reason`` (e.g. "TLS_FAILED": a
    KEEP_CONN_* constant's tail), with the ClientHello and hello-flight bytes it held; "SAMPLED": a traced
    connection's handshake summary (``close_flags`` KEPT_OPEN: at the handshake's end, in ``round_``)."""
    family, raw = addr(peer)
    held_hello, held_flight = hello[: C["HELLO_HELD"]], flight[: C["FLIGHT_HELD"]]
    return ConnectionKeptEvent(
        ts, C["EV_CONNECTION_KEPT"], tgid, tid, round_, fd, listen_fd, family, port, C[f"KEEP_CONN_{reason}"],
        hs_state, 0, close_flags, raw, _comm(COMM), open_ts, established_ns, hs_start, hs_end, hs_version, rx,
        tx, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, bytes(C["SOCKOPT_BYTES"]),
        hello_ts, flight_ts, len(hello), len(held_hello), len(flight), len(held_flight), 1 if peeked else 0,
        held_hello.ljust(C["HELLO_HELD"], b"\0"), held_flight.ljust(C["FLIGHT_HELD"], b"\0"))


_STRUCTS = {
    AcceptEvent: "accept_event",
    CloseEvent: "close_event",
    ConnectionKeptEvent: "connection_kept_event",
    DataEvent: "data_event",
    SockStateEvent: "sock_state_event",
    TcpEvent: "tcp_event",
}


def encode(event: Event) -> bytes:
    """The raw ring-buffer record of ``event``, laid out as in events.h (data events cut after ``data``)."""
    sl = LAYOUT.structs[_STRUCTS[type(event)]]
    if isinstance(event, DataEvent):
        packer, _ = sl.unpacker(upto="data")
        return packer.pack(*event[:-1]) + event.data
    packer, _ = sl.unpacker()
    return packer.pack(*event).ljust(sl.size, b"\0")

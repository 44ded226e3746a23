"""The context records of a recording: what user space knew besides the kernel records, one class per type.

A recording (:mod:`.recording`) interleaves raw kernel records with context records, JSON objects keyed by
``"type"``:

  clock           ``{"type": "clock", "offset_ns": N}``: wall-clock minus monotonic ns. Always the first
                  record.
  listen_sockets  ``{"type": "listen_sockets", "sockets": [[pid, fd, address, port], ...]}``, rows sorted by
                  (pid, fd): the listening sockets of the traced processes (where an accept came from).
  listener_names  ``{"type": "listener_names", "names": [[address, port, name], ...]}``, rows sorted: Envoy's
                  listener names, from its admin API.
  filter_chains   ``{"type": "filter_chains", "listeners": [{...}, ...]}``: each listener reduced to what
                  selects its filter chains (envoy/filter_chains.py), from Envoy's configuration dump; sent
                  again whenever it changes.
  adopted         ``{"type": "adopted", "ts_ns": N, "connections": [[pid, fd, listen fd, peer address,
                  peer port, local address, local port], ...]}``: downstream connections open before the
                  daemon started, handed to the kernel at ``ts_ns`` (envoy/adoption.py).
  process_resource ``{"type": "process_resource", "pid": N, "attributes": {...}}``: the resource attributes
                  of a process that became traced (envoy/process_resource.py), read from its /proc when it
                  did; ``"attributes": null`` when it exited.

The live side writes each record with ``to_json()`` the moment it learns the facts; a replay reads them back
with ``from_json()`` at the same place in the stream, so it sees the world the live run saw. ``from_json``
raises KeyError, TypeError, ValueError or AttributeError for a damaged record.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

from ..envoy.adoption import OpenConnection
from ..envoy.listen_socket import ListenSocket

__all__ = ["AdoptedConnection", "AdoptedContext", "ClockContext", "FilterChainsContext",
           "ListenSocketsContext", "ListenerNamesContext", "OwnConnectionContext", "ProcessResourceContext",
           "SamplerContext", "recording_clock"]


@dataclass(frozen=True, slots=True)
class ClockContext:
    """The monotonic-to-wall-clock offset of the run (the first record of every recording)."""

    TYPE: ClassVar[str] = "clock"
    offset_ns: int  # wall - monotonic

    def to_json(self) -> dict[str, Any]:
        """The record as a recording holds it."""
        return {"type": self.TYPE, "offset_ns": self.offset_ns}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> ClockContext:
        """Inverse of :meth:`to_json`."""
        return cls(int(obj["offset_ns"]))


@dataclass(frozen=True, slots=True)
class ListenSocketsContext:
    """The listening TCP sockets of the traced processes: (pid, fd) -> socket."""

    TYPE: ClassVar[str] = "listen_sockets"
    sockets: dict[tuple[int, int], ListenSocket]

    def to_json(self) -> dict[str, Any]:
        """The record as a recording holds it (rows sorted by pid and fd)."""
        return {"type": self.TYPE,
                "sockets": [[pid, fd, s.address, s.port] for (pid, fd), s in sorted(self.sockets.items())]}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> ListenSocketsContext:
        """Inverse of :meth:`to_json`."""
        return cls({(int(pid), int(fd)): ListenSocket(str(addr), int(port))
                    for pid, fd, addr, port in obj["sockets"]})


@dataclass(frozen=True, slots=True)
class ListenerNamesContext:
    """Envoy's listener names by local (address, port)."""

    TYPE: ClassVar[str] = "listener_names"
    names: dict[tuple[str, int], str]

    def to_json(self) -> dict[str, Any]:
        """The record as a recording holds it (rows sorted by address and port)."""
        return {"type": self.TYPE, "names": [[a, p, n] for (a, p), n in sorted(self.names.items())]}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> ListenerNamesContext:
        """Inverse of :meth:`to_json`."""
        return cls({(a, int(p)): n for a, p, n in obj["names"]})


@dataclass(frozen=True, slots=True)
class FilterChainsContext:
    """What selects each Envoy listener's filter chains: listeners as ``listener_selection_json`` gives
    them (plain JSON, so a replay parses them as the live run did)."""

    TYPE: ClassVar[str] = "filter_chains"
    listeners: list[dict[str, Any]]

    def to_json(self) -> dict[str, Any]:
        """The record as a recording holds it."""
        return {"type": self.TYPE, "listeners": self.listeners}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> FilterChainsContext:
        """Inverse of :meth:`to_json`."""
        listeners = obj["listeners"]
        if not isinstance(listeners, list) or not all(isinstance(x, dict) for x in listeners):
            raise TypeError("filter_chains: listeners must be a list of objects")
        return cls(listeners)


@dataclass(frozen=True, slots=True)
class OwnConnectionContext:
    """A connection the daemon itself is about to open to a traced Envoy (its admin API calls), by the
    local address and port it will connect from: Envoy sees it as a downstream connection with that peer,
    and no span is made of it."""

    TYPE: ClassVar[str] = "own_connection"
    address: str
    port: int

    def to_json(self) -> dict[str, Any]:
        """The record as a recording holds it."""
        return {"type": self.TYPE, "address": self.address, "port": self.port}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> OwnConnectionContext:
        """Inverse of :meth:`to_json`."""
        return cls(str(obj["address"]), int(obj["port"]))


@dataclass(frozen=True, slots=True)
class SamplerContext:
    """The request sampler of the run, when the kernel sampled requests (its ratio below 1): upstream
    requests that belong to no traced request are then left out (otel_envoy/sampling.py)."""

    TYPE: ClassVar[str] = "sampler"
    name: str
    ratio: float
    summary: bool = False  # a sampled plaintext HTTP/1.x request is one record, after its upstream requests

    def to_json(self) -> dict[str, Any]:
        """The record as a recording holds it."""
        return {"type": self.TYPE, "name": self.name, "ratio": self.ratio, "summary": self.summary}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> SamplerContext:
        """Inverse of :meth:`to_json`."""
        ratio = float(obj["ratio"])
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"sampler ratio {ratio} out of range")
        return cls(str(obj["name"]), ratio, bool(obj.get("summary", False)))


@dataclass(frozen=True, slots=True)
class AdoptedConnection:
    """One downstream connection adopted from the socket table (see :class:`AdoptedContext`)."""

    tgid: int
    fd: int
    listen_fd: int
    peer_address: str
    peer_port: int
    local_address: str
    local_port: int


@dataclass(frozen=True, slots=True)
class AdoptedContext:
    """Downstream connections open before the daemon started, handed to the kernel at ``ts_ns``
    (monotonic): from then on their I/O and close are seen, as for an accepted one."""

    TYPE: ClassVar[str] = "adopted"
    ts_ns: int
    connections: tuple[AdoptedConnection, ...]

    def to_json(self) -> dict[str, Any]:
        """The record as a recording holds it."""
        return {"type": self.TYPE, "ts_ns": self.ts_ns,
                "connections": [[c.tgid, c.fd, c.listen_fd, c.peer_address, c.peer_port, c.local_address,
                                 c.local_port] for c in self.connections]}

    @classmethod
    def of(cls, ts_ns: int, connections: Iterable[OpenConnection]) -> AdoptedContext:
        """The record of ``connections`` (envoy/adoption.py) handed to the kernel at ``ts_ns``."""
        return cls(ts_ns, tuple(
            AdoptedConnection(c.tgid, c.fd, c.listen_fd, c.socket.peer_address, c.socket.peer_port,
                              c.socket.local_address, c.socket.local_port) for c in connections))

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> AdoptedContext:
        """Inverse of :meth:`to_json`."""
        return cls(int(obj["ts_ns"]), tuple(
            AdoptedConnection(int(t), int(fd), int(lfd), str(pa), int(pp), str(la), int(lp))
            for t, fd, lfd, pa, pp, la, lp in obj["connections"]))


@dataclass(frozen=True, slots=True)
class ProcessResourceContext:
    """The resource attributes of traced process ``pid`` (strings and integers), or None: it exited."""

    TYPE: ClassVar[str] = "process_resource"
    pid: int
    attributes: dict[str, str | int] | None

    def to_json(self) -> dict[str, Any]:
        """The record as a recording holds it."""
        return {"type": self.TYPE, "pid": self.pid, "attributes": self.attributes}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> ProcessResourceContext:
        """Inverse of :meth:`to_json`."""
        attrs = obj["attributes"]
        if attrs is not None and not (isinstance(attrs, dict) and all(
                isinstance(k, str) and isinstance(v, str | int) and not isinstance(v, bool)
                for k, v in attrs.items())):
            raise TypeError("process_resource: attributes must map names to strings or integers")
        return cls(int(obj["pid"]), dict(attrs) if attrs is not None else None)


def recording_clock(first: tuple[str, object] | None) -> ClockContext:
    """The clock record a recording starts with, from the first item its reader yields (None: no item).

    Raises ValueError when that item is not a clock record, and what :meth:`ClockContext.from_json` raises
    when it is a damaged one.
    """
    if first is None or first[0] != "context" or first[1].get("type") != ClockContext.TYPE:  # type: ignore[attr-defined]
        raise ValueError("it does not start with its clock record")
    return ClockContext.from_json(first[1])  # type: ignore[arg-type]

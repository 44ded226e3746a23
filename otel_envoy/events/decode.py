"""Raw ring-buffer records -> typed events. Length-checked; bad records are counted, never raised."""

from __future__ import annotations

import struct
from collections import Counter
from collections.abc import Callable
from typing import Any

from .layout import Layout, load_layout
from .types import (
    AcceptEvent,
    CloseEvent,
    ConnectEvent,
    DataEvent,
    EpollCtlEvent,
    Event,
    ListenEvent,
    OffcpuEvent,
    RoundEvent,
    SetsockoptEvent,
    SockStateEvent,
    TcpEvent,
)

__all__ = ["Decoder"]

# event kind constant -> (C struct, Python class)
_KINDS: dict[str, tuple[str, type]] = {
    "EV_ACCEPT": ("accept_event", AcceptEvent),
    "EV_CONNECT": ("connect_event", ConnectEvent),
    "EV_CLOSE": ("close_event", CloseEvent),
    "EV_DATA": ("data_event", DataEvent),
    "EV_EPOLL_CTL": ("epoll_ctl_event", EpollCtlEvent),
    "EV_SETSOCKOPT": ("setsockopt_event", SetsockoptEvent),
    "EV_SOCK_STATE": ("sock_state_event", SockStateEvent),
    "EV_TCP": ("tcp_event", TcpEvent),
    "EV_LISTEN": ("listen_event", ListenEvent),
    "EV_OFFCPU": ("offcpu_event", OffcpuEvent),
    "EV_ROUND": ("round_event", RoundEvent),
}

_KIND_OFFSET = 8  # event_header.kind; checked against the layout in Decoder.__init__


class Decoder:
    """Decodes records laid out as in events.h. ``errors`` counts unknown kinds and short records."""

    def __init__(self, layout: Layout | None = None) -> None:
        layout = layout or load_layout()
        if layout.structs["event_header"].offset_of("kind") != _KIND_OFFSET:
            raise ValueError("events.h: event_header.kind moved; update _KIND_OFFSET")
        self.layout = layout
        self.errors: Counter[str] = Counter()
        self._readers: dict[int, Callable[[bytes], Any]] = {}
        self._min_size: dict[int, int] = {}
        for const, (struct_name, cls) in _KINDS.items():
            sl = layout.structs[struct_name]
            variable = struct_name == "data_event"
            unpacker, names = sl.unpacker(upto="data" if variable else None)
            expected = list(cls._fields[:-1] if variable else cls._fields)
            if names != expected:
                raise ValueError(
                    f"events.h: struct {struct_name} fields {names} != {cls.__name__} {expected}"
                )
            kind = layout.constants[const]
            self._readers[kind] = self._make_reader(unpacker, cls, variable)
            self._min_size[kind] = unpacker.size
        self.data_offset = layout.structs["data_event"].offset_of("data")

    @staticmethod
    def _make_reader(unpacker: struct.Struct, cls: type, variable: bool) -> Callable[[bytes], Any]:
        unpack_from, make, size = unpacker.unpack_from, cls._make, unpacker.size
        if not variable:
            return lambda raw: make(unpack_from(raw))

        def read_data(raw: bytes) -> Any:
            values = unpack_from(raw)
            captured = values[-1]
            return make((*values, raw[size : size + captured]))

        return read_data

    def decode(self, raw: bytes) -> Event | None:
        """Return the typed event, or None (counted in ``errors``) for a short or unknown record."""
        if len(raw) < _KIND_OFFSET + 4:
            self.errors["short_record"] += 1
            return None
        kind = int.from_bytes(raw[_KIND_OFFSET : _KIND_OFFSET + 4], "little")
        reader = self._readers.get(kind)
        if reader is None:
            self.errors["unknown_kind"] += 1
            return None
        if len(raw) < self._min_size[kind]:
            self.errors["short_record"] += 1
            return None
        return reader(raw)

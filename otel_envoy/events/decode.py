"""Raw ring-buffer records -> typed events. Length-checked; bad records are counted, never raised."""

from __future__ import annotations

import functools
import struct
from collections import Counter
from collections.abc import Callable
from typing import Any

from .layout import Layout, load_layout
from .types import (
    AcceptEvent,
    CloseEvent,
    ConnectEvent,
    ConnectionKeptEvent,
    DataEvent,
    Event,
    ListenEvent,
    OffcpuEvent,
    ProcessEvent,
    RequestKeptEvent,
    RoundEvent,
    SocketSetupEvent,
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
    "EV_SOCK_STATE": ("sock_state_event", SockStateEvent),
    "EV_TCP": ("tcp_event", TcpEvent),
    "EV_LISTEN": ("listen_event", ListenEvent),
    "EV_OFFCPU": ("offcpu_event", OffcpuEvent),
    "EV_ROUND": ("round_event", RoundEvent),
    "EV_REQUEST_KEPT": ("request_kept_event", RequestKeptEvent),
    "EV_EXEC": ("process_event", ProcessEvent),
    "EV_EXIT": ("process_event", ProcessEvent),
    "EV_SOCKET_SETUP": ("socket_setup_event", SocketSetupEvent),
    "EV_CONNECTION_KEPT": ("connection_kept_event", ConnectionKeptEvent),
}

_KIND_OFFSET = 8  # event_header.kind; checked against the layout in Decoder.__init__
_KIND = struct.Struct("<I")


class Decoder:
    """Decodes records laid out as in events.h. ``errors`` counts unknown kinds and short records."""

    def __init__(self, layout: Layout | None = None) -> None:
        layout = layout or load_layout()
        if layout.structs["event_header"].offset_of("kind") != _KIND_OFFSET:
            raise ValueError("events.h: event_header.kind moved; update _KIND_OFFSET")
        self.layout = layout
        self.errors: Counter[str] = Counter()
        # kind -> (unpack_from of its fixed part, maker, where a data event's captured bytes start or None):
        # decode() does the whole job without a Python call per record.
        self._kinds: dict[int, tuple[Callable[[bytes], tuple], Callable[[tuple], Any], int | None]] = {}
        for const, (struct_name, cls) in _KINDS.items():
            sl = layout.structs[struct_name]
            variable = struct_name == "data_event"
            unpacker, names = sl.unpacker(upto="data" if variable else None)
            expected = list(cls._fields[:-1] if variable else cls._fields)
            if names != expected:
                raise ValueError(
                    f"events.h: struct {struct_name} fields {names} != {cls.__name__} {expected}"
                )
            # tuple.__new__ straight from C: the field count is checked above, so NamedTuple._make's
            # own check (a Python-level call per event) is not needed.
            make = functools.partial(tuple.__new__, cls)
            self._kinds[layout.constants[const]] = (
                unpacker.unpack_from, make, unpacker.size if variable else None)
        self.data_offset = layout.structs["data_event"].offset_of("data")
        fields = DataEvent._fields
        self._held, self._held_captured, self._held_data, self._captured = (
            fields.index(name) for name in ("held", "held_captured", "held_data", "captured"))

    def decode(self, raw: bytes) -> Event | None:
        """Return the typed event, or None (counted in ``errors``) for a short or unknown record."""
        # Short records are rare: struct.error from the unpacking says so, instead of length checks
        # on every record.
        try:
            entry = self._kinds.get(_KIND.unpack_from(raw, _KIND_OFFSET)[0])
            if entry is None:
                self.errors["unknown_kind"] += 1
                return None
            unpack_from, make, data_start = entry
            values = unpack_from(raw)
            if data_start is None:
                return make(values)
            data = raw[data_start : data_start + values[-1]]  # values[-1]: captured
            if values[self._held]:
                return make(self._with_held(values, data))
            return make((*values, data))
        except struct.error:
            self.errors["short_record"] += 1
            return None

    def _with_held(self, values: tuple, data: bytes) -> tuple:
        """A data record carrying a held TLS record header read: its bytes go in front of ``data`` and are
        counted in ``captured`` (the kernel added its size to ``ret`` when the read returned bytes)."""
        out = list(values)
        held_data = values[self._held_data][: values[self._held_captured]]
        if len(held_data) < values[self._held]:
            data = b""  # the header's bytes were not captured: neither are the body's (past the handshake)
        out[self._captured] = len(held_data) + len(data)
        out.append(held_data + data)
        return tuple(out)

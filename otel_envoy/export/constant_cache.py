"""Encodings of objects many spans share (resource attributes, tuples of names), computed once per object."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["ConstantCache"]


class ConstantCache:
    """Encodings of objects that many spans share, computed once per object, keyed by its identity.

    Holds a reference to each object so its id cannot be reused while cached. Dicts (resource attributes)
    are mutable: each entry keeps a shallow snapshot (``snapshot``, by default ``dict``), and a dict changed
    since is re-encoded. Immutable objects (the tuple of a client's cipher-suite names, shared by every
    connection it makes) need none: ``snapshot=None``. Bounded: cleared when ``limit`` objects are cached.
    """

    __slots__ = ("_encode", "_entries", "_limit", "_snapshot")

    def __init__(self, encode: Callable[[Any], Any], limit: int = 64,
                 snapshot: Callable[[Any], Any] | None = dict) -> None:
        """``encode(obj)`` computes the value cached for ``obj``."""
        self._encode = encode
        self._entries: dict[int, tuple[Any, Any, Any]] = {}
        self._limit = limit
        self._snapshot = snapshot

    def get(self, obj: Any) -> Any:
        """The cached encoding of ``obj`` (computed on a miss)."""
        entry = self._entries.get(id(obj))
        if entry is not None and entry[0] is obj and (entry[1] is None or entry[1] == obj):
            return entry[2]
        value = self._encode(obj)
        if len(self._entries) >= self._limit:
            self._entries.clear()
        snapshot = self._snapshot
        self._entries[id(obj)] = (obj, None if snapshot is None else snapshot(obj), value)
        return value

    def __len__(self) -> int:
        return len(self._entries)

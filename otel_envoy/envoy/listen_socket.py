"""A listening socket of a traced Envoy: found by the daemon, kept in recordings, used by the correlator."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ListenSocket"]


@dataclass(frozen=True, slots=True)
class ListenSocket:
    """A listening socket of a target process, found in /proc or the admin API."""

    address: str  # "0.0.0.0" / "::" for wildcards
    port: int
    listener_name: str | None = None

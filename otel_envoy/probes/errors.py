"""What the probes raise."""

from __future__ import annotations

__all__ = ["ProbeError"]


class ProbeError(RuntimeError):
    """The BPF programs could not be compiled, loaded or attached (message is one line)."""

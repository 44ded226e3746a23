"""SharedAttributes: one read-only attribute dict that many spans carry, which the encoders write once."""

from __future__ import annotations

from typing import Any

__all__ = ["SharedAttributes"]


class SharedAttributes(dict):  # type: ignore[type-arg]
    """The same attributes, one object, on many spans (a client's TLS handshake outcome, repeated on every
    connection it makes). Read-only: changing it raises. The encoders write each such object once and
    reuse its encoding (by identity); to change the attributes of one span, copy it (``{**shared, ...}``)."""

    __slots__ = ()

    def _read_only(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("SharedAttributes is read-only: copy it to change one span's attributes")

    __setitem__ = __delitem__ = update = pop = popitem = clear = setdefault = __ior__ = _read_only  # type: ignore[assignment]

    def __reduce__(self) -> tuple[type, tuple[dict[str, Any]]]:  # copy and pickle without __setitem__
        return (type(self), (dict(self),))
